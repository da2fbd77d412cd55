"""Per-sample noise: a function of (seed, index) only, whatever the batch."""

from __future__ import annotations

import pytest
import torch

from tadq.sampling import initial_noise, sample_generator, step_noise

SHAPE = (2, 4, 4)  # (C, H, W)


def test_initial_noise_of_an_index_is_batch_independent() -> None:
    batch = initial_noise(7, [0, 1, 2, 3, 4], SHAPE)
    assert batch.shape == (5, *SHAPE)
    assert torch.equal(initial_noise(7, [3], SHAPE)[0], batch[3])
    assert torch.equal(initial_noise(7, [4, 1], SHAPE), batch[[4, 1]])


def test_step_noise_of_an_index_is_batch_independent() -> None:
    batch = step_noise(7, [0, 1, 2], 6, SHAPE)
    assert batch.shape == (6, 3, *SHAPE)
    assert torch.equal(step_noise(7, [2], 6, SHAPE)[:, 0], batch[:, 2])
    assert torch.equal(step_noise(7, [2, 0], 6, SHAPE), batch[:, [2, 0]])


def test_seeds_indices_and_streams_differ() -> None:
    x_T = initial_noise(0, [0, 1], SHAPE)
    assert not torch.equal(x_T[0], x_T[1])
    assert not torch.equal(x_T, initial_noise(1, [0, 1], SHAPE))
    z = step_noise(0, [0, 1], 3, SHAPE)
    assert not any(torch.equal(x_T[i], z[s, i]) for i in range(2) for s in range(3))
    # (seed 0, index 1) and (seed 1, index 0) must not collide, as seed + index would.
    assert not torch.equal(initial_noise(0, [1], SHAPE), initial_noise(1, [0], SHAPE))


def test_noise_is_roughly_standard_normal() -> None:
    z = step_noise(0, range(8), 4, (4, 8, 8))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05


def test_generators_are_deterministic_and_validated() -> None:
    a = torch.randn(4, generator=sample_generator(5, 9))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(5, 9)))
    with pytest.raises(ValueError, match="seed"):
        sample_generator(-1, 0)
    with pytest.raises(ValueError, match="index"):
        sample_generator(0, -2)
