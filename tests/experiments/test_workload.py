"""The main job on a text-to-image pipeline: prompts for calibration and evaluation kept apart, guidance through
calibration, fits and evaluation, image metrics on VAE-decoded images, the per-step error in latent space."""

from __future__ import annotations

import json

import pytest
from tests.pipelines.builders import build_sd

from tadq.config import CalibrationConfig, ReconstructionConfig
from tadq.experiments.run import RunConfig, run_main_job
from tadq.experiments.workload import load_workload
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=3)
CALIBRATION_PROMPTS = ("a cat", "a dog")
EVALUATION_PROMPTS = ("a dog cat", "cat")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("sd") / "pipe")


def _config(folder, out, **changes) -> RunConfig:
    fields = dict(model=str(folder), presets=("W8A8",), methods=("naive", "tac"), num_samples=4, sampler=SAMPLER,
                  eval_seed=1, batch_size=4, out_dir=str(out), cache_dir=str(out / "cache"), grid_samples=4,
                  calibration=CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2,
                                                samples_per_step=4, seed=0, batch_size=4),
                  reconstruction=ReconstructionConfig(weight_iters=2, activation_iters=2, batch_size=4),
                  guidance_scale=2.0, calibration_prompts=CALIBRATION_PROMPTS, evaluation_prompts=EVALUATION_PROMPTS)
    return RunConfig(**(fields | changes))


def test_text_to_image_main_job_decodes_and_keys_by_prompts_and_guidance(sd_folder, tmp_path):
    results = run_main_job(_config(sd_folder, tmp_path / "run"))
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"FP", "naive PTQ", "Q-Diffusion + TAC"}
    workload = load_workload(str(sd_folder), guidance_scale=2.0, calibration_prompts=CALIBRATION_PROMPTS,
                             evaluation_prompts=EVALUATION_PROMPTS)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    # image metrics read decoded images: the cell's images have the VAE's output shape, not the latents'
    from tadq.experiments.run import load_cell

    cells = [load_cell(path) for path in sorted((tmp_path / "run" / "cells").glob("*.safetensors"))]
    latent_shape = tuple(cells[0]["states"].shape[2:])
    assert tuple(cells[0]["images"].shape[1:]) == workload.image_shape() != latent_shape
    assert len(saved["per_step_mse"]["naive PTQ W8A8"]) == SAMPLER.num_steps + 1
    assert saved["config"]["workload"]["guidance_scale"] == 2.0
    assert rows["naive PTQ"]["psnr"] is not None and rows["naive PTQ"]["prompt_accuracy"] is None
    # a different guidance scale is another workload: no cell is reused
    again = run_main_job(_config(sd_folder, tmp_path / "run", guidance_scale=1.0, methods=("naive",)))
    assert again["config"]["workload"]["guidance_scale"] == 1.0
    assert len(list((tmp_path / "run" / "cells").glob("*.safetensors"))) == 5


def test_text_to_image_workload_refuses_bad_prompt_sets_before_sampling(sd_folder):
    with pytest.raises(ValueError, match="disjoint"):
        load_workload(str(sd_folder), calibration_prompts=("a cat",), evaluation_prompts=("a cat", "a dog"))
    with pytest.raises(ValueError, match="calibration and evaluation prompts"):
        load_workload(str(sd_folder), calibration_prompts=("a cat",))
    with pytest.raises(ValueError, match="too long|longer|tokens"):
        load_workload(str(sd_folder), calibration_prompts=("cat " * 40,), evaluation_prompts=("a dog",))


def test_unconditional_model_takes_no_prompts_or_guidance(tiny_model_dir):
    with pytest.raises(ValueError, match="takes no prompts"):
        load_workload(str(tiny_model_dir), calibration_prompts=("a cat",), evaluation_prompts=("a dog",))
    with pytest.raises(ValueError, match="needs a conditional model"):
        load_workload(str(tiny_model_dir), guidance_scale=3.0)
