"""Capture what one module receives and returns over the calibration set, stopping the forward right after it.

Block reconstruction needs, per unit, its inputs (from the partially quantized network) and its FP outputs.
Stopping the forward at the unit keeps the cost of a capture at "the network up to that unit", and only one
unit's tensors are held at a time (bounded memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from tadq.sampling import Conditioning

__all__ = ["UnitIO", "capture_unit_io", "capture_units_io", "unit_output"]


class _StopForward(Exception):
    """Raised by the capture hook once the unit has run."""


@dataclass
class UnitIO:
    """A unit's positional/keyword inputs and outputs over the calibration set (tensors concatenated on dim 0)."""

    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    output: Tensor | None = None

    def batch(self, index: Tensor) -> tuple[list[Any], dict[str, Any]]:
        def pick(value: Any) -> Any:
            return value[index] if isinstance(value, Tensor) else value

        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def unit_output(output: Any) -> Tensor:
    """What block reconstruction fits of a unit's output: a tensor as is; of a tuple/list, its tensors (``None``
    entries skipped): one alone as is, several concatenated on dim 1 (e.g. the (text, image) token streams of an
    MMDiT block, (N, L_i, D) each), or flattened per sample and concatenated when their trailing shapes differ."""
    if isinstance(output, Tensor):
        return output
    tensors = [item for item in output if isinstance(item, Tensor)] if isinstance(output, (tuple, list)) else []
    if not tensors:
        raise TypeError(f"cannot reconstruct a unit whose output is {type(output).__name__}")
    if len(tensors) == 1:
        return tensors[0]
    if all(t.dim() >= 2 and t.shape[2:] == tensors[0].shape[2:] for t in tensors):
        return torch.cat(tensors, dim=1)
    return torch.cat([t.flatten(1) for t in tensors], dim=1)


def _merge(chunks: list[Any]) -> Any:
    return torch.cat(chunks) if isinstance(chunks[0], Tensor) else chunks[0]


@torch.no_grad()
def capture_unit_io(
    run_model: Callable[[Tensor, Tensor, Conditioning | None], Any], module: nn.Module, x: Tensor, t: Tensor,
    batch_size: int, keep_inputs: bool = True, keep_output: bool = True, cond: Conditioning | None = None,
) -> UnitIO:
    """Run ``run_model(x, t, cond)`` in batches and record ``module``'s inputs and output (then stop that forward).

    ``cond`` has one row per input (the calibration set's conditioning); ``None`` for an unconditional model.
    """
    return capture_units_io(run_model, [module], x, t, batch_size, keep_inputs, keep_output, cond)[0]


@torch.no_grad()
def capture_units_io(
    run_model: Callable[[Tensor, Tensor, Conditioning | None], Any], modules: Sequence[nn.Module], x: Tensor,
    t: Tensor, batch_size: int, keep_inputs: bool = True, keep_output: bool = True,
    cond: Conditioning | None = None,
) -> list[UnitIO]:
    """``capture_unit_io`` for several modules in one pass per batch: each module's first call is recorded, and the
    forward stops once all of them have run. The batches are the same as one module at a time, so every tensor is
    the same; the network's prefix runs once instead of once per module."""
    records = [_Record() for _ in modules]
    pending: set[int] = set()

    def make_hook(index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if index not in pending:
                return  # a module called twice in one forward: its first call is the one recorded
            pending.discard(index)
            record = records[index]
            if keep_inputs:
                record.args.append([a.detach() if isinstance(a, Tensor) else a for a in args])
                record.kwargs.append({k: v.detach() if isinstance(v, Tensor) else v for k, v in kwargs.items()})
            if keep_output:
                record.outputs.append(unit_output(output).detach())
            if not pending:
                raise _StopForward

        return hook

    handles = [module.register_forward_hook(make_hook(i), with_kwargs=True) for i, module in enumerate(modules)]
    try:
        for start in range(0, len(x), batch_size):
            pending.update(range(len(modules)))
            try:
                rows = slice(start, start + batch_size)
                run_model(x[rows], t[rows], None if cond is None else cond.rows(rows))
            except _StopForward:
                continue
            raise RuntimeError("the capture hook never fired: the module is not used in the model's forward")
    finally:
        for handle in handles:
            handle.remove()
    return [record.merged(keep_inputs, keep_output) for record in records]


@dataclass
class _Record:
    args: list[list[Any]] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)

    def merged(self, keep_inputs: bool, keep_output: bool) -> UnitIO:
        io = UnitIO()
        if keep_inputs:
            io.args = [_merge([chunk[i] for chunk in self.args]) for i in range(len(self.args[0]))]
            io.kwargs = {k: _merge([chunk[k] for chunk in self.kwargs]) for k in self.kwargs[0]}
        if keep_output:
            io.output = torch.cat(self.outputs)
        return io
