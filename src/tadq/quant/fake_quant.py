"""Fake quantization: quantize then dequantize in floating point, with a straight-through gradient.

Fake quantization simulates integer arithmetic exactly on the values (every output is Δ·(integer − z)), but runs
at floating-point speed: it measures quality, not speed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from tadq.quant.qscheme import QScheme

__all__ = ["round_ste", "fake_quantize", "kernel_codes", "kernel_fake_quantize", "quantize_to_int",
           "scale_and_zero_point", "fp8_fake_quantize", "fp8_scale", "grid_step"]

MIN_SCALE = 1e-8


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (half to even, as ``torch.round``) with an identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def quantize_to_int(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x/Δ) + z, qmin, qmax)`` (float tensor holding integers)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """``Δ·(clamp(round(x/Δ) + z, qmin, qmax) − z)``; gradients pass straight through rounding (not clamping).

    Args:
        x: any shape.
        scale: Δ, broadcastable to ``x`` (scalar per tensor, or (C, 1, ...) per output channel).
        zero_point: z, same shape as ``scale``, integer-valued.
    """
    codes = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (codes - zero_point) * scale


def kernel_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """torch's fused fake-quant kernels (``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine``) as
    out-of-place ops, for ``torch.compile``: with a dynamic batch those ops have no fake-tensor implementation and
    broke the graph (``int8-compiled``'s attention operands, docs/backends.md). The kernels' float32 arithmetic in
    their order: 1/Δ by one division, × 1/Δ (not ÷ Δ, which ``fake_quantize`` uses and which lands one code away
    within float rounding of a half step), round half to even, + z, clamp, − z, × Δ; bit-identical to them where
    x/Δ fits an int64 (|x/Δ| < 2^63): beyond it, NaN and ±inf included, the kernels' integer cast is undefined (the
    per-channel kernel gives q_min on x86 where these ops saturate at q_max). ``scale`` (float32) and
    ``zero_point`` broadcast to ``x``."""
    codes = kernel_codes(x, torch.reciprocal(scale), zero_point, qmin, qmax)
    return (codes - zero_point) * scale


def kernel_codes(x: Tensor, inverse: Tensor | float, zero_point: Tensor | float, qmin: int, qmax: int) -> Tensor:
    """The codes torch's fused fake-quant kernels compute, as out-of-place ops: × 1/Δ (``inverse``), round half to
    even, + z, clamp (float32 holding integers). One definition for ``kernel_fake_quantize`` and the integer
    backends' traced activation codes, which must give the simulation's codes bit for bit."""
    return torch.clamp(torch.round(x * inverse) + zero_point, qmin, qmax)


def scale_and_zero_point(low: Tensor, high: Tensor, bits: int, symmetric: bool) -> tuple[Tensor, Tensor]:
    """Δ and z that map the range [low, high] onto the b-bit grid.

    The range is widened to include 0 so that zero (padding, ReLU/SiLU floors) is exactly representable.
    """
    low = torch.minimum(low, torch.zeros_like(low))
    high = torch.maximum(high, torch.zeros_like(high))
    if symmetric:
        scale = torch.maximum(low.abs(), high.abs()) / (2 ** (bits - 1) - 1)
        return scale.clamp_min(MIN_SCALE), torch.zeros_like(scale)
    scale = ((high - low) / (2**bits - 1)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(-low / scale), 0, 2**bits - 1)
    return scale, zero_point


def fp8_scale(low: Tensor, high: Tensor, fp8_max: float) -> Tensor:
    """s = max(|low|, |high|) / M: the range's largest magnitude lands on the fp8 format's largest finite value M
    (floored at ``MIN_SCALE`` as the integer step is, so an all-zero tensor keeps a finite scale)."""
    return (torch.maximum(low.abs(), high.abs()) / fp8_max).clamp_min(MIN_SCALE)


def grid_step(low: Tensor, high: Tensor, scheme: QScheme) -> tuple[Tensor, Tensor]:
    """(Δ, z) that map [low, high] onto ``scheme``'s grid: ``scale_and_zero_point`` for the integer grid, the fp8
    scale ``fp8_scale`` (and z = 0) for an fp8 format."""
    if scheme.fp8:
        scale = fp8_scale(low, high, scheme.fp8_max)
        return scale, torch.zeros_like(scale)
    return scale_and_zero_point(low, high, scheme.bits, scheme.symmetric)


def fp8_fake_quantize(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype, fp8_max: float) -> Tensor:
    """``s·fp8(clamp(x/s, −M, M))`` in ``x``'s dtype, with a straight-through gradient (through the cast, not the
    clamp, as ``fake_quantize`` treats rounding and clamping).

    Computed in float32 whatever ``x``'s dtype (the integer path's arithmetic): x/s is clamped to ±M before the
    cast because torch does not promise a saturating cast (torch 2.13's CPU cast saturates to E4M3 but keeps E5M2's
    infinities; E4M3 has no infinity, and an unsaturated cast gives NaN there).

    Args:
        x: any shape and floating dtype.
        scale: s, broadcastable to ``x``.
        fp8_dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` (``QScheme.fp8_dtype``).
        fp8_max: M, the format's largest finite value (``QScheme.fp8_max``).
    """
    step = scale.float()
    scaled = torch.clamp(x.float() / step, -fp8_max, fp8_max)
    on_grid = scaled + (scaled.to(fp8_dtype).float() - scaled).detach()
    return (on_grid * step).to(x.dtype)
