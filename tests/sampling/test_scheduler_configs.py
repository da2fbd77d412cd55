"""Scheduler configs no other test builds (a robustness probe): DPM-Solver folders of another algorithm, zero
terminal SNR, values of the wrong type. Each is sampled as diffusers does or refused by name before any work."""

from __future__ import annotations

import json
import logging
import re

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from tadq.models import load_pipeline_parts
from tadq.sampling import SamplerConfig, SamplingPlan, default_sampler
from tadq.sampling.config import SUPPORTED_SCHEDULERS, check_drivable


@pytest.mark.parametrize("algorithm", ["sde-dpmsolver++", "dpmsolver"])
def test_a_dpm_solver_folder_of_another_algorithm_has_no_default_sampler(algorithm):
    scheduler = DPMSolverMultistepScheduler(algorithm_type=algorithm, final_sigmas_type="sigma_min")
    with pytest.raises(NotImplementedError, match=re.escape(f"algorithm_type={algorithm!r}")):
        default_sampler(scheduler)  # was dpmsolver++ (deterministic, x̂_0 parametrisation) in its place
    assert default_sampler(DPMSolverMultistepScheduler(), 20) == SamplerConfig("dpmsolver++", 20, order=2)
    # named explicitly, dpmsolver++ still runs on that folder's training schedule
    assert SamplingPlan.build(scheduler, SamplerConfig("dpmsolver++", 4)).num_steps == 4


def _zero_snr(spacing: str) -> DDIMScheduler:
    return DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing=spacing)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_zero_terminal_snr_is_refused_where_the_eps_step_is_undefined(kind):
    with pytest.raises(NotImplementedError, match=r"ᾱ_t = 0 at t=999 .*zero-terminal-SNR"):  # was ZeroDivisionError
        SamplingPlan.build(_zero_snr("trailing"), SamplerConfig(kind, num_steps=5))
    plan = SamplingPlan.build(_zero_snr("leading"), SamplerConfig(kind, num_steps=5))  # t=999 not visited
    assert all(0 < step.alpha_prod_t for step in plan.steps)


@pytest.mark.parametrize("kind", ["euler", "dpmsolver++"])
def test_zero_terminal_snr_samplers_named_in_the_refusal_do_build(kind):
    plan = SamplingPlan.build(EulerDiscreteScheduler.from_config(_zero_snr("trailing").config),
                              SamplerConfig(kind, num_steps=5))
    assert all(torch.isfinite(torch.tensor([step.coef_x, step.coef_eps])).all() for step in plan.steps)


def test_the_off_grid_warning_does_not_recommend_the_spacing_in_use(caplog):
    with caplog.at_level(logging.WARNING, logger="tadq.sampling.context"):
        SamplingPlan.build(DDIMScheduler(timestep_spacing="trailing"), SamplerConfig("ddim", num_steps=6))
    assert "'trailing' with a step count that divides num_train_timesteps (1000)" in caplog.text


@pytest.mark.parametrize(("key", "value"), [("clip_sample", "yes"), ("num_train_timesteps", "1000"),
                                            ("beta_end", "0.02"), ("steps_offset", 1.5), ("timestep_spacing", 3)])
def test_a_scheduler_value_of_the_wrong_type_is_named(key, value):
    config = dict(DDIMScheduler().config) | {key: value}
    with pytest.raises(ValueError, match=f"wrong type: {key}="):
        check_drivable("DDIMScheduler", config)


@pytest.mark.parametrize("name", SUPPORTED_SCHEDULERS)
def test_every_default_scheduler_config_has_the_right_types(name):
    check_drivable(name, getattr(diffusers, name)().config)


def test_a_folder_with_a_mistyped_scheduler_value_is_refused_on_load(tiny_model_dir):
    path = tiny_model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | {"clip_sample": "yes"}))  # read as True by diffusers, silently
    with pytest.raises(ValueError, match="clip_sample='yes'"):
        load_pipeline_parts(tiny_model_dir)
