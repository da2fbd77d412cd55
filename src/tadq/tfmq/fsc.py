"""Finite-set calibration (FSC, docs/methods/tfmq.md): one activation range per sampler step, selected by step index.

At step s the quantizer uses ``x̂ = Δ_s·(clamp(round(x/Δ_s) + z_s, qmin, qmax) − z_s)``. The (Δ_s, z_s) live in
indexed tensors of shape (S,) inside ``StepQuantizer``; the step index comes from a shared ``StepState`` that the
sampling walker sets through ``QuantizedDenoiser.set_step`` → ``TFMQCorrection.set_step``, so nothing is
reloaded per step (the authors' code reloads a state dict before every UNet call). A network called while no
step is set raises instead of guessing step 0.

Ranges are estimated per step from data of that step only: the TIB's inputs (which depend on t alone) for
TIB-only FSC, or FP-trajectory inputs of every grid step for model-wide FSC (collected in one O(S) sampling run,
not one fresh trajectory per step as in the authors' O(S²) generator).
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tadq.calibration.observers import RangeObserver
from tadq.quant.fake_quant import scale_and_zero_point
from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer, off_grid_zero_point, zero_point_bounds

__all__ = ["StepState", "StepQuantizer", "calibrate_per_step", "install_step_quantizers", "remove_step_quantizers"]


_INDEX_TENSORS: dict[int, Tensor] = {}  # StepState slot → its step index as a 0-dim tensor (see index_tensor)
_SLOTS = itertools.count()


class StepState:
    """The sampler step the network is evaluated at, shared by every per-step module of one prepared network.

    Args:
        num_steps: S, the length of every per-step table.
    """

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps
        self._index: int | None = None
        self.labels: Tensor | None = None  # class labels of the current call (class-conditional caches)
        self._slot = next(_SLOTS)
        _INDEX_TENSORS[self._slot] = torch.zeros((), dtype=torch.long)
        weakref.finalize(self, _INDEX_TENSORS.pop, self._slot, None)

    def __deepcopy__(self, memo: dict) -> StepState:
        """A copy with its own step tensor (a converted or copied model must not share the original's step)."""
        copied = StepState(self.num_steps)
        copied.index, copied.labels = self.index, self.labels
        memo[id(self)] = copied
        return copied

    @property
    def index_tensor(self) -> Tensor:
        """The step as a 0-dim tensor, updated in place whenever ``index`` is set: what a compiled graph reads.

        Kept in a module-level table, not on this object: Inductor's freezing makes every tensor reached through
        the network's modules a constant of the graph (measured: the step-0 range was folded into the kernel), while
        a tensor from a global table stays a graph input, so one graph serves every step.
        """
        return _INDEX_TENSORS[self._slot]

    @property
    def index(self) -> int | None:
        return self._index

    @index.setter
    def index(self, value: int | None) -> None:
        self._index = value
        if value is not None:
            self.index_tensor.fill_(value)

    def traced_index(self) -> int | Tensor:
        """The step to index the per-step tables with: ``index_tensor`` inside a ``torch.compile`` trace (the
        compiled model checks that a step is set before it calls the graph), else ``require_index()``."""
        if torch.compiler.is_compiling():
            return self.index_tensor
        return self.require_index()

    def select(self, table: Tensor) -> Tensor:
        """Row ``table[step]`` of a per-step table (S, ...): inside a compile trace an ``index_select`` on
        ``index_tensor`` (indexing with a 0-dim tensor would read its value on the host, which a graph cannot)."""
        index = self.traced_index()
        if isinstance(index, Tensor):
            return table.index_select(0, index.to(table.device).reshape(1)).squeeze(0)
        return table[index]

    def require_index(self) -> int:
        if self.index is None:
            raise RuntimeError(
                "TFMQ per-step tables need the sampler step: sample through tadq.sample (the walker sets it "
                "through QuantizedDenoiser.set_step) or wrap direct calls in `with correction.at_step(index):`"
            )
        return self.index

    @contextmanager
    def at(self, index: int) -> Iterator[None]:
        """Evaluate at step ``index`` inside the block; the previous step (usually none) is restored after."""
        if not 0 <= index < self.num_steps:
            raise IndexError(f"step index {index} outside the table's {self.num_steps} steps")
        previous, self.index = self.index, index
        try:
            yield
        finally:
            self.index = previous


class StepQuantizer(Quantizer):
    """An activation quantizer with one (Δ, z) per sampler step (FSC).

    Its persistent state (``scale``, ``zero_point``, ``initialized``) is the single range it replaced, kept so the
    network's ``state_dict`` keys and values do not change; the per-step ranges are non-persistent buffers
    (S,), owned and saved by the ``TFMQCorrection`` that installs them.

    Args:
        base: the quantizer replaced (its scheme and single range are kept).
        scales: Δ per step, (S,).
        zero_points: z per step, (S,).
        state: the shared step index.
    """

    def __init__(self, base: Quantizer, scales: Tensor, zero_points: Tensor, state: StepState) -> None:
        super().__init__(base.scheme, kind="activation")
        _take_range(self, base)
        # on the network's device: apply_tfmq builds the tables on the CPU, and a GPU network is not moved after
        device = base.scale.device
        self.register_buffer("step_scale", scales.detach().to(device, torch.float32, copy=True), persistent=False)
        self.register_buffer("step_zero_point", zero_points.detach().to(device, torch.float32, copy=True),
                             persistent=False)
        self.state = state

    def _quantize(self, x: Tensor) -> Tensor:
        """On the current step's (Δ, z); bypass and observation are the base ``forward``'s."""
        zero_point = self.state.select(self.step_zero_point).to(torch.int32)  # compiled: no step constant
        return torch.fake_quantize_per_tensor_affine(x, self.state.select(self.step_scale), zero_point,
                                                     self.scheme.qmin, self.scheme.qmax)

    def plain(self) -> Quantizer:
        """The single-range quantizer this one replaced (same scheme and persistent state)."""
        quantizer = Quantizer(self.scheme, kind="activation")
        _take_range(quantizer, self)
        return quantizer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.step_scale.numel()} steps"


