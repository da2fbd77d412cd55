"""Closed-form per-channel affine fits of one noise estimate onto another (TAC NER, TCEC's K_t; methods.md §3 B4,
§4 B5).

For one step and channel c, with ε̂ the estimate to correct and ε the target, K (and optionally an offset d)
minimise

    L = (1−λ)/N Σ (K ε̂ + d − ε)²  +  λ/N_M Σ M ((K ε̂ + d − ε)/ε)²  +  ρ (K − 1)²,    M = 1[|ε| > τ]

over the samples and pixels of the channel. L is quadratic in (K, d), so the minimiser is one 1×1 (no offset) or
2×2 (offset) linear solve per channel. The mask keeps the relative term away from targets near zero, where
(·/ε)² explodes (methods.md §3(f)); τ = ``mask_threshold`` · std(ε) of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ChannelFit", "fit_channel_affine"]


@dataclass(frozen=True)
class ChannelFit:
    """Per-channel scale K (C,) and offset d (C,) (zeros without an offset), float64."""

    scale: Tensor
    offset: Tensor


def _groups(x: Tensor, per_element: bool) -> Tensor:
    """(N, C, ...) -> (G, M): one row of values per channel (G = C), or per element (G = C·H·W, M = N)."""
    if per_element:
        return x.reshape(x.shape[0], -1).transpose(0, 1)
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def fit_channel_affine(
    estimate: Tensor,
    target: Tensor,
    *,
    relative_weight: float = 0.5,
    mask_threshold: float = 0.05,
    ridge: float = 0.0,
    offset: bool = False,
    per_element: bool = False,
) -> ChannelFit:
    """The (K, d) per channel that best maps ``estimate`` onto ``target`` under the module's objective.

    Args:
        estimate: ε̂, (N, C, H, W).
        target: ε, same shape.
        relative_weight: λ ∈ [0, 1], the weight of the masked relative term.
        mask_threshold: τ in units of the target's std over the step.
        ridge: ρ ≥ 0, pulls K toward 1 (and d toward 0) when the data say little.
        offset: Also fit d (a 2×2 solve per channel); otherwise d = 0.
        per_element: One (K, d) per element (C, H, W) over the samples instead of one per channel.

    Returns:
        The fit, shaped (C,) or (C, H, W); K = 1, d = 0 where the estimate is identically zero.
    """
    if estimate.shape != target.shape or estimate.ndim < 2:
        raise ValueError(f"estimate {tuple(estimate.shape)} and target {tuple(target.shape)} must be equal (N, C, …)")
    if not 0.0 <= relative_weight <= 1.0:
        raise ValueError(f"relative_weight must lie in [0, 1], got {relative_weight}")
    if mask_threshold < 0 or ridge < 0:
        raise ValueError(f"mask_threshold and ridge must be >= 0, got {mask_threshold}, {ridge}")
    e_hat, e = _groups(estimate.double(), per_element), _groups(target.double(), per_element)  # (G, M)
    count = e.shape[1]
    weights = torch.full_like(e, (1.0 - relative_weight) / count)  # w_j: the MSE part
    if relative_weight > 0:
        mask = e.abs() > mask_threshold * float(target.double().std())
        masked = mask.sum(dim=1, keepdim=True).clamp(min=1)  # N_M per channel
        weights = weights + torch.where(mask, relative_weight / (masked * e.square().clamp(min=1e-30)), 0.0)
    # Weighted least squares of e on [e_hat, 1]: normal equations per channel.
    s_hh, s_h1, s_11 = (weights * e_hat * e_hat).sum(1), (weights * e_hat).sum(1), weights.sum(1)
    s_he, s_1e = (weights * e_hat * e).sum(1), (weights * e).sum(1)
    if not offset:
        denominator = s_hh + ridge
        scale = torch.where(denominator > 0, (s_he + ridge) / denominator.clamp(min=1e-300), torch.ones_like(s_hh))
        return _shaped(ChannelFit(scale, torch.zeros_like(scale)), estimate, per_element)
    a11, a12, a22 = s_hh + ridge, s_h1, s_11 + ridge
    b1, b2 = s_he + ridge, s_1e
    determinant = a11 * a22 - a12 * a12
    solvable = determinant.abs() > 1e-30 * (a11 * a22).abs().clamp(min=1e-300)
    safe = torch.where(solvable, determinant, torch.ones_like(determinant))
    scale = torch.where(solvable, (b1 * a22 - a12 * b2) / safe, torch.ones_like(determinant))
    shift = torch.where(solvable, (a11 * b2 - a12 * b1) / safe, torch.zeros_like(determinant))
    return _shaped(ChannelFit(scale, shift), estimate, per_element)


def _shaped(fit: ChannelFit, like: Tensor, per_element: bool) -> ChannelFit:
    if not per_element:
        return fit
    shape = tuple(like.shape[1:])
    return ChannelFit(fit.scale.reshape(shape), fit.offset.reshape(shape))
