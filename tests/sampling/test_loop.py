"""tadq's sampling loop: determinism, hooks, trajectories and agreement with a hand-written diffusers loop."""

from __future__ import annotations

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from tadq.sampling import (
    IdentityHooks,
    SamplerConfig,
    SamplingHooks,
    SamplingPlan,
    initial_noise,
    make_scheduler,
    sample,
    step_contexts,
    step_noise,
)

SHAPE = (1, 8, 8)  # (C, H, W)


@pytest.fixture(scope="module")
def unet_denoiser():
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    return lambda x, t, cond=None: unet(x, t).sample


def analytic_denoiser(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    return 0.1 * x


def _run(denoiser, sampler: SamplerConfig, **kwargs):
    plan = SamplingPlan.build(DDPMScheduler(), sampler)
    kwargs = {"num_samples": 4, "seed": 0, "sample_shape": SHAPE, "progress": False} | kwargs
    return sample(denoiser, plan, **kwargs)


DDIM_STOCHASTIC = SamplerConfig("ddim", num_steps=5, eta=0.5)
DDIM_DETERMINISTIC = SamplerConfig("ddim", num_steps=5, eta=0.0)


def test_same_seed_is_bit_identical_and_different_seeds_differ(unet_denoiser) -> None:
    first = _run(unet_denoiser, DDIM_STOCHASTIC)
    assert torch.equal(first.images, _run(unet_denoiser, DDIM_STOCHASTIC).images)
    assert not torch.allclose(first.images, _run(unet_denoiser, DDIM_STOCHASTIC, seed=1).images)
    assert first.images.shape == (4, *SHAPE) and first.indices.tolist() == [0, 1, 2, 3]


def test_batching_is_exact_for_a_batch_independent_denoiser() -> None:
    reference = _run(analytic_denoiser, DDIM_STOCHASTIC, num_samples=7, batch_size=7).images
    for batch_size in (1, 3):
        assert torch.equal(_run(analytic_denoiser, DDIM_STOCHASTIC, num_samples=7, batch_size=batch_size).images,
                           reference)


def test_batch_size_and_index_selection_do_not_change_samples(unet_denoiser) -> None:
    # Not bit-exact: the UNet's CPU kernels round differently per batch size (about 4e-6 here); the loop itself is
    # exact (test above).
    reference = _run(unet_denoiser, DDIM_STOCHASTIC, batch_size=4).images
    for batch_size in (1, 3):
        torch.testing.assert_close(_run(unet_denoiser, DDIM_STOCHASTIC, batch_size=batch_size).images, reference,
                                   atol=1e-5, rtol=1e-5)
    shard = _run(unet_denoiser, DDIM_STOCHASTIC, num_samples=None, indices=[3, 1]).images
    torch.testing.assert_close(shard, reference[[3, 1]], atol=1e-5, rtol=1e-5)


def test_trajectory_records_every_step() -> None:
    result = _run(analytic_denoiser, DDIM_STOCHASTIC, record_trajectory=True, batch_size=3)
    trajectory = result.trajectory
    assert trajectory.states.shape == (6, 4, *SHAPE)
    assert trajectory.eps.shape == trajectory.model_inputs.shape == (5, 4, *SHAPE)
    assert torch.equal(trajectory.states[0], initial_noise(0, range(4), SHAPE))
    assert torch.equal(trajectory.states[-1], result.images)
    assert torch.equal(trajectory.model_inputs, trajectory.states[:-1])  # no before_model hook
    assert torch.equal(trajectory.eps, 0.1 * trajectory.states[:-1])
    scheduler = make_scheduler(DDPMScheduler(), DDIM_STOCHASTIC)
    assert torch.equal(trajectory.timesteps, scheduler.timesteps)
    assert list(trajectory.steps) == step_contexts(scheduler, DDIM_STOCHASTIC)
    assert _run(analytic_denoiser, DDIM_STOCHASTIC).trajectory is None


class RecordingHook(IdentityHooks):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_model(self, x, step):
        self.calls.append((self.name, "before_model", step))
        return x

    def after_model(self, eps, x, step):
        self.calls.append((self.name, "after_model", step))
        return eps

    def noise_std(self, std, step):
        self.calls.append((self.name, "noise_std", step))
        return std

    def after_step(self, x_prev, step):
        self.calls.append((self.name, "after_step", step))
        return x_prev


def test_hooks_are_called_in_order_with_their_step_contexts() -> None:
    calls: list = []
    hooks = [RecordingHook("a", calls), RecordingHook("b", calls)]
    assert all(isinstance(hook, SamplingHooks) for hook in hooks)
    plain = _run(analytic_denoiser, DDIM_STOCHASTIC, num_samples=2).images
    hooked = _run(analytic_denoiser, DDIM_STOCHASTIC, num_samples=2, hooks=hooks).images
    assert torch.equal(plain, hooked)  # identity hooks change nothing

    steps = step_contexts(make_scheduler(DDPMScheduler(), DDIM_STOCHASTIC), DDIM_STOCHASTIC)
    points = ("before_model", "after_model", "noise_std", "after_step")
    expected = [(name, point, step) for step in steps for point in points for name in ("a", "b")]
    assert calls == expected


class ScaleNoiseStd(IdentityHooks):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def noise_std(self, std, step):
        return self.factor * std


def test_noise_std_hook_changes_stochastic_ddim_only() -> None:
    doubled = [ScaleNoiseStd(2.0)]
    assert not torch.allclose(
        _run(analytic_denoiser, DDIM_STOCHASTIC).images, _run(analytic_denoiser, DDIM_STOCHASTIC, hooks=doubled).images
    )
    assert torch.equal(
        _run(analytic_denoiser, DDIM_DETERMINISTIC).images,
        _run(analytic_denoiser, DDIM_DETERMINISTIC, hooks=doubled).images,
    )


def test_before_model_output_is_the_state_the_step_updates() -> None:
    class Shift(IdentityHooks):
        def before_model(self, x, step):
            return x + 1.0

    result = _run(analytic_denoiser, DDIM_DETERMINISTIC, hooks=[Shift()], record_trajectory=True)
    trajectory = result.trajectory
    assert torch.equal(trajectory.model_inputs, trajectory.states[:-1] + 1.0)
    assert torch.equal(trajectory.eps, 0.1 * trajectory.model_inputs)


def test_ddpm_sampling_runs(unet_denoiser) -> None:
    result = _run(unet_denoiser, SamplerConfig("ddpm", num_steps=10), record_trajectory=True)
    assert result.images.shape == (4, *SHAPE) and torch.isfinite(result.images).all()
    assert result.trajectory.states.shape == (11, 4, *SHAPE)


def test_loop_equals_a_manual_diffusers_ddim_loop(unet_denoiser) -> None:
    result = _run(unet_denoiser, DDIM_STOCHASTIC)
    scheduler = make_scheduler(DDPMScheduler(), DDIM_STOCHASTIC)
    x, z = initial_noise(0, range(4), SHAPE), step_noise(0, range(4), 5, SHAPE)
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            eps = unet_denoiser(x, t.expand(4))
            x = scheduler.step(eps, t, x, eta=DDIM_STOCHASTIC.eta, variance_noise=z[index]).prev_sample
    torch.testing.assert_close(result.images, x, atol=1e-6, rtol=1e-6)


def test_loop_equals_a_manual_diffusers_ddpm_loop(unet_denoiser, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = SamplerConfig("ddpm", num_steps=5)
    result = _run(unet_denoiser, sampler)
    scheduler = make_scheduler(DDPMScheduler(), sampler)
    x, z = initial_noise(0, range(4), SHAPE), step_noise(0, range(4), 5, SHAPE)
    with torch.no_grad():
        for index, t in enumerate(scheduler.timesteps):
            eps = unet_denoiser(x, t.expand(4))
            # DDPMScheduler.step draws its own noise: hand it this step's z instead.
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, _z=z[index], **kwargs: _z)
            x = scheduler.step(eps, t, x).prev_sample
    torch.testing.assert_close(result.images, x, atol=1e-6, rtol=1e-6)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        _run(analytic_denoiser, DDIM_DETERMINISTIC, indices=[0])
    with pytest.raises(TypeError, match="IdentityHooks"):
        _run(analytic_denoiser, DDIM_DETERMINISTIC, hooks=[object()])
    with pytest.raises(ValueError, match="sample_shape"):
        _run(analytic_denoiser, DDIM_DETERMINISTIC, sample_shape=(8, 8))
    with pytest.raises(ValueError, match="shape"):
        _run(lambda x, t, cond: torch.cat([x, x], dim=1), DDIM_DETERMINISTIC)


class StepAwareDenoiser:
    """Records the step it is told before each call (TFMQ's per-step tables learn it this way)."""

    def __init__(self) -> None:
        self.step = None
        self.seen: list[int] = []
        self.cleared = 0

    def set_step(self, step) -> None:
        if step is None:
            self.cleared += 1
        self.step = step

    def __call__(self, x, t, cond=None):
        assert self.step is not None and bool((t == self.step.t).all())
        self.seen.append(self.step.index)
        return 0.1 * x


def test_the_walker_tells_a_step_aware_denoiser_the_step_and_clears_it() -> None:
    denoiser = StepAwareDenoiser()
    result = _run(denoiser, DDIM_STOCHASTIC, num_samples=5, batch_size=3)
    assert denoiser.seen == [0, 1, 2, 3, 4] * 2 and denoiser.cleared == 10 and denoiser.step is None
    assert torch.equal(result.images, _run(analytic_denoiser, DDIM_STOCHASTIC, num_samples=5, batch_size=3).images)
