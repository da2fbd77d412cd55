"""Range estimators: choose the clipping range [low, high] of a quantizer from observed values.

Pure functions of a tensor. The granularity selects what is reduced: everything (per tensor), every dimension but 0
(per output channel), or each block of consecutive weights of an output row (per block).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tadq.quant.fake_quant import grid_step
from tadq.quant.qscheme import QScheme

__all__ = ["minmax_range", "percentile_range", "mse_range", "estimate_range"]


def _flatten(x: Tensor, per_channel: bool) -> Tensor:
    return x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)  # (C, n) or (1, n)


def minmax_range(x: Tensor, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """Observed extremes, shape (C,) per channel or (1,) per tensor."""
    flat = _flatten(x, per_channel)
    return flat.min(dim=1).values, flat.max(dim=1).values


QUANTILE_MAX = 2**24  # torch.quantile refuses longer reductions ("quantile() input tensor is too large")


def _quantiles(flat: Tensor, levels: tuple[float, ...] | Tensor) -> Tensor:
    """``torch.quantile(flat, q, dim=1)`` at ``levels`` (as ``flat.dtype`` numbers; linear interpolation, NaN if a
    row has one), shape (len(levels), C), for rows of any length: a long calibration's kept activation samples
    (16384 per forward) pass 2^24 after 1024 forwards, where torch.quantile raised at the very end of the run."""
    if flat.shape[1] <= QUANTILE_MAX:
        # on flat's device: torch.quantile refuses a q on another device (a CUDA weight with a CPU q raised)
        return torch.quantile(flat, torch.as_tensor(levels, dtype=flat.dtype, device=flat.device), dim=1)
    ordered = flat.sort(dim=1).values
    # float64 (a float32 rank is not exact beyond 2^24), on the CPU: MPS has no float64, and these are a few numbers
    ranks = torch.as_tensor(levels, dtype=flat.dtype).double() * (flat.shape[1] - 1)
    below = ranks.floor()
    lower = ordered[:, below.long().to(flat.device)]  # (C, len(levels))
    upper = ordered[:, ranks.ceil().long().to(flat.device)]
    values = torch.lerp(lower, upper, (ranks - below).to(device=flat.device, dtype=flat.dtype)).T
    return torch.where(flat.isnan().any(dim=1), torch.full_like(values, float("nan")), values)


def percentile_range(x: Tensor, percentile: float, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """Clip the (100 − p) % tails on each side."""
    flat = _flatten(x, per_channel).float()
    bounds = _quantiles(flat, (1.0 - percentile / 100.0, percentile / 100.0))  # (2, C)
    return bounds[0], bounds[1]


ERROR_HEADROOM_BITS = 64  # |x − Q(x)|^p kept below 2^64, so a mean over up to 2^64 values stays finite in float32


def _least_overflowing(p: float) -> int:
    """The least integer k > 0 with k·p > ``ERROR_HEADROOM_BITS`` in float64 (Python's float product, the one the
    float64 tensor product gave), capped far beyond any float32 exponent; p > 0 (``QScheme`` refuses others)."""
    if not p > 0:
        return 2**20  # k·p > 64 holds for no k (NaN compares false)
    k = max(1, math.floor(ERROR_HEADROOM_BITS / p) - 2) if math.isfinite(ERROR_HEADROOM_BITS / p) else 2**20
    while k < 2**20 and not k * p > ERROR_HEADROOM_BITS:
        k += 1
    while k > 1 and (k - 1) * p > ERROR_HEADROOM_BITS:
        k -= 1
    return min(k, 2**20)


def _error_unit(amax: Tensor, p: float) -> Tensor:
    """Per channel, the power of two the MSE search divides errors by before ``|·|^p``: 1 where the errors
    cannot overflow float32 (every ordinary tensor: its errors are bit-for-bit unchanged), else 2^(e−1) with
    amax in [2^(e−1), 2^e) (finite even for the largest float32). In float32 ``|x − Q(x)|^2.4`` was inf past
    ~1e16 for every shrink factor, so the search kept min/max; a power of two divides exactly and scales each
    channel's errors alike, so the choice is the one the unscaled values get."""
    _, exponent = torch.frexp(amax)  # amax = m·2^e, m in [0.5, 1); |x − Q(x)| ≤ 2·amax < 2^(e+1)
    # (e + 1)·p > 64 as an integer comparison: the float64 product on the device failed on MPS (no float64)
    overflows = torch.isfinite(amax) & (exponent + 1 >= _least_overflowing(p))
    return torch.where(overflows, torch.ldexp(torch.ones_like(amax), exponent - 1), torch.ones_like(amax))


