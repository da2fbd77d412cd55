"""``tadq quantize --calib-prompt`` on a pipeline folder and ``tadq sample --prompt`` on the artefact; clean
one-line errors (exit code 2) for prompts a model cannot take, guidance without an unconditional branch, a missing
component and a prompt that is too long."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from tests.backends.machine import needs_compiled_w8, needs_int8_w8
from transformers import CLIPTextModel
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()
LONG = " ".join(["cat"] * 40)


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


@pytest.fixture(scope="module")
def cli_artefact(sd_folder, condition_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    prompts = root / "prompts.txt"
    prompts.write_text("a dog\n\n a cat \n")
    out = root / "art"
    result, text = _invoke(["quantize", sd_folder, "--out", out, "--preset", "W8A8", "--method", "naive",
                            "--steps", 3, "--calib-trajectories", 4, "--calib-prompt", "a dog",
                            "--calib-prompts", prompts, "--guidance-scale", 2.5,
                            "--cache-dir", root / "cache", "--threads", 1])
    assert result.exit_code == 0, text
    return out


def test_quantize_a_pipeline_folder_with_calibration_prompts(cli_artefact, sd_folder):
    assert (cli_artefact / "model_index.json").read_bytes() == (sd_folder / "model_index.json").read_bytes()
    assert isinstance(CLIPTextModel.from_pretrained(cli_artefact / "text_encoder"), CLIPTextModel)
    recipe = json.loads((cli_artefact / "tadq_recipe.json").read_text())
    assert "2.5" in json.dumps(recipe)


def test_sample_with_prompts_writes_images_and_grid(cli_artefact, tmp_path):
    out = tmp_path / "images"
    result, text = _invoke(["sample", cli_artefact, "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt",
                            "dog", "--num-samples", 3, "--seed", 7, "--out", out, "--threads", 1])
    assert result.exit_code == 0, text
    for i in range(3):
        assert Image.open(out / f"sample_{i:04d}.png").size == (8, 8)
    assert Image.open(out / "grid.png").size == (16, 16)  # 3 samples: 2 columns, 2 rows
    record = json.loads((out / "prompts.json").read_text())
    assert record["samples"] == {"sample_0000.png": "a cat", "sample_0001.png": "a dog", "sample_0002.png": "a cat"}
    assert record["guidance_scale"] == 2.5 and record["sampler"]["data"]["num_steps"] == 3  # the recipe's
    first = (out / "sample_0000.png").read_bytes()
    again = tmp_path / "again"
    result, text = _invoke(["sample", cli_artefact, "--prompt", "a cat", "--num-samples", 1, "--seed", 7,
                            "--negative-prompt", "dog", "--out", again, "--threads", 1])
    assert result.exit_code == 0, text
    assert (again / "sample_0000.png").read_bytes() == first  # sample 0: same prompt, seed and noise


def test_prompt_errors_are_clean(cli_artefact, tiny_model_dir, sd_folder, tmp_path):
    result, text = _invoke(["sample", tiny_model_dir, "--prompt", "a cat", "--out", tmp_path / "s.png"])
    assert result.exit_code == 2 and "takes no prompts" in text
    result, text = _invoke(["sample", tiny_model_dir, "--guidance-scale", 3, "--out", tmp_path / "s.png"])
    assert result.exit_code == 2 and "needs an unconditional branch" in text
    result, text = _invoke(["sample", cli_artefact, "--prompt", LONG, "--out", tmp_path / "long"])
    assert result.exit_code == 2 and "tokens long" in text and not (tmp_path / "long").exists()
    result, text = _invoke(["sample", cli_artefact, "--out", tmp_path / "none"])
    assert result.exit_code == 2 and "give at least one --prompt" in text
    result, text = _invoke(["quantize", tiny_model_dir, "--out", tmp_path / "q", "--calib-prompt", "a cat"])
    assert result.exit_code == 2 and "takes no prompts" in text
    result, text = _invoke(["quantize", sd_folder, "--out", tmp_path / "q"])
    assert result.exit_code == 2 and "--calib-prompt" in text
    result, text = _invoke(["quantize", sd_folder, "--out", tmp_path / "q", "--calib-prompt", LONG])
    assert result.exit_code == 2 and "calibration prompt" in text and "tokens long" in text


def test_evaluate_refuses_what_a_text_to_image_artefact_cannot_take_before_loading_it(cli_artefact, sd_folder,
                                                                                     tiny_model_dir, tmp_path):
    """`tadq evaluate` scores a text-to-image artefact on evaluation prompts (the equality with `tadq run`'s row:
    tests/experiments/test_user_folders.py); without prompts for a user's reference, with class labels, an FP folder
    in the artefact's place, or prompt flags for a pixel model, it is one line and nothing is written."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a bird\n")
    report = tmp_path / "report"
    cases = [
        (["--reference", sd_folder], "give --eval-prompts FILE"),
        (["--reference", sd_folder, "--eval-prompts", prompts, "--labels", "random"], "takes no --labels"),
        (["--reference", sd_folder, "--eval-prompts", tmp_path / "none.txt"], "none.txt"),
        (["--reference", sd_folder, "--eval-prompts", prompts, "--negative-prompt", LONG], "negative prompt"),
    ]
    for extra, needle in cases:
        result, text = _invoke(["evaluate", cli_artefact, "--num-samples", 2, "--out", report, *extra])
        assert result.exit_code == 2 and needle in text, text
    result, text = _invoke(["evaluate", sd_folder, "--reference", sd_folder, "--eval-prompts", prompts,
                            "--num-samples", 2, "--out", report])
    assert result.exit_code == 2 and "not a tadq artefact" in text, text
    result, text = _invoke(["evaluate", tiny_model_dir, "--eval-prompts", prompts, "--num-samples", 2])
    assert result.exit_code == 2 and "are for text-to-image artefacts" in text, text
    assert not report.exists()


