"""Closed-form per-channel affine fits of one noise estimate onto another (TAC NER, TCEC's K_t; docs/methods/tac.md,
docs/methods/tcec.md).

For one step and channel c, with ε̂ the estimate to correct and ε the target, K (and optionally an offset d)
minimise

    L = (1−λ)/N Σ (K ε̂ + d − ε)²  +  λ/N_M Σ M ((K ε̂ + d − ε)/ε)²  +  ρ (K − 1)²,    M = 1[|ε| > τ]

over the samples and pixels of the channel. L is quadratic in (K, d), so the minimiser is one 1×1 (no offset) or
2×2 (offset) linear solve per channel. The mask keeps the relative term away from targets near zero, where
(·/ε)² explodes (docs/methods/tac.md#ner); τ = ``mask_threshold`` · std(ε) of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tadq.device import wide_dtype

__all__ = ["ChannelFit", "broadcast_row", "fit_channel_affine", "fit_through_coefficient", "pixel_means"]


@dataclass(frozen=True)
class ChannelFit:
    """Per-channel scale K (C,) and offset d (C,) (zeros without an offset), float64 (float32 on MPS)."""

    scale: Tensor
    offset: Tensor


def _wide(x: Tensor) -> Tensor:
    """``x`` in the fits' dtype on its device: float64 (``wide_dtype``: float32 on MPS, which has no float64)."""
    return x.to(wide_dtype(x.device))


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
    e_hat, e = _groups(_wide(estimate), per_element), _groups(_wide(target), per_element)  # (G, M)
    count = e.shape[1]
    weights = torch.full_like(e, (1.0 - relative_weight) / count)  # w_j: the MSE part
    if relative_weight > 0:
        mask = e.abs() > mask_threshold * float(_wide(target).std())
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
    # unsolvable (the estimate does not vary, e.g. one sample per element): K = 1 and the offset alone
    shift_only = torch.where(s_11 > 0, (s_1e - s_h1) / s_11.clamp(min=1e-300), torch.zeros_like(s_11))
    shift = torch.where(solvable, (a11 * b2 - a12 * b1) / safe, shift_only)
    return _shaped(ChannelFit(scale, shift), estimate, per_element)


def fit_through_coefficient(
    estimate: Tensor, coefficient: Tensor, residual: Tensor, *, offset: bool = False, per_element: bool = False,
) -> ChannelFit:
    """The (K, d) per channel (or element) minimising Σ (B ⊙ (K ε̂ + d) − r)²: the ε change that best removes a
    state residual r when ε enters the state with the element-wise coefficient B (clipping makes B vary per element).

    Elements where B = 0 carry no weight (ε cannot move them). Returns K = 0, d = 0 where nothing constrains them.
    """
    if not estimate.shape == coefficient.shape == residual.shape or estimate.ndim < 2:
        raise ValueError("estimate, coefficient and residual must share one (N, C, …) shape")
    u = _groups(_wide(coefficient * estimate), per_element)  # B ε̂
    v = _groups(_wide(coefficient), per_element)  # B
    r = _groups(_wide(residual), per_element)
    s_uu, s_uv, s_vv, s_ur, s_vr = (u * u).sum(1), (u * v).sum(1), (v * v).sum(1), (u * r).sum(1), (v * r).sum(1)
    if not offset:
        scale = torch.where(s_uu > 0, s_ur / s_uu.clamp(min=1e-300), torch.zeros_like(s_uu))
        return _shaped(ChannelFit(scale, torch.zeros_like(scale)), estimate, per_element)
    determinant = s_uu * s_vv - s_uv * s_uv
    solvable = determinant.abs() > 1e-12 * (s_uu * s_vv).abs().clamp(min=1e-300)
    safe = torch.where(solvable, determinant, torch.ones_like(determinant))
    scale = torch.where(solvable, (s_ur * s_vv - s_uv * s_vr) / safe, torch.zeros_like(determinant))
    # unsolvable (e.g. one sample per element): the offset alone, d = Σ B r / Σ B²
    shift_only = torch.where(s_vv > 0, s_vr / s_vv.clamp(min=1e-300), torch.zeros_like(s_vv))
    shift = torch.where(solvable, (s_uu * s_vr - s_uv * s_ur) / safe, shift_only)
    return _shaped(ChannelFit(scale, shift), estimate, per_element)


def _shaped(fit: ChannelFit, like: Tensor, per_element: bool) -> ChannelFit:
    if not per_element:
        return fit
    shape = tuple(like.shape[1:])
    return ChannelFit(fit.scale.reshape(shape), fit.offset.reshape(shape))


def broadcast_row(values: Tensor, like: Tensor) -> Tensor:
    """A per-step row, (C,) or (C, H, W), shaped to broadcast over a (B, C, H, W) batch like ``like``.

    Raises ``ValueError`` unless the row matches the batch's channels (and resolution): a one-channel row was
    broadcast over every channel of another model's batch without a word, a full-resolution one failed inside torch.
    """
    if tuple(values.shape) != tuple(like.shape[1:1 + values.ndim]):
        raise ValueError(f"a per-step correction table row of shape {tuple(values.shape)} cannot act on a batch of "
                         f"shape {tuple(like.shape)}: the correction was fitted on a model with other samples "
                         "(channels or resolution); refit it for this model")
    values = values.to(dtype=like.dtype, device=like.device)
    return values.view(1, -1, *([1] * (like.ndim - 2))) if values.ndim == 1 else values.unsqueeze(0)


def pixel_means(table: Tensor) -> Tensor:
    """A per-step table (S, C) as is, (S, C, H, W) averaged over pixels: what reports and plots show per channel."""
    return table if table.ndim == 2 else table.flatten(2).mean(2)
