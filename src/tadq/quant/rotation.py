"""Hadamard rotation of a layer's input channels (QuaRot / ConvRot style), folded into the weight.

For an orthogonal H, W·x = (W·Hᵀ)·(H·x): the weight side W·Hᵀ is folded offline, the activation side H·x is what
the input quantizer sees. A Hadamard matrix spreads an outlier channel over all channels of its block, so the
per-tensor / per-token range shrinks. We use the normalised Sylvester matrix (H = Hᵀ, H·H = I) in blocks of the
largest power of two dividing the channel count (block-diagonal, still orthogonal), so the rotation is its own
inverse and needs no stored state: it is rebuilt from the layer's shape.

For a convolution, rotating the input channels of every pixel and the weight's input channels at every tap is
exact (the conv is linear in each pixel's channel vector; zero padding stays zero). The activation side is
online (a fast Walsh–Hadamard transform, C·log2(b) adds per pixel) unless the producer is linear and can absorb
it; in a UNet the layer inputs come from SiLU/GroupNorm/concatenation, so it is online for every layer tadq
rotates today.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["hadamard_block_size", "hadamard_matrix", "rotate_channels", "fold_rotation", "rotation_ops"]


def hadamard_block_size(channels: int) -> int:
    """The largest power of two dividing ``channels`` (1 for an odd count: no rotation)."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    return channels & -channels


@functools.lru_cache(maxsize=16)
def _sylvester(size: int) -> Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / size**0.5


def hadamard_matrix(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """The normalised Sylvester–Hadamard matrix of a power-of-two ``size`` (symmetric and orthogonal)."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {size}")
    # a copy: in float64 on the CPU ``to`` returned the cached tensor itself, and a caller's in-place edit changed
    # every later rotation of the process
    return _sylvester(size).to(dtype=dtype, device=device, copy=True)


def rotate_channels(x: Tensor, dim: int) -> Tensor:
    """``x`` with dimension ``dim`` multiplied by the block-diagonal Hadamard matrix (its own inverse)."""
    moved = x.movedim(dim, -1)
    channels = moved.shape[-1]
    block = hadamard_block_size(channels)
    if block == 1:
        return x
    matrix = hadamard_matrix(block, moved.dtype, moved.device)
    blocks = moved.reshape(*moved.shape[:-1], channels // block, block)
    return (blocks @ matrix).reshape(moved.shape).movedim(-1, dim)


def fold_rotation(weight: Tensor) -> Tensor:
    """W·Hᵀ for a weight (out, in, ...) whose input channels (dim 1) are fed H·x (H symmetric, so W·Hᵀ = W·H)."""
    return rotate_channels(weight, 1)


def rotation_ops(channels: int) -> int:
    """Adds of an online fast Walsh–Hadamard transform of one token/pixel: C·log2(block)."""
    block = hadamard_block_size(channels)
    return channels * (block.bit_length() - 1)