def test_the_shipped_prompts_refused_by_another_models_artefact_name_the_flags_that_fix_it(cli_artefact, tmp_path):
    """Without a reference or prompts, `tadq evaluate` / `tadq analyze` take the shipped text-to-image model and its
    evaluation prompts; the tiny SD artefact's tokenizer (16 tokens) refuses them, and the refusal only told the
    user to shorten a prompt they never wrote. It names the flags now, before any model is loaded."""
    for command, flag in (("evaluate", "--reference"), ("analyze", "--reference")):
        result, text = _invoke([command, cli_artefact, "--num-samples", 2, "--out", tmp_path / command])
        assert result.exit_code == 2 and "tokens long" in text, text
        assert f"no {flag} or --eval-prompts given" in text and "shipped text-to-image pipeline" in text, text
        assert not (tmp_path / command / "analysis.json").exists()


def test_evaluate_and_analyze_say_a_negative_prompt_is_not_used_without_guidance(cli_artefact, sd_folder, tmp_path):
    """``--negative-prompt`` at guidance 1 enters no branch: `tadq sample` said so, `tadq evaluate` and `tadq analyze`
    scored the prompts alone without a word (and recorded the negative prompt in the report as if it had been
    used); at the recipe's scale (2.5) nothing is said."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a bird\n")
    common = ["--eval-prompts", prompts, "--negative-prompt", "blurry", "--num-samples", 1, "--threads", 1]
    for command, flag in (("evaluate", "--reference"), ("analyze", "--reference")):
        for scale, warned in ((["--guidance-scale", 1], True), ([], False)):
            result, text = _invoke([command, cli_artefact, flag, sd_folder, *common, *scale,
                                    "--out", tmp_path / f"{command}{len(scale)}"])
            assert result.exit_code == 0, text
            assert ("--negative-prompt is not used" in text) is warned, (command, text)


def test_missing_component_is_named_by_the_cli(cli_artefact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cli_artefact, broken)
    shutil.rmtree(broken / "vae")
    result, text = _invoke(["sample", broken, "--prompt", "a cat", "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "vae/" in text and "missing" in text


def test_sample_an_fp_pipeline_folder_with_int8_text_encoder(sd_folder, condition_adapter, tmp_path):
    out = tmp_path / "fp"
    result, text = _invoke(["sample", sd_folder, "--prompt", "a cat", "--num-samples", 2, "--steps", 2,
                            "--guidance-scale", 2, "--text-encoder-bits", 8, "--out", out, "--threads", 1])
    assert result.exit_code == 0, text
    record = json.loads((out / "prompts.json").read_text())
    assert record["text_encoder_bits"] == 8 and record["guidance_scale"] == 2.0
    assert Image.open(out / "grid.png").size == (16, 8)
    result, text = _invoke(["sample", sd_folder, "--prompt", "a cat", "--text-encoder-bits", 3,
                            "--out", tmp_path / "bad"])
    assert result.exit_code == 2 and "text_encoder_bits" in text


def _latents(path):
    from safetensors.torch import load_file

    return load_file(str(path))["latents"]


@needs_int8_w8
@pytest.mark.parametrize("integer", ["int8",
                                     pytest.param("int8-compiled", marks=[pytest.mark.slow, needs_compiled_w8])])
def test_sample_a_pipeline_artefact_on_an_integer_backend_agrees_with_fake_quant(cli_artefact, tmp_path, integer):
    """The quantized UNet of a text-to-image artefact in int8 kernels, text encoders and VAE in float: the latents
    from the same prompts and noise agree with the simulation (median PSNR ≥ 40 dB, the issue's goal)."""
    from tadq.metrics.image import psnr_per_sample

    runs = {}
    for backend in ("fake", integer):
        out, tensors = tmp_path / backend, tmp_path / f"{backend}.safetensors"
        result, text = _invoke(["sample", cli_artefact, "--backend", backend, "--prompt", "a cat", "--prompt",
                                "a dog", "--num-samples", 4, "--seed", 11, "--out", out, "--tensor-out", tensors,
                                "--threads", 1])
        assert result.exit_code == 0, text
        assert json.loads((out / "prompts.json").read_text())["backend"] == backend
        runs[backend] = _latents(tensors)
    assert not torch.equal(runs[integer], runs["fake"])  # integer kernels ran, not the simulation
    assert psnr_per_sample(runs[integer], runs["fake"]).median() >= 40.0


def test_pipeline_backend_refusals_are_clean(cli_artefact, sd_folder, tmp_path):
    result, text = _invoke(["sample", sd_folder, "--backend", "int8", "--prompt", "a cat", "--out", tmp_path / "a"])
    assert result.exit_code == 2 and ("FP pipeline folder" in text or "not available" in text), text
    result, text = _invoke(["sample", cli_artefact, "--backend", "int8", "--dtype", "bfloat16", "--prompt", "a cat",
                            "--out", tmp_path / "b"])
    assert result.exit_code == 2 and "float32" in text, text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sample_interrupted_while_moving_its_files_leaves_no_prompts_json_describing_them(
        sd_folder, condition_adapter, tmp_path, monkeypatch):
    """A rerun into a samples folder moves its files in one by one: an interrupt (or a kill) between two renames
    left the earlier run's prompts.json describing a folder that held this run's first samples and the earlier
    run's others. Now prompts.json goes first and comes last: a folder holding one is whole."""
    import os

    out = tmp_path / "images"
    args = ["sample", sd_folder, "--prompt", "a cat", "--num-samples", 2, "--steps", 2, "--out", out,
            "--threads", 1]
    result, text = _invoke([*args, "--seed", 1])
    assert result.exit_code == 0, text
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    real_replace = os.replace

    def interrupted(source, target, *rest, **kwargs):
        if os.path.basename(source) == "sample_0001.png":
            raise KeyboardInterrupt
        return real_replace(source, target, *rest, **kwargs)

    monkeypatch.setattr(os, "replace", interrupted)
    result, text = _invoke([*args, "--seed", 2])
    monkeypatch.undo()
    assert result.exit_code not in (0, None), text  # the interrupt ended the command
    assert (out / "sample_0000.png").read_bytes() != before["sample_0000.png"]  # the interrupt came in the middle
    assert (out / "sample_0001.png").read_bytes() == before["sample_0001.png"]
    assert not (out / "prompts.json").exists()
    result, text = _invoke([*args, "--seed", 2])  # the rerun finishes the folder
    assert result.exit_code == 0, text
    assert json.loads((out / "prompts.json").read_text())["seed"] == 2


def test_sample_on_a_full_disk_names_the_folder_and_leaves_nothing(sd_folder, condition_adapter, tmp_path,
                                                                    monkeypatch):
    """PIL's OSError for a full disk names no file: the one-line error said "No space left on device" alone."""
    import errno
    import os

    def disk_full(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    out = tmp_path / "images"
    result, text = _invoke(["sample", sd_folder, "--prompt", "a cat", "--num-samples", 2, "--steps", 2, "--out", out,
                            "--threads", 1])
    assert result.exit_code == 2 and f"{out}: {os.strerror(errno.ENOSPC)}" in text, text
    assert [path.name for path in tmp_path.iterdir()] == []  # no staging folder, no half-written PNG


def test_evaluate_refuses_a_reference_pipeline_whose_scheduler_predicts_another_quantity(cli_artefact, sd_folder,
                                                                                          tmp_path):
    """A text-to-image reference is sampled with the artefact's scheduler too: an SD folder whose scheduler says
    v-prediction (the artefact's: ε) had its output read as ε and was scored without a word; refused before the
    reference is sampled, naming both folders and the field."""
    from diffusers import DDIMScheduler
    from tests.pipelines.builders import with_scheduler

    reference = with_scheduler(sd_folder, tmp_path / "sd-v", DDIMScheduler.from_pretrained(
        sd_folder / "scheduler", prediction_type="v_prediction"))
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a bird\n")
    result, text = _invoke(["evaluate", cli_artefact, "--reference", reference, "--eval-prompts", prompts,
                            "--num-samples", 1, "--threads", 1, "--out", tmp_path / "report"])
    assert result.exit_code == 2, text
    assert f"--reference {reference}" in text and f"({cli_artefact})" in text, text
    assert "prediction_type: 'epsilon'" in text and "'v_prediction'" in text, text
    assert not (tmp_path / "report" / "results.json").exists()
