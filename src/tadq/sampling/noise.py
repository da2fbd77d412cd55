"""Reproducible sampler noise that belongs to a sample, not to a batch.

FP and quantized runs are compared sample by sample (trajectory pairs, docs/architecture.md), and calibration may run
sample 17 in a different batch than evaluation does. So every sample's noise is a function of (seed, sample
index) only: each index gets its own CPU ``torch.Generator`` seeded from a hash of (seed, index, stream), and the
initial state x_T and the per-step noises z come from two separate streams, so they never overlap and x_T does
not depend on the number of steps. Noise is drawn on the CPU and moved afterwards, so it is the same on every
device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from tadq.names import MAX_SEED, check_seed

__all__ = ["INITIAL_STREAM", "LABEL_STREAM", "MAX_SEED", "STEP_STREAM", "check_seed", "initial_noise",
           "sample_generator", "step_noise"]

INITIAL_STREAM = 0  # x_T
STEP_STREAM = 1  # z_1..z_S of the sampler steps
LABEL_STREAM = 2  # per-sample conditions drawn at random (class labels); never shifts the noise streams


def sample_generator(seed: int, index: int, stream: int = INITIAL_STREAM) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, index, stream).

    The 63-bit torch seed comes from numpy's ``SeedSequence`` hash of the three integers, so nearby seeds and
    indices give unrelated streams (unlike ``seed + index``, where seed 0 / index 1 would equal seed 1 / index 0).

    Args:
        seed: Run seed, in [0, ``MAX_SEED``].
        index: Sample index, in [0, ``MAX_SEED``].
        stream: Which noise of the sample: ``INITIAL_STREAM`` (x_T), ``STEP_STREAM`` (step noises) or
            ``LABEL_STREAM`` (random per-sample conditions).

    Returns:
        A freshly seeded ``torch.Generator`` on the CPU.
    """
    for name, value in (("seed", seed), ("index", index), ("stream", stream)):
        check_seed(name, value)
    state = np.random.SeedSequence([int(seed), int(index), int(stream)]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(state[0]) >> 1)  # 63 bits: a non-negative int64
    return generator


def initial_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> Tensor:
    """x_T for the given samples, each drawn from its own generator.

    Args:
        seed: Run seed.
        indices: Sample indices, length N.
        shape: Per-sample shape (C, H, W).

    Returns:
        Standard normal noise, (N, C, H, W), float32 on the CPU.
    """
    shape = tuple(shape)
    # float32 explicitly: under torch.set_default_dtype(torch.float64) randn draws other values (every sample changed)
    draws = [torch.randn(shape, generator=sample_generator(seed, i, INITIAL_STREAM), dtype=torch.float32)
             for i in indices]
    return torch.stack(draws) if draws else torch.empty((0, *shape), dtype=torch.float32)


def step_noise(seed: int, indices: Sequence[int], num_steps: int, shape: Sequence[int]) -> Tensor:
    """The sampler's z for every step of the given samples.

    Each sample draws all S step noises in one call from its own step stream, so sample i's z_s depends on
    (seed, i, S) only.

    Args:
        seed: Run seed.
        indices: Sample indices, length N.
        num_steps: Number S of sampler steps.
        shape: Per-sample shape (C, H, W).

    Returns:
        Standard normal noise, (S, N, C, H, W), float32 on the CPU; [s] is the z of step index s.
    """
    shape = tuple(shape)
    draws = [torch.randn((num_steps, *shape), generator=sample_generator(seed, i, STEP_STREAM), dtype=torch.float32)
             for i in indices]
    if not draws:
        return torch.empty((num_steps, 0, *shape), dtype=torch.float32)
    return torch.stack(draws, dim=1)  # (S, N, C, H, W)
