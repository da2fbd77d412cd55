"""Activation codes: a layer input turned into uint8 codes on its quantizer's current grid.

The codes are computed exactly as ``torch.fake_quantize_per_tensor_affine`` computes them (the fake-quant path used
for sampling): ``clamp(nearbyint(x · (1/Δ)) + z, qmin, qmax)`` with 1/Δ a float32 division, so the integer model
sees bit-identical codes. ``torch.quantize_per_tensor`` was measured to round differently at ties (59 of 600 exact
half-step inputs differ) and is deprecated, so it is not used. A signed grid is moved to uint8 by adding 128 to
codes and zero point, which leaves every difference code − z unchanged.

A ``StepQuantizer`` (TFMQ finite-set calibration) is read at its current sampler step on every call, so per-step
ranges work without any reloading.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from tadq.quant.fake_quant import kernel_codes
from tadq.quant.quantizer import Quantizer, _unchanged, _version_of
from tadq.tfmq.fsc import StepQuantizer

__all__ = ["ActivationGrid", "GridCache", "SCRATCH", "Scratch", "activation_codes", "activation_grid",
           "check_activation_quantizer", "check_conv_input", "check_float_input", "check_linear_input", "is_per_step",
           "traced_codes"]


@dataclass(frozen=True)
class ActivationGrid:
    """The uint8 grid an input is quantized on: Δ, 1/Δ (float32, as fake-quant computes it) and the zero point.

    Python numbers for a fixed range (kernels take them as constants, which ``torch.compile`` needs), 0-dim tensors
    for a per-step range (no host sync, the step's values are read on the device).
    """

    scale: float | Tensor
    inverse: float | Tensor
    zero_point: float | Tensor
    qmin: int
    qmax: int


def check_activation_quantizer(quantizer: Quantizer, name: str) -> None:
    """Refuse quantizers an integer kernel cannot reproduce (off, fp8, uncalibrated, not per tensor)."""
    if not quantizer.enabled:
        raise ValueError(f"{name}: its input is not quantized (weight-only scheme), so there is no integer "
                         "activation for an int8 kernel; run this model on the 'fake' backend")
    if quantizer.scheme.fp8:
        raise ValueError(f"{name}: its input is quantized to {quantizer.scheme.format} (fp8 activations), which "
                         "the int8 kernels cannot run; run this model on the 'fake' backend (the fp8 simulation)")
    if quantizer.scheme.granularity != "per_tensor" or quantizer.scale.numel() != 1:
        raise ValueError(f"{name}: integer kernels need a per-tensor activation scale, got "
                         f"{quantizer.scheme.describe()}")
    if not bool(quantizer.initialized):
        raise ValueError(f"{name}: its input quantizer has no range; calibrate the model before converting")


def check_float_input(x: Tensor, name: str) -> None:
    """Refuse a layer input in another dtype than float32: its codes would be computed in that dtype's arithmetic,
    not the calibrated one (the fake-quant layer refuses it too, with a dtype mismatch inside torch)."""
    if x.dtype != torch.float32:
        raise TypeError(f"{name}: integer layers take float32 inputs (the dtype the quantizer was calibrated in), "
                        f"got {x.dtype}")


def check_conv_input(x: Tensor, name: str, in_channels: int) -> None:
    """Refuse what an integer conv kernel cannot take, naming the layer: another dtype than float32
    (``check_float_input``), or not a (batch, ``in_channels``, height, width) tensor (oneDNN failed with "could not
    create a primitive descriptor", the im2col GEMM without the layer's name)."""
    check_float_input(x, name)
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{name}: expects a (batch, {in_channels}, height, width) input, got shape {tuple(x.shape)}")


def check_linear_input(x: Tensor, name: str, in_features: int) -> None:
    """As ``check_conv_input`` for an integer linear: float32, ``in_features`` in the last dimension."""
    check_float_input(x, name)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{name}: expects inputs of {in_features} features (last dimension), got shape "
                         f"{tuple(x.shape)}")


def is_per_step(quantizer: Quantizer) -> bool:
    """Whether the quantizer's range changes with the sampler step (TFMQ finite-set calibration)."""
    return isinstance(quantizer, StepQuantizer)


def activation_grid(quantizer: Quantizer) -> ActivationGrid:
    """The quantizer's grid now: its fixed range, or, for a ``StepQuantizer``, the current step's range."""
    if quantizer.bypass or quantizer._observer is not None:
        raise RuntimeError("an integer layer's input quantizer is bypassed or observing: calibrate and reconstruct "
                           "on the 'fake' backend, then convert")
    scheme = quantizer.scheme
    shift = -scheme.qmin if scheme.qmin < 0 else 0  # signed grid → uint8
    if isinstance(quantizer, StepQuantizer):
        scale = quantizer.state.select(quantizer.step_scale).float()
        zero_point = quantizer.state.select(quantizer.step_zero_point).float()
        return ActivationGrid(scale, torch.reciprocal(scale), zero_point + shift,
                              scheme.qmin + shift, scheme.qmax + shift)
    scale = quantizer.scale.reshape(()).float()
    return ActivationGrid(float(scale), float(torch.reciprocal(scale)), float(quantizer.zero_point) + shift,
                          scheme.qmin + shift, scheme.qmax + shift)


def activation_codes(x: Tensor, grid: ActivationGrid, out: Tensor | None = None) -> Tensor:
    """Codes of ``x`` on ``grid`` as float32 holding integers (in ``out`` when given, else in ``x``'s layout).

    Float codes, not uint8: kernels convert them to their layout in the same copy, and window sums read them
    exactly (integers below 2^24).
    """
    codes = torch.mul(x, grid.inverse) if out is None else torch.mul(x, grid.inverse, out=out)
    return codes.round_().add_(grid.zero_point).clamp_(grid.qmin, grid.qmax)


def traced_codes(x: Tensor, grid: ActivationGrid) -> Tensor:
    """``activation_codes`` as out-of-place ops, for ``torch.compile``: the same float32 operations in the same
    order (multiply by 1/Δ, round half to even, add z, clamp), which Inductor fuses into one pass over ``x``."""
    return kernel_codes(x, grid.inverse, grid.zero_point, grid.qmin, grid.qmax)


class Scratch(threading.local):
    """Per-thread reusable buffers for the codes of one layer input at a time.

    A fresh multi-megabyte tensor costs several in-place passes (the allocator hands large blocks back to the OS, so
    each new one page-faults); reusing buffers made the whole int8 forward about 20 % faster here. Layers run one
    after another, so one buffer per (role, dtype, device) serves them all; it grows to the largest input seen.
    """

    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, role: str, shape: torch.Size, dtype: torch.dtype, device: torch.device,
            channels_last: bool) -> Tensor:
        """A dense tensor of ``shape`` (channels-last strides for 4-D when asked) over the reused storage."""
        key = (role, dtype, device)
        numel = shape.numel()
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.flat[key] = torch.empty(numel, dtype=dtype, device=device)
        view = flat[:numel]
        if channels_last and len(shape) == 4:
            batch, channels, height, width = shape
            return view.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return view.view(shape)


