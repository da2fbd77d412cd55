"""The main job on a text-to-image pipeline: prompts for calibration and evaluation kept apart, guidance through
calibration, fits and evaluation, image metrics on VAE-decoded images, the per-step error in latent space."""

from __future__ import annotations

import json

import pytest
import torch
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


# ≈ 20 s on a 2-core AVX2 CPU (a Q-Diffusion + TAC row on an SD pipeline): `make test-slow`; the default suite runs the
# main job on an SD pipeline folder through the CLI (tests/experiments/test_user_folders.py)
@pytest.mark.slow
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


def test_prompts_that_differ_only_in_case_or_spacing_are_one_prompt_to_the_encoder(sd_folder):
    # CLIP's tokenizer lower-cases and collapses spaces: these strings differ, the token ids the encoder reads do not
    with pytest.raises(ValueError, match="disjoint.*'A  Cat'.*'a cat'"):
        load_workload(str(sd_folder), calibration_prompts=("A  Cat", "a dog"), evaluation_prompts=("a cat",))
    load_workload(str(sd_folder), calibration_prompts=("a dog",), evaluation_prompts=("a cat",))  # apart: taken


def test_unconditional_model_takes_no_prompts_or_guidance(tiny_model_dir):
    with pytest.raises(ValueError, match="takes no prompts"):
        load_workload(str(tiny_model_dir), calibration_prompts=("a cat",), evaluation_prompts=("a dog",))
    with pytest.raises(ValueError, match="needs a conditional model"):
        load_workload(str(tiny_model_dir), guidance_scale=3.0)


@pytest.fixture
def class_model_dir(tmp_path, ddpm_scheduler):
    """A tiny class-conditional UNet2DModel: 3 real classes and the null class 3."""
    from diffusers import DDPMPipeline
    from tests.conftest import build_tiny_unet

    path = tmp_path / "class-ddpm"
    DDPMPipeline(unet=build_tiny_unet(num_class_embeds=4), scheduler=ddpm_scheduler).save_pretrained(path)
    return path


def test_class_conditional_labels_differ_between_calibration_and_evaluation_seeds(class_model_dir):
    workload = load_workload(str(class_model_dir), labels="random", null_class=3, guidance_scale=2.0)
    calibration = workload.calibration_conditions(0, range(64)).class_labels
    evaluation = workload.evaluation_conditions(1, range(64)).class_labels
    assert set(calibration.tolist()) == set(evaluation.tolist()) == {0, 1, 2}  # never the null class
    assert not torch.equal(calibration, evaluation)
    assert workload.guidance_scale == 2.0 and workload.settings["guidance_scale"] == 2.0
    unconditional = load_workload(str(class_model_dir), labels="null", null_class=3)
    assert unconditional.evaluation_conditions(1, range(5)).class_labels.tolist() == [3] * 5
    assert unconditional.settings["labels"] != workload.settings["labels"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"labels": "null"}, "null_class"),                        # no null class known for a user's model
    ({"guidance_scale": 2.0}, "unconditional"),                # guidance without a null class
    ({"labels": "null", "null_class": 9}, "not a label"),      # beyond the class embeddings
    ({"labels": "sometimes"}, "labels must be one of"),
])
def test_class_conditional_workload_refuses_bad_settings_before_sampling(class_model_dir, changes, message):
    with pytest.raises(ValueError, match=message):
        load_workload(str(class_model_dir), **changes)


def test_unconditional_model_refuses_labels(tiny_model_dir):
    with pytest.raises(ValueError, match="no labels"):
        load_workload(str(tiny_model_dir), labels="random")


