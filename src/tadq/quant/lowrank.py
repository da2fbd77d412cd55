"""The low-rank floating-point branch of SVDQuant: W = U·D + R, with U·D from a randomized truncated SVD.

The branch keeps the weight's largest singular directions (where smoothing has moved the activation outliers)
in floating point, and only the residual R is quantized: its range is set by what is left, not by the outliers.
For a convolution the weight is flattened to (out, in·kh·kw): D becomes a conv with r outputs and the layer's
kernel, stride, padding and dilation, U a 1×1 conv. A randomized truncated SVD (Halko et al.) takes milliseconds.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from tadq.device import wide_dtype

__all__ = ["effective_rank", "lowrank_split", "lowrank_macs"]


def effective_rank(out_features: int, reduction: int, rank: int) -> int:
    """``rank`` capped at half of min(out, K): beyond that the "branch" is most of the layer in floating point."""
    return max(0, min(rank, min(out_features, reduction) // 2))


@torch.no_grad()
def lowrank_split(weight: Tensor, rank: int, *, niter: int = 4, oversample: int = 8, seed: int = 0
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(up (O, r), down (r, *weight.shape[1:]), residual) with up·down + residual = weight (in float arithmetic).

    The SVD runs in float64 (``wide_dtype``: float32 on MPS, which has no float64) on the flattened weight with its
    random test matrix drawn from a local CPU generator seeded with ``seed`` and then moved to the weight's device,
    as sampler noise is: the same sketch on every device (a generator on the weight's device drew another on a GPU),
    and the caller's torch RNG (CPU and CUDA) is untouched; the residual is ``weight − up·down`` in the weight's
    dtype.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:  # 2.5 failed slicing the SVD
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if rank > min(matrix.shape):
        raise ValueError(f"rank {rank} exceeds min(out, K) = {min(matrix.shape)}")
    sketch = min(rank + oversample, min(matrix.shape))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    left, values, right = _randomized_svd(matrix.to(wide_dtype(matrix.device)), sketch, niter, generator)
    up = (left[:, :rank] * values[:rank]).to(weight.dtype)
    down = right[:, :rank].T.contiguous().to(weight.dtype)
    residual = (matrix - up @ down).reshape(weight.shape)
    return up, down.reshape(rank, *weight.shape[1:]), residual


def _randomized_svd(matrix: Tensor, sketch: int, niter: int, generator: torch.Generator
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V) of a rank-``sketch`` approximation of ``matrix`` (Halko et al. 2009, Alg. 4.4: range finder with
    ``niter`` QR-stabilised power iterations, then an exact SVD of the small projection), the steps of
    ``torch.svd_lowrank`` in its order (the same split on CPU as before) but with the test matrix drawn from
    ``generator``: svd_lowrank draws from the global RNG, and seeding that with ``torch.manual_seed`` reseeded every
    CUDA device's generator for good (``fork_rng(devices=[])`` restores only the CPU one)."""
    wide = matrix.shape[0] < matrix.shape[1]
    a = matrix.mH if wide else matrix
    # a CPU generator, drawn in float64 on every device (MPS takes it in float32: the same sketch, rounded)
    test = torch.randn(a.shape[-1], sketch, dtype=torch.float64, generator=generator).to(a.device, a.dtype)
    basis = torch.linalg.qr(a @ test).Q
    for _ in range(niter):
        basis = torch.linalg.qr(a.mH @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    u, values, vh = torch.linalg.svd(basis.mH @ a, full_matrices=False)
    left, right = basis @ u, vh.mH
    return (right, values, left) if wide else (left, values, right)


def lowrank_macs(rank: int, reduction: int, out_features: int) -> int:
    """MACs of the branch per output position: r·K (down) + O·r (up)."""
    return rank * (reduction + out_features)
