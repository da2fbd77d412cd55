"""ε-, v- and x₀-prediction are converted to ε in one place (``to_epsilon``) and then match diffusers' own step."""

from __future__ import annotations

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tadq.sampling import SamplerConfig, SamplingPlan, make_scheduler, sampler_step, step_noise, to_epsilon

SHAPE = (3, 2, 8, 8)
EPS32 = torch.finfo(torch.float32).eps


def _tolerance(x: torch.Tensor, output: torch.Tensor, step) -> float:
    """Both routes evaluate the same closed form with a different operation order: each of the ~8 float32
    operations errs by at most one unit roundoff relative to |x| + |output|; x̂_0 divides by √ᾱ_t and is multiplied
    back by √ᾱ_prev, so the final error is bounded by 8 ε₃₂ (|x| + |out|)_max (1 + √(ᾱ_prev/ᾱ_t))."""
    scale = float((x.abs() + output.abs()).max())
    return 8 * EPS32 * scale * (1 + (step.alpha_prod_t_prev / step.alpha_prod_t) ** 0.5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, True)])
def test_converted_ddim_step_equals_diffusers(prediction_type: str, eta: float, clip: bool) -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=eta, clip_sample=clip)
    train = DDIMScheduler(prediction_type=prediction_type, clip_sample=clip)
    plan = SamplingPlan.build(train, sampler)
    reference = make_scheduler(train, sampler)
    generator = torch.Generator().manual_seed(0)
    z = step_noise(0, range(SHAPE[0]), sampler.num_steps, SHAPE[1:])
    for step in plan.steps:
        x = torch.randn(SHAPE, generator=generator)
        output = torch.randn(SHAPE, generator=generator)
        expected = reference.step(output, step.t, x, eta=eta, variance_noise=z[step.index]).prev_sample
        ours = sampler_step(x, to_epsilon(output, x, step), step, noise=z[step.index])
        if prediction_type == "epsilon":
            assert torch.equal(ours, expected)
        else:
            torch.testing.assert_close(ours, expected, rtol=0, atol=_tolerance(x, output, step))


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_converted_ddpm_step_equals_diffusers(prediction_type: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = SamplerConfig("ddpm", num_steps=10)
    train = DDPMScheduler(prediction_type=prediction_type)
    plan = SamplingPlan.build(train, sampler)
    reference = make_scheduler(train, sampler)
    generator = torch.Generator().manual_seed(1)
    z = step_noise(0, range(SHAPE[0]), sampler.num_steps, SHAPE[1:])
    for step in plan.steps:
        x, output = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, _z=z[step.index], **kwargs: _z)
        expected = reference.step(output, step.t, x).prev_sample
        ours = sampler_step(x, to_epsilon(output, x, step), step, noise=z[step.index])
        torch.testing.assert_close(ours, expected, rtol=0, atol=_tolerance(x, output, step))


def test_epsilon_is_returned_untouched() -> None:
    step = SamplingPlan.build(DDPMScheduler(), SamplerConfig("ddim", num_steps=4)).steps[1]
    output = torch.randn(2, 1, 4, 4)
    assert to_epsilon(output, torch.randn(2, 1, 4, 4), step) is output