def _take_range(quantizer: Quantizer, source: Quantizer) -> None:
    """Give ``quantizer`` copies of ``source``'s persistent state (its single range), on ``source``'s device and in
    its dtype: loading it into a fresh quantizer kept the values on the CPU, under a network on a GPU."""
    with torch.no_grad():
        for name in ("scale", "zero_point", "initialized"):
            quantizer._buffers[name] = source._buffers[name].detach().clone()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_step_quantizers(model: nn.Module, names: list[str], scales: Tensor, zero_points: Tensor,
                            state: StepState) -> None:
    """Replace quantizer ``names[j]`` with a ``StepQuantizer`` reading column j of the (S, Q) tables.

    Everything is checked before the first quantizer is replaced, as a loaded artefact's tables come from a file: one
    distinct activation quantizer of ``model`` per column, and every step's (Δ, z) a grid tadq can have calibrated
    (Δ finite and > 0, z an integer in the quantizer's ``zero_point_bounds``), which ``tadq.io`` also requires of a
    quantizer's single range. An edited table (Δ = 0 or −1, z = 300 or 2.5) loaded and sampled another model without
    a word, and a list of names shorter than the tables' columns, or naming a quantizer twice, dropped columns.

    Raises:
        ValueError: the names or the tables do not fit ``model`` (the message names the quantizer and the step).
    """
    if scales.dim() != 2 or zero_points.shape != scales.shape or scales.shape[0] != state.num_steps:
        raise ValueError(f"FSC tables are {list(scales.shape)} and {list(zero_points.shape)}, but must both be "
                         f"(steps={state.num_steps}, quantizers)")
    if not (isinstance(names, (list, tuple)) and all(isinstance(name, str) for name in names)):
        raise ValueError(f"FSC quantizer names must be a list of module names, got {names!r}")
    if len(names) != scales.shape[1] or len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"FSC tables have {scales.shape[1]} columns for {len(names)} quantizer names"
                         f"{f' (named twice: {repeated})' if repeated else ''}: one distinct quantizer per column")
    replacements = []
    for column, name in enumerate(names):
        try:
            current = model.get_submodule(name)
        except AttributeError:
            current = None
        if not isinstance(current, Quantizer) or current.kind != "activation":
            raise ValueError(f"{name} is {'no module' if current is None else f'a {type(current).__name__}'} of "
                             f"this {type(model).__name__}, not an activation Quantizer: the FSC tables belong to "
                             "another network structure")
        base = current.plain() if isinstance(current, StepQuantizer) else current
        _check_step_grid(name, base.scheme, scales[:, column], zero_points[:, column])
        replacements.append((name, StepQuantizer(base, scales[:, column], zero_points[:, column], state)))
    for name, quantizer in replacements:
        _set_submodule(model, name, quantizer)


