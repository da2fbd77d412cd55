"""Inputs of the text-to-image paths that used to fail deep inside diffusers/transformers/torch or silently change
the result (found by a robustness probe): each is refused in one line naming the problem, or now works.

- ``pipe(...)``: a second positional argument (diffusers' ``height``/``prompt_2``), a prompt that is not text, a
  guidance scale in [0, 1) (diffusers: no guidance; tadq's mix: toward the unconditional branch);
- folders: tokenizer config damaged or without ``model_max_length``, a ``tokenizer.json`` that is not one, text
  encoders whose width is not the UNet's ``cross_attention_dim``, a zero VAE ``scaling_factor`` (NaN images), a
  ``force_zeros_for_empty_prompt`` that is not a JSON boolean, an img2img folder named by its class;
- dtype: a pipeline quantized with a bfloat16 FP reference (the prompt embeddings stayed bf16 in front of the
  float32 fake-quant network) and an artefact sampled in bfloat16/float16 (the fused fake-quant kernel takes a
  float32 scale only);
- CLI: ``tadq sample`` with fewer samples than prompts, ``tadq quantize`` at guidance 0, calibration prompts that no
  trajectory gets.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.pipelines.components import PipelineFolderError, check_pipeline_folder
from tadq.quant.qscheme import preset
from tadq.quant.quantizer import Quantizer
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig

runner = CliRunner()
SAMPLER = SamplerConfig("ddim", num_steps=2, eta=0.0)


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _copy(folder, tmp_path, name="copy"):
    return shutil.copytree(folder, tmp_path / name)


def _edit_json(file, **changes):
    content = json.loads(file.read_text())
    content.update(changes)
    file.write_text(json.dumps(content))


@pytest.fixture(scope="module")
def sd_pipe(sd_folder, condition_adapter):
    return tadq.load_pipeline(sd_folder)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder, condition_adapter):
    return tadq.load_pipeline(sdxl_folder)


def test_only_the_prompt_is_positional(sd_pipe, sdxl_pipe):
    # diffusers: pipe(prompt, height, ...) for SD and pipe(prompt, prompt_2, ...) for SDXL: a second positional
    # value read as the negative prompt would silently mean something else
    for pipe in (sd_pipe, sdxl_pipe):
        with pytest.raises(TypeError, match="positional"):
            pipe("a cat", "a dog", num_inference_steps=1)


def test_prompts_that_are_not_text_are_named(sd_pipe):
    with pytest.raises(TypeError, match="prompt must be a str or a list of str, got int"):
        sd_pipe(3, num_inference_steps=1)
    with pytest.raises(TypeError, match="negative_prompt must be a str or a list of str, got int"):
        sd_pipe("a cat", negative_prompt=3, num_inference_steps=1)


@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_guidance_below_one_is_refused(sd_pipe, scale):
    with pytest.raises(ValueError, match="diffusers reads a scale <= 1 as no guidance"):
        sd_pipe("a cat", guidance_scale=scale, num_inference_steps=1, progress=False)


def test_guidance_one_and_above_sample(sd_pipe):
    for scale in (1.0, 1.5):
        latents = sd_pipe("a cat", guidance_scale=scale, num_inference_steps=1, output_type="latent",
                          progress=False).images
        assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_tokenizer_files_are_checked(sd_folder, tmp_path):
    folder = _copy(sd_folder, tmp_path, "config")
    (folder / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": ')
    with pytest.raises(PipelineFolderError, match=r"tokenizer_config.json \(tokenizer config\) is damaged"):
        check_pipeline_folder(folder)
    folder = _copy(sd_folder, tmp_path, "length")
    config = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
    del config["model_max_length"]
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineFolderError, match="sets no model_max_length"):
        check_pipeline_folder(folder)
    folder = _copy(sd_folder, tmp_path, "tokens")
    (folder / "tokenizer" / "tokenizer.json").write_text('{"a": 1}')
    with pytest.raises(PipelineFolderError, match="not a tokenizers file"):
        check_pipeline_folder(folder)
    check_pipeline_folder(sd_folder)  # the intact folder passes


def test_text_encoder_width_must_match_the_unet(sd_folder, sdxl_folder, tmp_path):
    folder = _copy(sd_folder, tmp_path, "sd")
    _edit_json(folder / "text_encoder" / "config.json", hidden_size=24)
    with pytest.raises(PipelineFolderError, match=r"hidden_size \(text_encoder 24\).*cross_attention_dim 16"):
        check_pipeline_folder(folder)
    folder = _copy(sdxl_folder, tmp_path, "sdxl")
    _edit_json(folder / "text_encoder_2" / "config.json", hidden_size=24)
    with pytest.raises(PipelineFolderError, match=r"text_encoder 16 \+ text_encoder_2 24.*cross_attention_dim 32"):
        check_pipeline_folder(folder)


@pytest.mark.parametrize("value", [0, -0.18215, "0.18215"])
def test_vae_scaling_factor_must_be_positive(sd_folder, tmp_path, value):
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "vae" / "config.json", scaling_factor=value)
    with pytest.raises(PipelineFolderError, match="scaling_factor must be a positive number"):
        check_pipeline_folder(folder)


def test_force_zeros_flag_must_be_a_boolean(sdxl_folder, tmp_path):
    folder = _copy(sdxl_folder, tmp_path)
    _edit_json(folder / "model_index.json", force_zeros_for_empty_prompt="false")  # bool("false") is True
    with pytest.raises(PipelineFolderError, match="force_zeros_for_empty_prompt must be true or false"):
        check_pipeline_folder(folder)
    _edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=False)
    assert check_pipeline_folder(folder).index["force_zeros_for_empty_prompt"] is False


def test_an_img2img_folder_is_named_by_its_class(sd_folder, tmp_path):
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionImg2ImgPipeline")
    for args in (["sample", folder, "--prompt", "a cat", "--out", tmp_path / "s"],
                 ["quantize", folder, "--calib-prompt", "a cat", "--out", tmp_path / "q"]):
        result, text = _invoke(args)
        assert result.exit_code == 2 and "names a StableDiffusionImg2ImgPipeline, which tadq does not drive" in text


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_fake_quant_takes_a_cast_scale(dtype):
    scheme, _ = preset("W8A8")
    assert scheme.granularity == "per_channel"
    quantizer = Quantizer(scheme, num_channels=4, kind="weight")
    weight = torch.randn(4, 3)
    quantizer.set_range(weight.amin(dim=1), weight.amax(dim=1))
    reference = quantizer(weight)
    quantizer.to(dtype)
    out = quantizer(weight.to(dtype))
    assert out.dtype == dtype and torch.allclose(out.float(), reference, atol=0.05)


@pytest.fixture(scope="module")
def bf16_artefact(sd_folder, condition_adapter, tmp_path_factory):
    """A pipeline quantized with a bfloat16 FP reference (the calibration's prompt embeddings are bf16)."""
    recipe = Recipe.from_preset("W8A8")
    calibration = dataclasses.replace(recipe.calibration, sampler=SAMPLER, num_trajectories=2, num_steps_kept=2,
                                      samples_per_step=2)
    recipe = dataclasses.replace(recipe, calibration=calibration,
                                 deployments=(Deployment(sampler=SAMPLER, guidance_scale=2.0),))
    pipe = load_fp_pipeline(sd_folder)
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, recipe, dtype="bfloat16", progress=False,
                           conditions=PromptConditions(pipe, ["a cat"]))
    assert next(qmodel.model.parameters()).dtype is torch.float32  # the fake-quant network stays float32
    out = tmp_path_factory.mktemp("bf16") / "art"
    save_pipeline(qmodel, sd_folder, out)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_artefact_samples_in_a_half_dtype(bf16_artefact, dtype):
    pipe = tadq.load_pipeline(bf16_artefact, dtype=dtype)
    reference = tadq.load_pipeline(bf16_artefact)("a cat", output_type="latent", progress=False).images
    latents = pipe("a cat", output_type="latent", progress=False).images
    assert latents.dtype == getattr(torch, dtype) and torch.isfinite(latents.float()).all()
    assert (latents.float() - reference).abs().max() < 0.25


