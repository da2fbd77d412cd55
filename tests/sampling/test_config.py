"""SamplerConfig validation, make_scheduler and StepContext construction."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from tadq.sampling import SamplerConfig, make_scheduler, step_contexts


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "heun"},
        {"kind": "euler", "eta": 0.5},
        {"kind": "euler", "clip_sample": True},
        {"kind": "euler", "order": 2},
        {"kind": "dpmsolver++", "order": 3},
        {"kind": "dpmsolver++", "order": True},
        {"kind": "ddim", "shift": 3.0},
        {"kind": "flow-euler", "shift": 0.0},
        {"kind": "flow-euler", "shift": float("inf")},
        {"kind": "ddim", "num_steps": 0},
        {"kind": "ddim", "num_steps": 2.5},
        {"kind": "ddim", "eta": -0.1},
        {"kind": "ddim", "eta": 1.5},
        {"kind": "ddim", "eta": float("nan")},
        {"kind": "ddpm", "eta": 0.5},
        {"kind": "ddim", "clip_sample": "yes"},
    ],
)
def test_bad_configs_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplerConfig(**kwargs)


def test_keys() -> None:
    assert SamplerConfig("ddim").key == "ddim-50-eta0.0"
    assert SamplerConfig("ddim", num_steps=20, eta=1).key == "ddim-20-eta1.0"
    assert SamplerConfig("ddpm", num_steps=1000).key == "ddpm-1000"


@pytest.mark.parametrize("clip", [None, True, False])
def test_make_scheduler_keeps_the_training_schedule(clip: bool | None) -> None:
    train = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sampler = SamplerConfig("ddim", num_steps=20, clip_sample=clip)
    for source in (train, train.config):
        scheduler = make_scheduler(source, sampler)
        assert isinstance(scheduler, DDIMScheduler)
        assert scheduler.num_inference_steps == 20
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
        assert scheduler.config.clip_sample == (True if clip is None else clip)


def test_step_contexts_describe_the_grid() -> None:
    sampler = SamplerConfig("ddim", num_steps=10, eta=0.5, clip_sample=False)
    scheduler = make_scheduler(DDPMScheduler(), sampler)
    steps = step_contexts(scheduler, sampler)
    assert [s.t for s in steps] == scheduler.timesteps.tolist()
    assert [s.index for s in steps] == list(range(10))
    assert [s.t_prev for s in steps[:-1]] == [s.t for s in steps[1:]] and steps[-1].t_prev == -1
    assert steps[-1].alpha_prod_t_prev == 1.0 and steps[-1].is_last
    assert all(s.sampler_key == "ddim-10-eta0.5" and s.clip_sample_range is None for s in steps)


def test_step_contexts_reject_a_mismatched_scheduler() -> None:
    sampler = SamplerConfig("ddim", num_steps=10)
    with pytest.raises(TypeError, match="make_scheduler"):
        step_contexts(make_scheduler(DDPMScheduler(), SamplerConfig("ddpm", num_steps=10)), sampler)
    with pytest.raises(ValueError, match="steps"):
        step_contexts(make_scheduler(DDPMScheduler(), SamplerConfig("ddim", num_steps=20)), sampler)
    with pytest.raises(ValueError, match="clip_sample"):
        step_contexts(make_scheduler(DDPMScheduler(clip_sample=True), sampler), SamplerConfig("ddim", 10, 0, False))


def test_linspace_ddim_grid_warns(caplog: pytest.LogCaptureFixture) -> None:
    """diffusers' DDIM steps t -> t - N//S, which leaves the linspace grid; tadq follows it but says so."""
    sampler = SamplerConfig("ddim", num_steps=50)
    with caplog.at_level(logging.WARNING, logger="tadq.sampling.context"):
        step_contexts(make_scheduler(DDPMScheduler(timestep_spacing="linspace"), sampler), sampler)
    assert "not the next grid timestep" in caplog.text


@pytest.mark.parametrize("scheduler_class", ["ScoreSdeVeScheduler", "UniPCMultistepScheduler",
                                             "HeunDiscreteScheduler", "DPMSolverSinglestepScheduler"])
def test_schedulers_tadq_cannot_drive_are_refused_by_name(scheduler_class: str) -> None:
    import diffusers

    scheduler = getattr(diffusers, scheduler_class)()
    sampler = SamplerConfig("ddim", num_steps=10)
    with pytest.raises(NotImplementedError, match=scheduler_class):
        make_scheduler(scheduler, sampler)
    with pytest.raises(NotImplementedError, match=scheduler_class):
        make_scheduler({**scheduler.config, "_class_name": scheduler_class}, sampler)


def test_a_bare_config_of_another_scheduler_family_is_refused() -> None:
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(NotImplementedError, match="solver_order"):
        make_scheduler(dict(DPMSolverMultistepScheduler().config), SamplerConfig("ddim", num_steps=10))


def test_ddim_and_ddpm_training_configs_are_driven() -> None:
    from diffusers import DDIMScheduler

    for source in (DDPMScheduler(prediction_type="v_prediction"), DDIMScheduler(prediction_type="sample")):
        assert make_scheduler(source, SamplerConfig("ddpm", num_steps=5)).num_inference_steps == 5


@pytest.mark.parametrize("class_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler",
                                        "LMSDiscreteScheduler"])
def test_model_loading_keeps_a_discrete_training_schedule_of_another_class(tiny_model_dir, class_name: str) -> None:
    """The folder's class names the sampler it ships with; its betas are the training schedule any ε kind uses."""
    import json

    from tadq.models import load_pipeline_parts
    from tadq.sampling import SamplingPlan

    config_file = tiny_model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": class_name}))
    _, scheduler = load_pipeline_parts(tiny_model_dir)
    assert type(scheduler).__name__ == class_name
    reference = DDPMScheduler.from_config(config)
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)
    ddim = SamplingPlan.build(scheduler, SamplerConfig("ddim", num_steps=10))  # the user's choice is kept
    assert ddim.steps == SamplingPlan.build(reference, SamplerConfig("ddim", num_steps=10)).steps


def test_model_loading_refuses_a_foreign_scheduler(tiny_model_dir) -> None:
    import json

    from tadq.models import load_pipeline_parts

    config_file = tiny_model_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "UniPCMultistepScheduler"}))
    with pytest.raises(NotImplementedError, match="UniPCMultistepScheduler"):
        load_pipeline_parts(tiny_model_dir)


def test_model_loading_reads_a_flow_matching_schedule_that_only_flow_euler_drives(tiny_model_dir) -> None:
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler

    from tadq.models import load_pipeline_parts
    from tadq.sampling import SamplingPlan, default_sampler

    config_file = tiny_model_dir / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                                       "_class_name": "FlowMatchEulerDiscreteScheduler"}))
    _, scheduler = load_pipeline_parts(tiny_model_dir)
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.shift == 3.0
    assert default_sampler(scheduler, 28) == SamplerConfig("flow-euler", 28)
    assert SamplingPlan.build(scheduler, SamplerConfig("flow-euler", 28)).steps[0].prediction_type == \
        "flow_prediction"
    with pytest.raises(NotImplementedError, match="flow"):
        SamplingPlan.build(scheduler, SamplerConfig("ddim", 28))  # the CLI's default is refused, not used