def mse_range(x: Tensor, scheme: QScheme, per_channel: bool = False) -> tuple[Tensor, Tensor]:
    """Shrink [min, max] by 1 − 0.01·i and keep, per channel, the range with the lowest mean |x − Q(x)|^p.

    Q-Diffusion / BRECQ's ``scale_method='mse'`` (docs/methods/qdiffusion.md#ranges): p = 2.4, 80 shrink factors.
    An fp8 scheme searches the same shrink factors of its range, whose largest magnitude sets s = amax / M.
    Each candidate's error is computed in one preallocated buffer (``_candidate_error``): the composed ops allocated
    a dozen temporaries of the whole tensor per candidate, and the search was most of a naive quantization's time.
    """
    flat = _flatten(x, per_channel).float()  # (C, n)
    low0, high0 = flat.min(dim=1).values, flat.max(dim=1).values
    unit = _error_unit(torch.maximum(low0.abs(), high0.abs()), scheme.mse_p)[:, None]
    # x / 1 is x exactly: the division (and its copy of the tensor) is only made where some channel needs it
    scaled = flat / unit if bool((unit != 1).any()) else None
    buffer = torch.empty_like(flat)
    best_err = torch.full_like(low0, float("inf"))
    best_low, best_high = low0.clone(), high0.clone()
    for i in range(scheme.mse_grid):
        shrink = 1.0 - 0.01 * i
        low, high = low0 * shrink, high0 * shrink
        scale, zp = grid_step(low, high, scheme)
        err = _candidate_error(flat, scaled, unit, scale[:, None], zp[:, None], scheme, buffer)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_low = torch.where(better, low, best_low)
        best_high = torch.where(better, high, best_high)
    return best_low, best_high


@torch.no_grad()
def _candidate_error(flat: Tensor, scaled: Tensor | None, unit: Tensor, scale: Tensor, zero_point: Tensor,
                     scheme: QScheme, buffer: Tensor) -> Tensor:
    """Per channel, mean |x/u − Q(x)/u|^p with Q = ``fake_quantize`` (``scaled`` = x/u, ``None`` where u = 1), the
    same elementwise ops in the same order, written into ``buffer``: bit for bit the composed expression's error
    (``round`` in place of the straight-through ``x + (round(x) − x)`` changes at most the sign of a zero, which
    ``abs`` drops). An fp8 scheme's Q is ``fp8_fake_quantize``'s: x/s clamped to ±M, cast to the format and back."""
    torch.div(flat, scale, out=buffer)
    if scheme.fp8:
        buffer.clamp_(-scheme.fp8_max, scheme.fp8_max)
        buffer.copy_(buffer.to(scheme.fp8_dtype)).mul_(scale)
    else:
        buffer.round_().add_(zero_point).clamp_(scheme.qmin, scheme.qmax).sub_(zero_point).mul_(scale)
    if scaled is None:
        torch.sub(flat, buffer, out=buffer)
    else:
        torch.sub(scaled, buffer.div_(unit), out=buffer)
    return buffer.abs_().pow_(scheme.mse_p).mean(dim=1)


def estimate_range(x: Tensor, scheme: QScheme) -> tuple[Tensor, Tensor]:
    """The range of ``x`` under ``scheme.range_method`` and ``scheme.granularity``: shape (1,) per tensor, (C,) per
    channel, (C, blocks) per block."""
    if scheme.granularity == "per_block":
        return _block_ranges(x, scheme)
    return _rows_range(x, scheme, per_channel=scheme.granularity == "per_channel")


def _block_ranges(x: Tensor, scheme: QScheme) -> tuple[Tensor, Tensor]:
    """Each output row's blocks of ``group_size`` consecutive weights as rows of their own; a last, shorter block
    searched apart (zero padding would change its percentiles and the mean of its Lp error)."""
    rows, size = x.shape[0], scheme.group_size
    flat = x.reshape(rows, -1)
    whole = flat.shape[1] // size * size
    parts = []
    if whole:
        low, high = _rows_range(flat[:, :whole].reshape(-1, size), scheme, per_channel=True)
        parts.append((low.reshape(rows, -1), high.reshape(rows, -1)))
    if whole < flat.shape[1]:
        low, high = _rows_range(flat[:, whole:], scheme, per_channel=True)
        parts.append((low.reshape(rows, 1), high.reshape(rows, 1)))
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _rows_range(x: Tensor, scheme: QScheme, per_channel: bool) -> tuple[Tensor, Tensor]:
    if scheme.range_method == "minmax":
        return minmax_range(x, per_channel)
    if scheme.range_method == "percentile":
        return percentile_range(x, scheme.percentile, per_channel)
    return mse_range(x, scheme, per_channel)