def test_sample_refuses_prompts_no_sample_gets(sd_folder, tmp_path):
    result, text = _invoke(["sample", sd_folder, "--prompt", "a", "--prompt", "b", "--prompt", "c",
                            "--num-samples", 2, "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "--num-samples 2 for 3 prompts" in text and "'c'" in text
    assert not (tmp_path / "s").exists()


def test_quantize_refuses_guidance_below_one_for_prompts(sd_folder, tmp_path):
    result, text = _invoke(["quantize", sd_folder, "--calib-prompt", "a cat", "--guidance-scale", 0,
                            "--out", tmp_path / "q", "--cache-dir", tmp_path / "cache"])
    assert result.exit_code == 2 and "guidance_scale=0: diffusers reads a scale <= 1" in text
    assert not (tmp_path / "q").exists()


def test_quantize_warns_about_unused_calibration_prompts(sd_folder, condition_adapter, tmp_path):
    result, text = _invoke(["quantize", sd_folder, "--calib-prompt", "a", "--calib-prompt", "b", "--calib-prompt", "c",
                            "--guidance-scale", 2, "--steps", 2, "--calib-trajectories", 2, "--out", tmp_path / "q",
                            "--cache-dir", tmp_path / "cache", "--threads", 1])
    assert result.exit_code == 0, text
    assert "3 calibration prompts for 2 calibration trajectories" in text and "last 1 prompts are not used" in text


def test_a_tokenizer_without_a_length_is_named(tmp_path):
    from tests.pipelines.builders import write_tokenizer

    from tadq.pipelines.prompts import PromptEncoder

    tokenizer = write_tokenizer(tmp_path / "tok")
    PromptEncoder((tokenizer,), (torch.nn.Identity(),))  # 16 tokens: fine
    tokenizer.model_max_length = int(1e30)  # what transformers sets without a tokenizer_config.json
    with pytest.raises(ValueError, match="has no model_max_length"):
        PromptEncoder((tokenizer,), (torch.nn.Identity(),))


def test_a_refiner_unet_is_refused_from_its_config(sdxl_folder, tmp_path):
    folder = _copy(sdxl_folder, tmp_path)
    unet = json.loads((folder / "unet" / "config.json").read_text())
    check_pipeline_folder(folder)
    refiner = unet["addition_time_embed_dim"] * 5 + 8  # 5 time ids (aesthetic score) + text_encoder_2's projection
    _edit_json(folder / "model_index.json", requires_aesthetics_score=True)
    _edit_json(folder / "unet" / "config.json", projection_class_embeddings_input_dim=refiner)
    with pytest.raises(PipelineFolderError, match=f"projection_class_embeddings_input_dim {refiner} is not"):
        check_pipeline_folder(folder)
