"""Fake quantization: quantize then dequantize in floating point, with a straight-through gradient.

Fake quantization simulates integer arithmetic exactly on the values (every output is Δ·(integer − z)), but runs
at floating-point speed: it measures quality, not speed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["round_ste", "fake_quantize", "quantize_to_int", "scale_and_zero_point"]

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