def _check_step_grid(name: str, scheme: QScheme, scales: Tensor, zero_points: Tensor) -> None:
    """Refuse a per-step (Δ, z) no calibration writes: Δ not finite and > 0, z off ``zero_point_bounds``."""
    valid = torch.isfinite(scales) & (scales > 0)
    if not bool(valid.all()):
        step = int((~valid).nonzero()[0, 0])
        raise ValueError(f"{name} ({scheme.describe()}) has step size Δ = {scales[step].item()} at step {step}; Δ "
                         "must be finite and > 0")
    if off_grid_zero_point(zero_points, scheme) is None:
        return
    step = next(step for step, row in enumerate(zero_points) if off_grid_zero_point(row, scheme) is not None)
    low, high = zero_point_bounds(scheme)
    raise ValueError(f"{name} ({scheme.describe()}) has zero point z = {zero_points[step].item()} at step {step}; z "
                     f"must be an integer in [{low}, {high}]")


def remove_step_quantizers(model: nn.Module) -> None:
    """Put back the single-range quantizer of every ``StepQuantizer`` in ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, StepQuantizer):
            _set_submodule(model, name, module.plain())


@torch.no_grad()
def calibrate_per_step(
    quantizers: dict[str, Quantizer], num_steps: int, run_step: Callable[[int], None], range_method: str,
) -> tuple[Tensor, Tensor]:
    """Per-step (Δ, z) of every quantizer in ``quantizers``: tables (S, Q) in the order of ``quantizers``.

    For each step s, observers are attached (values pass through unquantized, as in ``Calibrate``), ``run_step(s)``
    runs the network on that step's data, and each range is turned into (Δ, z) exactly as ``Quantizer.set_range``
    does.

    Args:
        quantizers: name → activation quantizer, in table-column order.
        num_steps: S.
        run_step: runs the forwards that reach the quantizers with step s's inputs.
        range_method: ``"minmax"`` or ``"scheme"`` (each quantizer's own range estimator).
    """
    scales = torch.zeros(num_steps, len(quantizers))
    zero_points = torch.zeros(num_steps, len(quantizers))
    for step in range(num_steps):
        observers = []
        for column, quantizer in enumerate(quantizers.values()):
            scheme = quantizer.scheme
            if range_method == "minmax":
                scheme = dataclasses.replace(scheme, range_method="minmax")
            observers.append(RangeObserver(scheme, seed=step * len(quantizers) + column))
            quantizer.attach_observer(observers[-1])
        try:
            run_step(step)
        finally:
            for quantizer in quantizers.values():
                quantizer.attach_observer(None)
        for column, (quantizer, observer) in enumerate(zip(quantizers.values(), observers, strict=True)):
            low, high = observer.range()
            scale, zero_point = scale_and_zero_point(low.float(), high.float(), quantizer.scheme.bits,
                                                     quantizer.scheme.symmetric)
            scales[step, column], zero_points[step, column] = scale.reshape(()), zero_point.reshape(())
    return scales, zero_points
