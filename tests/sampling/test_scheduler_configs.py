"""Scheduler configs no other test builds (a robustness probe): DPM-Solver folders of another algorithm, zero
terminal SNR, values of the wrong type. Each is sampled as diffusers does or refused by name before any work."""

from __future__ import annotations

import json
import logging
import re

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
)
from tests.conftest import build_tiny_unet, counting_forwards

import tadq
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


@pytest.mark.parametrize(("betas", "needle"), [
    ("x", "must be a list of numbers in \\(0, 1\\)"),  # failed inside torch.tensor while building the scheduler
    ([0.01, "0.02"], "must be a list of numbers"),
    ([0.01, -0.01], "must be a list of numbers"),
    ([0.01] * 10, "holds 10 betas, but num_train_timesteps is 1000"),  # indexed past its end at t >= 10
])
def test_trained_betas_that_are_not_one_beta_per_step_are_refused_on_load(tiny_model_dir, betas, needle):
    path = tiny_model_dir / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"trained_betas": betas}))
    with pytest.raises(ValueError, match=f"trained_betas {needle}"):
        load_pipeline_parts(tiny_model_dir)


def test_trained_betas_of_every_step_are_accepted_as_a_list_or_an_array():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    check_drivable("DDPMScheduler", {"trained_betas": betas.tolist(), "num_train_timesteps": 1000})
    check_drivable("DDPMScheduler", DDPMScheduler(trained_betas=betas.numpy()).config)  # built in Python: numpy


# a grid option of the folder's config, the kinds whose diffusers class drops it (refused) and those that honour it
GRID_OPTIONS = [
    (EulerDiscreteScheduler, {"use_karras_sigmas": True}, ("ddim", "ddpm", "euler-ancestral"),
     ("euler", "dpmsolver++")),
    (DPMSolverMultistepScheduler, {"use_exponential_sigmas": True}, ("ddim", "euler-ancestral"),
     ("euler", "dpmsolver++")),
    (LMSDiscreteScheduler, {"use_beta_sigmas": True}, ("ddpm", "euler-ancestral"), ("euler", "dpmsolver++")),
    (DPMSolverMultistepScheduler, {"use_lu_lambdas": True}, ("ddim", "euler", "euler-ancestral"), ("dpmsolver++",)),
    (EulerDiscreteScheduler, {"final_sigmas_type": "sigma_min"}, ("ddim", "ddpm", "euler-ancestral"),
     ("euler", "dpmsolver++")),
    (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, ("ddim", "euler-ancestral", "dpmsolver++"),
     ("euler",)),
    (EulerDiscreteScheduler, {"timestep_type": "continuous", "prediction_type": "v_prediction"},
     ("ddim", "ddpm", "euler-ancestral", "dpmsolver++"), ("euler",)),
]


@pytest.mark.parametrize(("cls", "option", "dropped", "honoured"), GRID_OPTIONS,
                         ids=[next(iter(option)) for _, option, _, _ in GRID_OPTIONS])
def test_a_grid_option_the_samplers_class_would_drop_is_refused_before_any_forward(cls, option, dropped, honoured):
    """diffusers' from_config drops a key the sampler's class does not take: an Euler-Karras folder sampled with
    euler-ancestral or ddim walked the uniform grid, a continuous-time v-model sampled with ddim was fed integer
    timesteps, without a word. Refused naming the option and the kinds that honour it; those still build it."""
    unet, steps = build_tiny_unet(), 6
    key = next(iter(option))
    for kind in dropped:
        named = rf"{key}=.*\({re.escape(kind)}\).*" + re.escape(f"({', '.join(honoured)})")
        with counting_forwards(unet) as calls, pytest.raises(NotImplementedError, match=named):
            tadq.sample(unet, cls(**option), SamplerConfig(kind, steps), num_samples=1, seed=0, progress=False)
        assert calls[0] == 0
    plain = {k: v for k, v in option.items() if k == "prediction_type"}
    for kind in honoured:  # built, on another grid (or timestep input) than without the option
        with_option, without = (SamplingPlan.build(cls(**config), SamplerConfig(kind, steps))
                                for config in (option, plain))
        assert [(s.t, s.sigma_t, s.sigma_prev) for s in with_option.steps] \
            != [(s.t, s.sigma_t, s.sigma_prev) for s in without.steps]


