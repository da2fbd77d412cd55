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

from dataclasses import dataclass

import torch
from torch import Tensor

from tadq.quant.quantizer import Quantizer
from tadq.tfmq.fsc import StepQuantizer

__all__ = ["ActivationGrid", "activation_codes", "check_activation_quantizer"]


@dataclass(frozen=True)
class ActivationGrid:
    """The grid an input was quantized on: Δ and the uint8 zero point, both 0-dim float32 tensors (no host sync)."""

    scale: Tensor
    zero_point: Tensor


def check_activation_quantizer(quantizer: Quantizer, name: str) -> None:
    """Refuse quantizers an integer kernel cannot reproduce (off, uncalibrated, not per tensor)."""
    if not quantizer.enabled:
        raise ValueError(f"{name}: its input is not quantized (weight-only scheme), so there is no integer "
                         "activation for an int8 kernel; run this model on the 'fake' backend")
    if quantizer.scheme.granularity != "per_tensor" or quantizer.scale.numel() != 1:
        raise ValueError(f"{name}: integer kernels need a per-tensor activation scale, got "
                         f"{quantizer.scheme.describe()}")
    if not bool(quantizer.initialized):
        raise ValueError(f"{name}: its input quantizer has no range; calibrate the model before converting")


def _current(quantizer: Quantizer) -> tuple[Tensor, Tensor]:
    if isinstance(quantizer, StepQuantizer):
        index = quantizer.state.require_index()
        return quantizer.step_scale[index], quantizer.step_zero_point[index]
    return quantizer.scale.reshape(()), quantizer.zero_point.reshape(())


def activation_codes(x: Tensor, quantizer: Quantizer) -> tuple[Tensor, ActivationGrid]:
    """(uint8 codes of ``x`` in ``x``'s memory format, the grid used).

    Raises if the quantizer is observing or bypassed: integer layers cannot calibrate; use the fake backend.
    """
    if quantizer.bypass or quantizer._observer is not None:
        raise RuntimeError("an integer layer's input quantizer is bypassed or observing: calibrate and reconstruct "
                           "on the 'fake' backend, then convert")
    scale, zero_point = _current(quantizer)
    scheme = quantizer.scheme
    shift = -scheme.qmin if scheme.qmin < 0 else 0  # signed grid → uint8
    inverse = torch.reciprocal(scale.float())  # float32 1/Δ, as the fused fake-quant kernel computes it
    z = zero_point.float() + shift
    codes = torch.mul(x, inverse).round_().add_(z).clamp_(scheme.qmin + shift, scheme.qmax + shift)
    return codes.to(torch.uint8), ActivationGrid(scale.float(), z)