SCRATCH = Scratch()


class GridCache:
    """A layer's memo of its input quantizer's fixed grid, so a forward reads no tensor values on the host.

    Taken from the quantizer object the layer is called with; a different object (TFMQ swapping quantizers in or
    out) is read afresh, and per-step quantizers are always read at the current step. Eager calls also read it
    afresh when the range was written in place since (the tensors' version counters, host metadata: no sync):
    guidance branch ranges (``QuantConfig.branch_ranges``) swap the unconditional branch's Δ and z into the same
    quantizers for half of every guided call, which a memo by object alone served with the conditional grid. The
    buffers' identities are kept with their counters, as ``Quantizer``'s own memo does: a buffer replaced by another
    tensor (``load_state_dict(assign=True)``, ``register_buffer``) whose counter happened to read the same was served
    the old grid, and an inference tensor (a model built or loaded under ``torch.inference_mode``), which keeps no
    counter, is read at every call (its counter raised). A compiled graph keeps the grid it was traced with
    (``int8-compiled`` refuses models whose ranges move).
    """

    def __init__(self) -> None:
        self.source: Quantizer | None = None
        self.grid: ActivationGrid | None = None
        self.seen: tuple | None = None  # the quantizer's (scale, zero_point) snapshots (``_version_of``)

    def fill(self, quantizer: Quantizer) -> None:
        """Read a fixed grid now (when the layer is built), so no forward reads it on the host, compiled or not;
        a per-step grid is read at each call, on the device."""
        if not is_per_step(quantizer):
            self(quantizer)

    def __call__(self, quantizer: Quantizer) -> ActivationGrid:
        if is_per_step(quantizer):
            return activation_grid(quantizer)
        if quantizer.bypass or quantizer._observer is not None:
            raise RuntimeError("an integer layer's input quantizer is bypassed or observing: calibrate on the "
                               "'fake' backend, then convert")
        if torch.compiler.is_compiling():  # traced once: the grid is a constant of the graph
            if self.source is not quantizer or self.grid is None:
                self.grid, self.source = activation_grid(quantizer), quantizer
            return self.grid
        seen = self.seen
        if (self.source is quantizer and self.grid is not None and seen is not None
                and _unchanged(seen[0], quantizer.scale) and _unchanged(seen[1], quantizer.zero_point)):
            return self.grid
        self.grid, self.source = activation_grid(quantizer), quantizer
        snapshots = _version_of(quantizer.scale), _version_of(quantizer.zero_point)
        self.seen = None if None in snapshots else snapshots
        return self.grid
