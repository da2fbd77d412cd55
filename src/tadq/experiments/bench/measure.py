"""Cost measures kept with each bench cell: bit-operations per forward and the artefact's true size on disk.

They are taken once, right after a cell is sampled (through the variant's ``describe``), on the very denoiser that
was sampled, and stored in the cell, so a rerun reads them back instead of re-measuring.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from typing import Any

from torch import nn

from tadq.corrections.ptqd.bitops import FP_BITS, bit_operations
from tadq.denoiser import QuantizedDenoiser
from tadq.experiments.rows import Variant
from tadq.io import save_quantized

__all__ = ["HookClock", "TimedHook", "cost_measures", "measured"]

logger = logging.getLogger(__name__)
_EXPECTED = (TypeError, ValueError, RuntimeError, NotImplementedError)  # a measure that does not apply, not a bug


def _parameter_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def cost_measures(denoiser: nn.Module, scheduler, is_fp: bool) -> dict[str, Any]:
    """``bitops`` (Σ MACs × b_w × b_a per sample and forward), ``artefact`` (``ArtefactSize.to_json()``) and
    ``fp_bytes``; a measure that cannot be taken is ``None`` with its reason under ``<name>_note``."""
    result: dict[str, Any] = {"bitops": None, "artefact": None}
    if is_fp:
        result["bitops"] = bit_operations(denoiser, FP_BITS, FP_BITS)
        result["fp_bytes"] = _parameter_bytes(denoiser)
        return result
    if not isinstance(denoiser, QuantizedDenoiser):  # a peer tool's own modules: its kernels are not ours to count
        note = f"{type(denoiser).__name__} is not a tadq QuantizedDenoiser"
        return {**result, "bitops_note": note, "artefact_note": note}
    try:
        result["bitops"] = bit_operations(denoiser)
    except _EXPECTED as error:
        result["bitops_note"] = str(error)
    try:
        with tempfile.TemporaryDirectory(prefix="tadq-bench-artefact-") as folder:
            result["artefact"] = save_quantized(denoiser, f"{folder}/model", scheduler).to_json()
    except _EXPECTED as error:
        result["artefact_note"] = str(error)
    return result


class HookClock:
    """Seconds spent inside the correction hooks of one sampling run."""

    def __init__(self) -> None:
        self.seconds = 0.0


class TimedHook:
    """Forwards the four hook points of one correction unchanged (same object, same order, same results) and adds
    the time spent in them to a clock: the overhead of the corrections measured inside the very run that is
    scored, so it does not drown in the shared machine's load changes between cells (as in benchmarks/perf.py)."""

    def __init__(self, hook, clock: HookClock) -> None:
        self.hook, self.clock = hook, clock

    def _call(self, name: str, *args):
        t0 = time.perf_counter()
        try:
            return getattr(self.hook, name)(*args)
        finally:
            self.clock.seconds += time.perf_counter() - t0

    def before_model(self, x, step):
        return self._call("before_model", x, step)

    def after_model(self, eps, x, step):
        return self._call("after_model", eps, x, step)

    def noise_std(self, std, step):
        return self._call("noise_std", std, step)

    def after_step(self, x_prev, step):
        return self._call("after_step", x_prev, step)


def _timing_hooks(denoiser: nn.Module) -> HookClock | None:
    """Make ``denoiser.correction_hooks()`` return timed wrappers of its hooks; ``None`` when it has no hooks API."""
    hooks = getattr(denoiser, "correction_hooks", None)
    if hooks is None:
        return None
    clock = HookClock()
    denoiser.correction_hooks = lambda: tuple(TimedHook(hook, clock) for hook in hooks())  # instance shadows method
    return clock


def measured(variant: Variant, scheduler) -> Variant:
    """``variant`` whose ``describe`` also stores ``cost_measures`` and the time inside its correction hooks
    (``hooks_s``) under ``extras["bench"]``.

    ``settings`` are left untouched, so the cell key (and reuse of finished cells) is the one ``tadq run`` uses.
    """
    original: Callable[[nn.Module], dict[str, Any]] | None = variant.describe
    build = variant.build
    clocks: dict[int, HookClock] = {}

    def timed_build() -> nn.Module:
        denoiser = build()
        clock = _timing_hooks(denoiser)
        if clock is not None:
            clocks[id(denoiser)] = clock
        return denoiser

    def describe(denoiser: nn.Module) -> dict[str, Any]:
        extras = dict(original(denoiser)) if original is not None else {}
        extras["bench"] = cost_measures(denoiser, scheduler, build is None)
        clock = clocks.pop(id(denoiser), None)
        extras["bench"]["hooks_s"] = clock.seconds if clock is not None else None
        return extras

    return dataclasses.replace(variant, build=timed_build if build is not None else None, describe=describe)
