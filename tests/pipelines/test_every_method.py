"""Every method on tiny SD and SDXL pipelines: a short Q-Diffusion base with PTQD, TAC and TCEC fitted on guided
trajectories from calibration prompts, sampled with other prompts, saved with the pipeline layout and reloaded
bit-identically; the tables refuse another guidance scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tadq
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.recipe import Deployment, QDiffusionMethod, Recipe
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig("ddim", num_steps=3, eta=0.0)
GUIDANCE = 2.0
CALIBRATION_PROMPTS = ["a cat", "a dog"]
EVALUATION_PROMPTS = ["cat", "dog"]


def _recipe() -> Recipe:
    recipe = Recipe.from_preset("W4A8", split_shortcut=True, quantize_attention=True)
    calibration = dataclasses.replace(recipe.calibration, sampler=SAMPLER, num_trajectories=4, num_steps_kept=3,
                                      samples_per_step=4, batch_size=4)
    reconstruction = dataclasses.replace(QDiffusionMethod().reconstruction, weight_iters=2, activation_iters=2,
                                         batch_size=4)
    corrections = (PTQDConfig(num_samples=4, seed=1), TACConfig(num_samples=4, seed=2),
                   TCECConfig(num_samples=4, seed=3, select=False))
    return dataclasses.replace(recipe, method=QDiffusionMethod(reconstruction), calibration=calibration,
                               corrections=corrections, deployments=(Deployment(SAMPLER, GUIDANCE),))


@pytest.mark.parametrize("which", ["sd", pytest.param("sdxl", marks=pytest.mark.slow)])  # SDXL: `make test-slow`
def test_qdiffusion_with_every_correction_round_trips(which, sd_folder, sdxl_folder, condition_adapter, tmp_path):
    folder = sd_folder if which == "sd" else sdxl_folder
    pipe = load_fp_pipeline(folder)
    calibration = PromptConditions(pipe, CALIBRATION_PROMPTS)
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, _recipe(), conditions=calibration, progress=False,
                           fit_batch_size=4)
    assert [member.table_key.guidance_scale for member in qmodel.corrections] == [GUIDANCE] * 3
    evaluation = PromptConditions(pipe, EVALUATION_PROMPTS)

    def run(model, scheduler, guidance=GUIDANCE):
        return tadq.sample(model, scheduler, SAMPLER, num_samples=2, seed=9, conditions=evaluation,
                           guidance_scale=guidance, progress=False).images

    images = run(qmodel, pipe.scheduler)
    assert torch.isfinite(images).all()
    save_pipeline(qmodel, folder, tmp_path / "art")
    loaded, scheduler = tadq.load(tmp_path / "art")
    assert torch.equal(run(loaded, scheduler), images)
    with pytest.raises(ValueError, match="guidance scale"):
        run(loaded, scheduler, guidance=1.0)
    # the diffusers-style call uses the same tables
    latents = tadq.load_pipeline(tmp_path / "art")(EVALUATION_PROMPTS, guidance_scale=GUIDANCE, seed=9,
                                                   output_type="latent", progress=False).images
    assert torch.equal(latents, images)


@pytest.mark.parametrize("scheduler_class", ["PNDMScheduler", "EulerDiscreteScheduler"])
def test_released_scheduler_configs_are_training_schedules(scheduler_class, sd_folder, condition_adapter, tmp_path):
    """A released SD folder ships a PNDM or Euler config: it gives the noise schedule, the recipe the sampler."""
    import json
    import shutil

    import diffusers

    folder = tmp_path / "sd"
    shutil.copytree(sd_folder, folder)
    shutil.rmtree(folder / "scheduler")
    getattr(diffusers, scheduler_class)(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", scheduler_class]}))
    pipe = load_fp_pipeline(folder)
    assert type(pipe.scheduler).__name__ == scheduler_class
    sampler = SamplerConfig("euler", num_steps=3)
    recipe = Recipe.from_preset("W8A8")
    recipe = dataclasses.replace(recipe, deployments=(Deployment(sampler, GUIDANCE),), calibration=dataclasses.replace(
        recipe.calibration, sampler=sampler, num_trajectories=4, num_steps_kept=3, samples_per_step=4))
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, recipe, conditions=PromptConditions(pipe, CALIBRATION_PROMPTS),
                           progress=False)
    save_pipeline(qmodel, folder, tmp_path / "art")
    latents = tadq.load_pipeline(tmp_path / "art")("cat", guidance_scale=GUIDANCE, seed=1, output_type="latent",
                                                   progress=False).images
    direct = tadq.sample(qmodel, pipe.scheduler, sampler, num_samples=1, seed=1, progress=False,
                         conditions=PromptConditions(pipe, ["cat"]), guidance_scale=GUIDANCE).images
    assert torch.equal(latents, direct) and torch.isfinite(latents).all()
