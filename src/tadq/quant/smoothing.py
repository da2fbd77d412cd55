"""Smoothing: migrate activation outliers into the weight (SmoothQuant; SVDQuant's first step).

W·x = (W·diag(s))·(x / s) for any positive per-input-channel s. With s_j = max|x_j|^α / max|W_:j|^(1−α) the
activation's outlier channels shrink and the weight's input columns grow by the same factor; α ("migration
strength") trades one difficulty for the other and is searched per layer (``tadq.svdquant``). For a convolution the
same s applies to an input channel at every tap (exact; zero padding stays zero). The division by s is elementwise
and is fused into the activation-quantize kernel (or into a preceding norm's affine) by real kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["channel_absmax", "weight_input_absmax", "smoothing_factors", "smooth_weight", "smooth_input"]

MIN_STAT = 1e-5
MAX_FACTOR = 1e4


def channel_absmax(x: Tensor, channel_dim: int) -> Tensor:
    """max |x| per channel of a layer input (dimension ``channel_dim``), shape (C,)."""
    moved = x.detach().movedim(channel_dim, 0)
    return moved.reshape(moved.shape[0], -1).abs().amax(dim=1)


def weight_input_absmax(weight: Tensor) -> Tensor:
    """max |W| per input channel (dim 1) over outputs and taps, shape (C,)."""
    moved = weight.detach().movedim(1, 0)
    return moved.reshape(moved.shape[0], -1).abs().amax(dim=1)


def smoothing_factors(activation_absmax: Tensor, weight_absmax: Tensor, alpha: float) -> Tensor:
    """s = max|x|^α / max|W|^(1−α), clamped to [1/MAX_FACTOR, MAX_FACTOR]; 1 where a channel is never used."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"migration strength alpha must be in [0, 1], got {alpha}")
    act, wgt = activation_absmax.float(), weight_absmax.float()
    factors = act.clamp_min(MIN_STAT).pow(alpha) / wgt.clamp_min(MIN_STAT).pow(1.0 - alpha)
    unused = (act <= 0) | (wgt <= 0)
    factors = torch.where(unused, torch.ones_like(factors), factors)
    return factors.clamp(1.0 / MAX_FACTOR, MAX_FACTOR)


def _along(factors: Tensor, ndim: int, dim: int) -> Tensor:
    shape = [1] * ndim
    shape[dim % ndim] = -1
    return factors.reshape(shape)


def smooth_weight(weight: Tensor, factors: Tensor) -> Tensor:
    """W·diag(s): input channels (dim 1) multiplied by s."""
    return weight * _along(factors.to(weight.dtype), weight.dim(), 1)


def smooth_input(x: Tensor, factors: Tensor, channel_dim: int) -> Tensor:
    """x / s along the layer's input channels."""
    return x / _along(factors.to(x.dtype), x.dim(), channel_dim)