def test_grid_options_at_values_that_change_nothing_are_not_refused():
    for scheduler in (EulerDiscreteScheduler(timestep_type="continuous"),  # ε-prediction: discrete timesteps anyway
                      EulerDiscreteScheduler(final_sigmas_type="zero", interpolation_type="linear"),
                      DPMSolverMultistepScheduler(use_karras_sigmas=False, use_lu_lambdas=False)):
        for kind in ("ddim", "ddpm", "euler-ancestral"):
            assert SamplingPlan.build(scheduler, SamplerConfig(kind, 4)).num_steps == 4


@pytest.mark.parametrize("schedule", ["sigmoid", "laplace"])
def test_a_beta_schedule_only_ddpm_computes_is_refused_for_the_other_kinds_naming_ddpm(schedule):
    """DDPMScheduler alone computes 'sigmoid' and 'laplace' betas: a DDPM folder with one, sampled with the commands'
    default ddim (or euler, dpmsolver++...), was refused by diffusers' own 'sigmoid is not implemented for
    DDIMScheduler', naming a scheduler the user never chose. Now named by key and kind with the kind that works,
    before any forward; ddpm samples it, and the same betas given as trained_betas drive every kind."""
    unet, train = build_tiny_unet(), DDPMScheduler(beta_schedule=schedule)
    for kind in ("ddim", "euler", "euler-ancestral", "dpmsolver++"):
        named = rf"beta_schedule='{schedule}'.*\({re.escape(kind)}\).*sample it with ddpm\b"
        with counting_forwards(unet) as calls, pytest.raises(NotImplementedError, match=named):
            tadq.sample(unet, train, SamplerConfig(kind, 4), num_samples=1, seed=0, progress=False)
        assert calls[0] == 0
    images = tadq.sample(unet, train, SamplerConfig("ddpm", 4), num_samples=1, seed=0, progress=False).images
    assert torch.isfinite(images).all()
    given = DDPMScheduler(trained_betas=train.betas.numpy(), beta_schedule=schedule)
    assert SamplingPlan.build(given, SamplerConfig("ddim", 4)).num_steps == 4


_DISCRETE_KINDS = ["ddim", "ddpm", "euler", "euler-ancestral", "dpmsolver++"]


@pytest.mark.parametrize("kind", _DISCRETE_KINDS)
def test_a_trailing_step_count_diffusers_gives_one_timestep_too_many_is_refused_naming_counts_that_work(kind):
    """diffusers' 'trailing' float arange yields 62 timesteps (the last t = -1) for 61 steps on 1000: refused as
    "set to 61 steps but the sampler asks for 61; build it with make_scheduler", advice that could not help."""
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    with pytest.raises(ValueError, match=r"62 timesteps for 61 steps .*last t=-1\); use 60 or 62 steps"):
        SamplingPlan.build(scheduler, SamplerConfig(kind, num_steps=61))
    for steps in (60, 62):  # the counts the refusal names do build, every timestep a training one
        times = SamplingPlan.build(scheduler, SamplerConfig(kind, num_steps=steps)).timesteps()
        assert len(times) == steps and 0 <= float(times.min()) and float(times.max()) <= 999


@pytest.mark.parametrize(("kind", "steps"), [("ddim", 1000), ("ddpm", 1000), ("euler", 1000),
                                             ("euler-ancestral", 1000), ("dpmsolver++", 999)])
def test_a_leading_grid_that_steps_offset_lifts_past_the_training_timesteps_is_refused(kind, steps):
    """Stable Diffusion's schedule ('leading', steps_offset=1) at as many steps as training timesteps (DPM-Solver:
    one fewer) starts at t = 1000: ddim and ddpm raised IndexError, dpmsolver++ ZeroDivisionError, and euler ran
    a zero-length first step (σ clamped to σ_999) on a timestep the network never saw."""
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              set_alpha_to_one=False, timestep_spacing="leading")
    with pytest.raises(ValueError, match=rf"visits timestep\(s\) 1000, outside the model's 1000 training timesteps "
                                         rf"\(0 to 999\); use {steps - 1} steps"):
        SamplingPlan.build(scheduler, SamplerConfig(kind, num_steps=steps))
    plan = SamplingPlan.build(scheduler, SamplerConfig(kind, num_steps=steps - 1))
    assert float(plan.timesteps().max()) <= 999
    coefficients = torch.tensor([[s.coef_x, s.coef_eps, s.alpha_prod_t] for s in plan.steps], dtype=torch.float64)
    assert bool(torch.isfinite(coefficients).all())

