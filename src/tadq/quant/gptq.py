"""GPTQ-style rounding: quantize a weight column by column, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer's inputs (Frantar et al. 2023, after OBQ; docs/methods/
qdiffusion.md#gptq-rounding).

For a layer ``y = W x`` over inputs X (one column per input vector; a convolution's im2col patches), the error
``‖(W − Q) X‖²`` has Hessian ``H = X Xᵀ`` per output row. Quantizing column j to q_j and updating the remaining
columns by ``−(w_j − q_j)/[H⁻¹]_jj · [H⁻¹]_{j, j+1:}`` is the optimal compensation for that column; the upper
Cholesky factor of H⁻¹ gives every row of the sequence at once. The grid (Δ, z per output row) is the quantizer's
own, fixed before; only the choice of grid point changes, so the result saves as integers like nearest rounding.
It needs one pass over the calibration inputs per layer and no iterations: seconds, where AdaRound needs
hundreds of forward/backward passes per block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.device import wide_dtype

__all__ = ["HessianAccumulator", "gptq_round", "matmul_columns", "moment"]

ColumnQuantizer = Callable[[Tensor, int], Tensor]  # (column (R,), its index) → on-grid column (R,)


def matmul_columns(layer: nn.Module, x: Tensor) -> Tensor:
    """The vectors the layer's weight multiplies, one per row: (N, D) with D = ``weight[0].numel()``.

    A linear layer's input rows as they are; a convolution's im2col patches (channel-major, then kernel rows and
    columns: the order of ``weight.flatten(1)``), one per output position. Grouped convolutions are refused by the
    caller (their groups have separate Hessians).
    """
    if isinstance(layer, nn.Conv2d):
        padding = layer.padding
        # reflect/replicate/circular, or padding='same' (one more row/column bottom/right for an even kernel):
        # pad as nn.Conv2d does, then unfold without padding
        if layer.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B·L, C·kh·kw)
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    raise TypeError(f"GPTQ rounding handles Conv2d and Linear layers, not {type(layer).__name__}")


def moment(left: Tensor, right: Tensor) -> Tensor:
    """``leftᵀ right`` in float64 (``wide_dtype``: float32 on MPS), the product computed in float32 or wider: a
    float16 sum of squares overflows to inf once inputs reach ~250 over a thousand rows, and bfloat16 keeps only 8
    bits of each sum."""
    wide = torch.promote_types(torch.promote_types(left.dtype, right.dtype), torch.float32)
    return (left.detach().to(wide).T @ right.detach().to(wide)).to(wide_dtype(left.device))


class HessianAccumulator:
    """Σ x xᵀ over every vector the layer's weight multiplies, and the count: each batch's product in float32 or
    the inputs' wider dtype (fast; half-precision inputs are widened, see ``moment``), the running sum in float64
    (so a long sum over batches loses nothing; ``wide_dtype``: float32 on MPS, which has no float64)."""

    def __init__(self, dim: int, device: torch.device | None = None) -> None:
        self.sum = torch.zeros(dim, dim, dtype=wide_dtype(device or "cpu"), device=device)
        self.count = 0

    def add(self, columns: Tensor) -> None:
        self.sum += moment(columns, columns)
        self.count += columns.shape[0]

    def hessian(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("no inputs reached the layer: its Hessian is undefined")
        return self.sum / self.count


@torch.no_grad()
def gptq_round(weight: Tensor, hessian: Tensor, quantize_column: ColumnQuantizer, damp: float = 0.01,
               block_size: int = 128, act_order: bool = False, compensated: bool = False) -> Tensor:
    """On-grid weight (same shape as ``weight``) chosen column by column with OBQ's error compensation.

    Args:
        weight: (R, ...) float weight; flattened to (R, D) with D its remaining elements (im2col order).
        hessian: (D, D) ``E[x xᵀ]`` of the layer's matmul inputs.
        quantize_column: fake-quantizes one column of the (R, D) matrix on its own grid (column index given, so
            a layer whose columns belong to different quantizers, like a split shortcut, picks the right one).
        damp: λ added to H's diagonal as a share of its mean (GPTQ: 0.01), so H is invertible when inputs are
            correlated or the sample is small.
        block_size: columns updated together (the result does not depend on it up to float rounding).
        act_order: quantize the columns with the largest input energy (H's diagonal) first, so their error is
            compensated by the most columns (GPTQ's "act-order"); the grid of each column is unchanged.
        compensated: return each column as it was just before its rounding (the float weight carrying the
            earlier columns' compensation, whose nearest rounding is the GPTQ result) instead of the rounded one;
            a learned rounding can start from it.
    """
    shape = weight.shape
    wide = wide_dtype(weight.device)  # float64 (float32 on MPS, which has no float64)
    w = weight.detach().reshape(shape[0], -1).to(wide).clone()
    columns = w.shape[1]
    if hessian.shape != (columns, columns):
        raise ValueError(f"Hessian is {tuple(hessian.shape)}, the weight has {columns} columns")
    h = hessian.to(wide).clone()
    dead = torch.diagonal(h) <= 0  # inputs that are always zero: no compensation flows through them
    h[dead, dead] = 1.0
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(columns)
    w, h = w[:, order], h[order][:, order]
    mean_diag = torch.diagonal(h).mean()
    h.diagonal().add_(damp * mean_diag)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)  # row j: [H⁻¹ restricted to columns ≥ j] scaled
    quantized = torch.empty_like(w)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        for j in range(stop - start):
            column = block[:, j]
            q = quantize_column(column.to(weight.dtype), int(order[start + j])).to(wide)
            quantized[:, start + j] = column if compensated else q
            error = (column - q) / upper[start + j, start + j]
            block[:, j:] -= error.unsqueeze(1) * upper[start + j, start + j:stop].unsqueeze(0)
            errors[:, j] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    result = torch.empty_like(quantized)
    result[:, order] = quantized
    return result.to(weight.dtype).reshape(shape)
