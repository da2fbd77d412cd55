"""tadq's own DDIM/DDPM steps against diffusers' ``step``, and the noise-std override semantics."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tadq.sampling import SamplerConfig, ddim_step, ddpm_step, make_scheduler, sampler_step, step_contexts

SHAPE = (3, 2, 4, 4)  # (B, C, H, W)
TOL = {"atol": 1e-6, "rtol": 1e-6}


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(SHAPE, generator=g)  # wide enough that clip_sample clips some x_0
    return x, torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _scheduler(sampler: SamplerConfig, **train_config):
    return make_scheduler(DDPMScheduler(num_train_timesteps=1000, **train_config), sampler)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(eta: float, clip: bool, spacing: str) -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=eta, clip_sample=clip)
    scheduler = _scheduler(sampler, timestep_spacing=spacing)
    for step in step_contexts(scheduler, sampler):
        x, eps, z = _inputs(step.index)
        expected = scheduler.step(eps, step.t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ddim_step(x, eps, step, noise=z), expected, **TOL)


def test_ddim_final_alpha_cumprod_without_set_alpha_to_one() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.5)
    scheduler = make_scheduler(DDIMScheduler(set_alpha_to_one=False), sampler)
    last = step_contexts(scheduler, sampler)[-1]
    assert last.t_prev == -1 and last.alpha_prod_t_prev == pytest.approx(float(scheduler.alphas_cumprod[0]))
    x, eps, z = _inputs(0)
    expected = scheduler.step(eps, last.t, x, eta=0.5, variance_noise=z).prev_sample
    torch.testing.assert_close(ddim_step(x, eps, last, noise=z), expected, **TOL)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddpm_step_matches_diffusers(variance_type: str, clip: bool, spacing: str) -> None:
    sampler = SamplerConfig("ddpm", num_steps=10, clip_sample=clip)
    scheduler = _scheduler(sampler, variance_type=variance_type, timestep_spacing=spacing)
    for step in step_contexts(scheduler, sampler):
        x, eps, _ = _inputs(step.index)
        z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + step.index))
        generator = torch.Generator().manual_seed(100 + step.index)  # diffusers draws the same z internally
        expected = scheduler.step(eps, step.t, x, generator=generator).prev_sample
        torch.testing.assert_close(ddpm_step(x, eps, step, noise=z), expected, **TOL)


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_linear_form_without_clipping(kind: str, eta: float) -> None:
    """x_prev = A_t x_t + B_t ε + σ_t z (docs/methods/notation.md#linear-form) when no x_0 is clipped."""
    sampler = SamplerConfig(kind, num_steps=10, eta=eta, clip_sample=False)
    for step in step_contexts(_scheduler(sampler), sampler):
        x, eps, z = (tensor.double() for tensor in _inputs(step.index))
        linear = step.coef_x * x + step.coef_eps * eps + step.std_dev_t * z
        torch.testing.assert_close(sampler_step(x, eps, step, noise=z), linear, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_std_override_equal_to_std_dev_t_is_identity(kind: str, eta: float) -> None:
    sampler = SamplerConfig(kind, num_steps=10, eta=eta)
    for step in step_contexts(_scheduler(sampler), sampler):
        x, eps, z = _inputs(step.index)
        std = torch.tensor(step.std_dev_t, dtype=torch.float32)
        assert torch.equal(sampler_step(x, eps, step, noise=z, std=std), sampler_step(x, eps, step, noise=z))


def test_ddim_zero_std_override_is_the_deterministic_step() -> None:
    """σ' = 0 also enters the direction term (PTQD full code), giving exactly DDIM with η = 0."""
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.8)
    scheduler = _scheduler(sampler)
    for step in step_contexts(scheduler, sampler):
        x, eps, z = _inputs(step.index)
        expected = scheduler.step(eps, step.t, x, eta=0.0).prev_sample
        torch.testing.assert_close(ddim_step(x, eps, step, noise=z, std=0.0), expected, **TOL)


def test_ddim_override_changes_direction_and_noise() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.5)
    step = step_contexts(_scheduler(sampler), sampler)[3]
    x, eps, z = _inputs(0)
    half = 0.5 * step.std_dev_t
    difference = ddim_step(x, eps, step, noise=z, std=half) - ddim_step(x, eps, step, noise=z, std=0.0)
    direction = ((1 - step.alpha_prod_t_prev - half**2) ** 0.5 - (1 - step.alpha_prod_t_prev) ** 0.5) * eps
    torch.testing.assert_close(difference, direction + half * z, atol=1e-5, rtol=1e-5)


def test_ddpm_override_changes_only_the_noise_term() -> None:
    sampler = SamplerConfig("ddpm", num_steps=10)
    step = step_contexts(_scheduler(sampler), sampler)[3]
    x, eps, z = _inputs(0)
    difference = ddpm_step(x, eps, step, noise=z, std=0.3) - ddpm_step(x, eps, step, noise=z, std=0.0)
    torch.testing.assert_close(difference, 0.3 * z, atol=1e-6, rtol=1e-6)


def test_per_sample_std_override_broadcasts() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.5)
    step = step_contexts(_scheduler(sampler), sampler)[2]
    x, eps, z = _inputs(0)
    std = torch.tensor([0.0, step.std_dev_t, 0.5 * step.std_dev_t]).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    per_sample = ddim_step(x, eps, step, noise=z, std=std)
    for b in range(SHAPE[0]):
        alone = ddim_step(x[b : b + 1], eps[b : b + 1], step, noise=z[b : b + 1], std=float(std[b]))
        torch.testing.assert_close(per_sample[b : b + 1], alone, **TOL)


def test_std_above_direction_budget_raises() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=1.0)
    step = step_contexts(_scheduler(sampler), sampler)[-2]
    x, eps, z = _inputs(0)
    with pytest.raises(ValueError, match="direction term"):
        ddim_step(x, eps, step, noise=z, std=2.0)


def test_missing_noise_with_nonzero_std_raises() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.5)
    step = step_contexts(_scheduler(sampler), sampler)[0]
    x, eps, _ = _inputs(0)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(x, eps, step)
    deterministic = SamplerConfig("ddim", num_steps=10)
    ddim_step(x, eps, step_contexts(_scheduler(deterministic), deterministic)[0])  # σ = 0: no z needed


def test_unsupported_scheduler_options_raise() -> None:
    ddpm = SamplerConfig("ddpm", num_steps=10)
    with pytest.raises(NotImplementedError, match="variance_type"):
        step_contexts(_scheduler(ddpm, variance_type="learned_range"), ddpm)
    with pytest.raises(NotImplementedError, match="thresholding"):
        step_contexts(_scheduler(ddpm, thresholding=True), ddpm)