def test_class_conditional_main_job_runs_with_guidance(class_model_dir, tmp_path):
    config = _config(class_model_dir, tmp_path / "run", methods=("naive",), calibration_prompts=(),
                     evaluation_prompts=(), labels="random", null_class=3)
    results = run_main_job(config)
    assert [row["method"] for row in results["rows"]] == ["FP", "naive PTQ"]
    assert results["config"]["workload"]["guidance_scale"] == 2.0
    assert results["rows"][1]["psnr"] is not None and results["rows"][1]["fd_digits"] is None


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny random ``DiTPipeline``: a learned-variance DiT (K = 10, null class 10) on the 4×8×8 latents of a
    one-level VAE (3×8×8 images)."""
    from tests.pipelines.builders import build_dit

    return build_dit(tmp_path_factory.mktemp("dit") / "pipe")


def test_dit_pipeline_workload_takes_the_architectures_null_class_and_decodes_with_its_vae(dit_folder):
    workload = load_workload(str(dit_folder), guidance_scale=2.0)  # no --null-class: a DiT's null class is K
    labels = workload.evaluation_conditions(1, range(200))
    assert set(labels.class_labels.tolist()) == set(range(10))
    assert labels.unconditional.class_labels.tolist() == [10] * 200
    assert workload.decoder is not None and workload.image_shape() == (3, 8, 8)
    latents = torch.randn(2, 4, 8, 8)
    images = workload.images(latents)
    assert images.shape == (2, 3, 8, 8) and float(images.abs().max()) <= 1.0
    assert workload.features is None and workload.expected_labels is None  # nothing reads a user's classes


@pytest.mark.slow  # ≈ 35 s; DiT folders through tadq run: test_user_folders.py, stacks on labels: tests/corrections
def test_dit_main_job_runs_every_correction_family_on_dpm_solver(dit_folder, tmp_path):
    sampler = SamplerConfig(kind="dpmsolver++", num_steps=4)
    config = _config(dit_folder, tmp_path / "run", methods=("naive", "tac", "tfmq"), sampler=sampler,
                     calibration=CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2,
                                                   samples_per_step=4, seed=0, batch_size=4),
                     calibration_prompts=(), evaluation_prompts=(), labels="random")
    results = run_main_job(config)
    assert [row["method"] for row in results["rows"]] == ["FP", "naive PTQ", "Q-Diffusion + TAC", "TFMQ-DM"]
    assert all(row["psnr"] is not None and row["psnr"] > 0 for row in results["rows"][1:])


def test_a_pipeline_whose_vae_is_missing_is_refused(dit_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dit_folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match="component folder vae/ .*is missing"):
        load_workload(str(broken))


def test_main_job_on_a_flow_matching_transformer_pipeline(tmp_path):
    """An SD3 pipeline folder: its transformer is the denoiser, prompts through its own encode_prompt, flow-euler,
    images decoded with the VAE's scale and shift."""
    from tests.pipelines.builders_transformer import IMAGE_SIZE, build_sd3

    folder = build_sd3(tmp_path / "sd3")
    flow = SamplerConfig(kind="flow-euler", num_steps=3)
    config = _config(folder, tmp_path / "run", methods=("naive",), sampler=flow,
                     calibration=CalibrationConfig(sampler=flow, num_trajectories=4, num_steps_kept=2,
                                                   samples_per_step=4, seed=0, batch_size=4))
    results = run_main_job(config)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"FP", "naive PTQ"} and rows["naive PTQ"]["psnr"] is not None
    workload = load_workload(str(folder), guidance_scale=2.0, calibration_prompts=CALIBRATION_PROMPTS,
                             evaluation_prompts=EVALUATION_PROMPTS)
    assert type(workload.model).__name__ == "SD3Transformer2DModel"
    assert workload.image_shape() == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_guidance_with_null_labels_names_the_scale_and_both_ways_out(tmp_path):
    """A guided setting with labels='null' (e.g. ``tadq evaluate --labels null`` on an artefact whose recipe guides)
    is refused naming the scale, with labels='random' + null_class or no guidance as the ways out (evaluate takes no
    guidance flag, so the old advice alone could not be followed there)."""
    from tests.conftest import build_tiny_unet

    from tadq.experiments.workload import class_label_setting

    with pytest.raises(ValueError, match=r"guidance \(scale 2\).*--labels random --null-class N.*without guidance"):
        class_label_setting(tmp_path, build_tiny_unet(num_class_embeds=4), guidance_scale=2.0, labels="null",
                            null_class=3)


def test_a_null_class_inside_the_label_table_is_refused(tmp_path):
    """Labels are drawn from [0, null_class): a null class that is not the table's last row (``--null-class 3`` on
    the digits DiT, whose null class is 10) made a real class the unconditional branch and sampled only the
    classes below it, without a word. The last row is taken; a DiT names its architecture's null class."""
    from tests.adapters.test_transformer2d import build_tiny_dit
    from tests.conftest import build_tiny_unet

    from tadq.experiments.workload import class_label_setting

    unet = build_tiny_unet(num_class_embeds=4)
    for labels in ("random", "null"):
        with pytest.raises(ValueError, match=r"null_class=1 is not the last of this model's 4 .*null_class=3"):
            class_label_setting(tmp_path, unet, labels=labels, null_class=1)
    setting = class_label_setting(tmp_path, unet, guidance_scale=2.0, labels="random", null_class=3)
    assert setting.num_classes == 3 and setting.null_class == 3
    dit = build_tiny_dit()
    null = dit.config.num_embeds_ada_norm
    with pytest.raises(ValueError, match=rf"DiTTransformer2DModel's null class is its label {null}"):
        class_label_setting(tmp_path, dit, guidance_scale=2.0, labels="random", null_class=null - 1)
    assert class_label_setting(tmp_path, dit, guidance_scale=2.0, labels="random").null_class == null
