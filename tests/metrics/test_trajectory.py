"""Per-step trajectory divergence: zero for identical runs, tracks a growing perturbation, cosine is scale-free."""

from __future__ import annotations

import pytest
import torch

from tadq.metrics import as_state_stack, per_step_cosine, per_step_mse


@pytest.fixture
def states() -> torch.Tensor:
    return torch.randn(6, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # S = 5 steps, N = 4


def test_identical_runs_have_zero_mse_and_unit_cosine(states) -> None:
    assert torch.equal(per_step_mse(states, states.clone()), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(per_step_cosine(states, states.clone()), torch.ones(6, dtype=torch.float64))


def test_mse_tracks_a_perturbation_growing_over_steps(states) -> None:
    scale = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1, 1) * 0.1
    quantized = states + scale * torch.randn(states.shape, generator=torch.Generator().manual_seed(1))
    mse = per_step_mse(states, quantized)
    cosine = per_step_cosine(states, quantized)
    assert mse.shape == cosine.shape == (6,)
    assert mse[0] == 0 and torch.all(mse[1:] > mse[:-1])
    assert cosine[0] == pytest.approx(1.0) and torch.all(cosine[1:] < cosine[:-1])
    step = 3
    manual = (states[step].double() - quantized[step].double()).square().mean()
    torch.testing.assert_close(mse[step], manual)


def test_cosine_ignores_scale_but_mse_does_not(states) -> None:
    torch.testing.assert_close(per_step_cosine(states, 2.0 * states), torch.ones(6, dtype=torch.float64))
    assert torch.all(per_step_mse(states, 2.0 * states) > 0)


def test_rejects_mismatched_shapes(states) -> None:
    with pytest.raises(ValueError, match="equal shapes"):
        per_step_mse(states, states[:-1])
    with pytest.raises(ValueError, match="equal shapes"):
        per_step_cosine(states, states[:, :-1])


def test_as_state_stack_builds_the_expected_layout(states) -> None:
    stacked = as_state_stack(list(states))
    assert torch.equal(stacked, states)
    with pytest.raises(ValueError):
        as_state_stack([])
