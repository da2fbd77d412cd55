"""Unusual or damaged inputs on the transformer text-to-image paths (PixArt-α, SD3, Flux): folders as they are
found in the wild (T5 tokenizers without a usable ``model_max_length``, sentencepiece-only tokenizers, SD3 without
its T5, broken configs), calls as diffusers users write them (FLUX.1-schnell's ``guidance_scale=0.0``,
``true_cfg_scale`` without a negative prompt, another sampler kind), schedulers with a resolution-dependent shift,
and the commands around an artefact (int8 backend, ``tadq run``, ``tadq analyze``).

Each test says in its docstring what a user expects (the first group was found failing and fixed; the last pins
behaviour that could silently regress). Every comparison with diffusers runs diffusers' own ``__call__`` from the
same noise, as ``test_transformer_pipelines.py`` does.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusion3Pipeline,
)
from tests.backends.machine import needs_int8_w8
from tests.pipelines import builders_transformer as tiny
from tests.pipelines.builders_transformer import IMAGE_SIZE, build_flux, build_pixart, build_sd3
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.pipelines.components import PipelineFolderError, check_pipeline_folder, pipeline_denoiser
from tadq.pipelines.quantized import check_drivable_scheduler
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig
from tadq.sampling.noise import initial_noise

STEPS = 3
GUIDANCE = 3.0
PROMPTS = ["a cat", "a red dog"]
SAMPLERS = {"pixart": "dpmsolver++", "sd3": "flow-euler", "flux": "flow-euler"}
runner = CliRunner()


def _invoke(args) -> tuple[object, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


def _copy(folder, destination):
    return shutil.copytree(folder, destination)


def _edit_json(file, drop: tuple[str, ...] = (), **changes) -> None:
    content = json.loads(file.read_text())
    for key in drop:
        content.pop(key, None)
    content.update(changes)
    file.write_text(json.dumps(content))


def _tolerance(reference: torch.Tensor, steps: int = STEPS) -> float:
    """A few float32 ulps of the largest value per step (the same operations, summed in another order)."""
    return 16 * steps * torch.finfo(torch.float32).eps * float(reference.abs().max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-inputs")
    return {
        "pixart": build_pixart(root / "pixart"),
        "sd3": build_sd3(root / "sd3"),
        "flux": build_flux(root / "flux"),
        "schnell": build_flux(root / "schnell", guidance_embeds=False),
    }


def _tadq_latents(pipe, prompts=PROMPTS, **call) -> torch.Tensor:
    """The pipeline's latent output as (N, C, h, w): Flux's packed sequence unpacked as FluxPipeline unpacks it."""
    latents = pipe(list(prompts), seed=5, num_inference_steps=STEPS, output_type="latent", progress=False,
                   **call).images
    return _unpacked(pipe, latents)


def _unpacked(pipe, latents: torch.Tensor) -> torch.Tensor:
    """A pipeline's ``output_type="latent"`` output as (N, C, h, w) (Flux's packed sequence unpacked)."""
    base = type(pipe).tadq_base
    if base.__name__ != "FluxPipeline":
        return latents
    return base._unpack_latents(latents, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)


def test_flux_latent_output_is_fluxpipelines_packed_sequence(folders):
    """``output_type="latent"`` gives what FluxPipeline gives: the packed (N, (h/2)(w/2), 4C) token sequence, which
    diffusers code unpacks with ``_unpack_latents`` before decoding (tadq returned the unpacked (N, C, h, w))."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["flux"])
    packed = pipe(list(PROMPTS), seed=5, num_inference_steps=STEPS, output_type="latent", progress=False).images
    sampler, scale = pipe.tadq_deployment(STEPS, None, None)
    latents = pipe.tadq_latents(PromptConditions(pipe.tadq_prompt_encoder(None, None), list(PROMPTS)),
                                len(PROMPTS), sampler, scale, seed=5, progress=False)
    channels, height, width = latents.shape[1:]
    assert packed.shape == (len(PROMPTS), (height // 2) * (width // 2), 4 * channels)
    unpacked = type(pipe).tadq_base._unpack_latents(packed, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)
    assert torch.equal(unpacked, latents)


def _diffusers_latents(which: str, pipe, prompts, noise: torch.Tensor, **call) -> torch.Tensor:
    """diffusers' own ``__call__`` of the pipeline's class from ``noise`` (unpacked (N, C, h, w) latents)."""
    base = getattr(type(pipe), "tadq_base", type(pipe))
    common = {"num_inference_steps": STEPS, "output_type": "latent", "return_dict": False, "height": IMAGE_SIZE,
              "width": IMAGE_SIZE}
    if which == "pixart":
        call.setdefault("negative_prompt", "")
        return base.__call__(pipe, list(prompts), latents=noise, use_resolution_binning=False, clean_caption=False,
                             **common, **call)[0]
    if which == "sd3":
        return base.__call__(pipe, list(prompts), latents=noise, **common, **call)[0]
    packed = base._pack_latents(noise, *noise.shape)  # FluxPipeline on its own σ grid, linspace(1, 1/N, N)
    out = base.__call__(pipe, list(prompts), latents=packed, **common, **call)[0]
    return base._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)


def _same_noise(latents: torch.Tensor) -> torch.Tensor:
    return initial_noise(5, range(latents.shape[0]), latents.shape[1:])


# --- tokenizers -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["missing", "transformers-placeholder"])
@pytest.mark.parametrize(("which", "component"), [("pixart", "tokenizer"), ("sd3", "tokenizer_3")])
def test_a_t5_tokenizer_needs_no_model_max_length(folders, tmp_path, which, component, how):
    """A T5 tokenizer saved by transformers without an explicit length writes ``model_max_length`` =
    1000000000000000019884624838656 (its "no limit" placeholder), and older ones write none at all. diffusers loads
    and runs such a folder (the T5 side reads ``max_sequence_length``, never ``model_max_length``), and so does
    tadq's own prompt check, which holds T5 prompts to ``max_sequence_length``. A user expects tadq to sample it
    like the same folder with a length; today ``check_pipeline_folder`` refuses it ("sets no model_max_length ...
    CLIP's is 77"), a rule only CLIP tokenizers need."""
    torch.set_num_threads(1)
    folder = _copy(folders[which], tmp_path / "copy")
    config = folder / component / "tokenizer_config.json"
    if how == "missing":
        _edit_json(config, drop=("model_max_length",))
    else:
        _edit_json(config, model_max_length=1000000000000000019884624838656)
    expected = _tadq_latents(tadq.load_pipeline(folders[which]))
    assert torch.equal(_tadq_latents(tadq.load_pipeline(folder)), expected)  # the same embeddings, the same images


def test_a_t5_tokenizer_without_its_files_is_named_by_the_files_t5_needs(folders, tmp_path):
    """A T5 tokenizer folder is ``tokenizer.json`` (fast) or ``spiece.model`` (sentencepiece). With both gone, a
    user expects to be told one of those is missing; today the check falls through to CLIP's files and reports
    "vocab.json (tokenizer vocabulary) is missing", a file no T5 tokenizer ever had."""
    folder = _copy(folders["pixart"], tmp_path / "copy")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(PipelineFolderError, match=r"tokenizer\.json|spiece\.model"):
        check_pipeline_folder(folder)


def test_a_sentencepiece_only_t5_tokenizer_that_cannot_be_read_is_named(folders, tmp_path):
    """T5 tokenizers are often published as sentencepiece only (``spiece.model``, no ``tokenizer.json``; PixArt-α's
    model card asks for the ``sentencepiece`` package); reading one needs that package, which tadq does not depend
    on and this environment lacks. ``check_pipeline_folder`` accepts any non-empty ``spiece.model``; when
    transformers then cannot read it (package absent, or the file damaged), the user expects an error naming
    spiece.model / sentencepiece. Today transformers falls back to its TikToken reader and the CLI prints
    "`tiktoken` is required to read a `tiktoken` file", naming neither."""
    folder = _copy(folders["pixart"], tmp_path / "copy")
    (folder / "tokenizer" / "tokenizer.json").unlink()
    (folder / "tokenizer" / "spiece.model").write_bytes(b"not a sentencepiece model" * 8)
    result, output = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--steps", 1, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 2, output
    assert "spiece" in output or "sentencepiece" in output, output


# --- SD3 without its T5 -----------------------------------------------------------------------------------------


def test_sd3_without_its_t5_encoder_samples_as_diffusers_does(folders, tmp_path):
    """diffusers documents dropping SD3's T5 (``text_encoder_3=None, tokenizer_3=None``): ``encode_prompt`` then
    gives zeros for the T5 part. tadq's ``PIPELINE_COMPONENTS`` lets text_encoder_3 / tokenizer_3 be null in
    ``model_index.json`` for exactly this, and ``check_pipeline_folder`` passes such a folder; but
    ``tadq.load_pipeline`` (and ``tadq sample`` / ``tadq quantize``) then call ``from_pretrained`` without saying
    the two are None, and diffusers fails after loading every other component: "Pipeline ... expected [...,
    'text_encoder_3', ..., 'tokenizer_3', ...] but only {...} were passed". A user expects diffusers' images."""
    torch.set_num_threads(1)
    folder = _copy(folders["sd3"], tmp_path / "sd3-no-t5")
    _edit_json(folder / "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    shutil.rmtree(folder / "text_encoder_3")
    shutil.rmtree(folder / "tokenizer_3")
    check_pipeline_folder(folder)  # accepted on purpose (components.py)
    pipe = tadq.load_pipeline(folder)
    assert pipe.text_encoder_3 is None
    ours = _tadq_latents(pipe, guidance_scale=GUIDANCE)
    theirs_pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    theirs = _diffusers_latents("sd3", theirs_pipe, PROMPTS, _same_noise(ours), guidance_scale=GUIDANCE)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs))


# --- Flux guidance ----------------------------------------------------------------------------------------------


def test_flux_true_cfg_scale_without_a_negative_prompt_is_diffusers_or_refused(folders):
    """``FluxPipeline`` runs true classifier-free guidance only when ``true_cfg_scale > 1`` *and* a negative prompt
    is given (``do_true_cfg = true_cfg_scale > 1 and has_neg_prompt``); without one it samples one branch. tadq's
    pipeline, documented as "classifier-free guidance is true_cfg_scale ..., as in FluxPipeline", guides against ""
    instead, so ``pipe(prompt, true_cfg_scale=2)`` gives other images than the diffusers call it imitates (max
    |Δ| ≈ 0.1 on latents of size ≈ 4 here). A user expects diffusers' images, or a refusal asking for a negative
    prompt. (test_transformer_pipelines.py currently pins the "" behaviour and would change with the fix.)"""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["flux"])
    try:
        ours = _tadq_latents(pipe, true_cfg_scale=2.0)
    except ValueError as error:  # a refusal is an acceptable fix
        assert "negative" in str(error)
        return
    theirs = _diffusers_latents("flux", pipe, PROMPTS, _same_noise(ours), true_cfg_scale=2.0)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs))


def test_flux_schnell_takes_its_model_cards_guidance_scale_zero(folders):
    """FLUX.1-schnell's transformer has no guidance embedding, and its model card calls
    ``pipe(prompt, guidance_scale=0.0, num_inference_steps=4, ...)``; diffusers ignores ``guidance_scale`` for such a
    transformer. tadq refuses that call ("distilled_guidance=0: this FluxPipeline's transformer embeds no guidance
    scale"), so the documented diffusers call of the model fails. A user expects the images of the call without
    it."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["schnell"])
    assert torch.equal(_tadq_latents(pipe, guidance_scale=0.0), _tadq_latents(pipe))


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_flux_distilled_guidance_must_be_finite(folders, scale):
    """Classifier-free guidance refuses a non-finite scale ("guidance_scale must be a finite float"), but Flux's
    ``guidance_scale`` (the distilled scale the transformer embeds) is taken as is: NaN or inf reaches the model and
    ``pipe(...).images`` comes back all NaN without a word. A user expects the same ValueError."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["flux"])
    with pytest.raises(ValueError, match="guidance"):  # today: no error, and every latent is NaN
        pipe("a cat", guidance_scale=scale, num_inference_steps=2, output_type="latent", progress=False)


def test_flux_artefact_with_fitted_corrections_refuses_another_distilled_guidance(folders, tmp_path):
    """Per-step correction tables are fitted on trajectories at one guidance: a Flux artefact is calibrated and
    fitted at the distilled default 3.5 (docs/pipelines.md). Changing classifier-free guidance on it is refused
    ("TACCorrection was fitted at guidance_scale=1, not 2"), but changing the distilled scale, which changes the
    model's input just as much, is accepted silently: ``pipe(prompt, guidance_scale=5.0)`` applies tables fitted at
    3.5. A user expects the same refusal (or the artefact to record the distilled scale it was fitted at)."""
    torch.set_num_threads(1)
    art = tmp_path / "flux-tac"
    result, output = _invoke(["quantize", folders["flux"], "--out", art, "--preset", "W8A8", "--method", "naive",
                              "--correct", "tac", "--set", "corrections.0.num_samples=4", "--sampler", "flow-euler",
                              "--steps", 2, "--calib-trajectories", 2, "--calib-prompt", "a cat", "--cache-dir",
                              tmp_path / "cache", "--threads", 1])
    assert result.exit_code == 0, output
    pipe = tadq.load_pipeline(art)
    pipe("a cat", output_type="latent", progress=False)  # the fitted setting runs
    with pytest.raises(ValueError, match="fitted"):
        pipe("a cat", guidance_scale=5.0, output_type="latent", progress=False)


# --- samplers and schedulers ------------------------------------------------------------------------------------


def test_another_sampler_kind_on_pixart_drops_dpmsolvers_order(folders, tmp_path):
    """PixArt ships DPM-Solver++ 2M, so its default sampler carries ``order=2``. Asking for another kind that
    drives its schedule (``--sampler ddim``, ``euler``, ``ddpm``; ``tadq run --sampler ddim`` works on it) is
    refused by ``tadq sample`` and ``pipe.tadq_deployment(..., kind=...)`` with "SamplerConfig.order=2: ddim is a
    first-order sampler", an order the user never gave: ``resolve_deployment`` replaces the kind but keeps the
    order (``deployment_sampler`` of the non-pipeline path drops order and shift on a kind change). A user expects
    DDIM samples."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["pixart"])
    sampler, _ = pipe.tadq_deployment(2, None, None, "ddim")
    assert sampler.kind == "ddim" and sampler.order is None and sampler.num_steps == 2
    result, output = _invoke(["sample", folders["pixart"], "--sampler", "ddim", "--steps", 2, "--prompt", "a cat",
                              "--num-samples", 1, "--out", tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 0, output


def test_ddim_on_pixart_says_it_clips_latents_unless_clip_sample_is_given(folders, caplog):
    """PixArt's DPM-Solver config names no clip_sample, so a DDIM built from it clips x̂₀ to ±1 (DDIM's default, as
    diffusers' from_config does) on latents that are not bounded to [-1, 1]: said with the fix; silent when the
    user chose the clipping either way."""
    import logging

    pipe = tadq.load_pipeline(folders["pixart"])
    with caplog.at_level(logging.WARNING, logger="tadq.pipelines.quantized"):
        sampler, _ = pipe.tadq_deployment(2, None, None, "ddim")
    assert "ddim on this latent pipeline clips x̂₀ to ±1" in caplog.text and "clip_sample=False" in caplog.text
    assert tadq.sampling.make_scheduler(pipe.scheduler, sampler).config.clip_sample  # what the warning says
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tadq.pipelines.quantized"):
        pipe.tadq_deployment(2, None, None, None)  # its own DPM-Solver never clips
    assert "clips" not in caplog.text


_DYNAMIC = {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
            "max_image_seq_len": 4096}


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_sd3_with_a_resolution_dependent_shift_walks_diffusers_grid(folders, tmp_path, shift_type):
    """``StableDiffusion3Pipeline`` with a ``use_dynamic_shifting`` scheduler computes μ for the image and calls
    ``set_timesteps(N, mu=μ)``: the scheduler's σ range stays unshifted and the shift of μ is applied once (with
    ``time_shift_type`` "exponential": exp(μ), "linear": μ). tadq turns μ into a static ``shift=exp(μ)`` and
    rebuilds the scheduler with ``use_dynamic_shifting=False``, which shifts σ_min at construction and the grid
    again in ``set_timesteps``, and ignores ``time_shift_type``: at 4 steps and 4096 tokens the last σ is 0.0099
    instead of 0.0032. So the FP loop no longer equals diffusers' own call from the same noise (max |Δ| 0.0027,
    linear 0.08, on latents ≈ 4), contrary to "tadq's FP loop equals diffusers' own __call__". A user expects
    diffusers' latents. (Flux's uniform σ grid is given to ``set_timesteps`` as ``sigmas=``, where the two
    shifts agree: the pin below.)"""
    torch.set_num_threads(1)
    folder = _copy(folders["sd3"], tmp_path / "sd3-dynamic")
    _edit_json(folder / "scheduler" / "scheduler_config.json", time_shift_type=shift_type, **_DYNAMIC)
    pipe = tadq.load_pipeline(folder)
    ours = _tadq_latents(pipe, guidance_scale=GUIDANCE)
    theirs = _diffusers_latents("sd3", pipe, PROMPTS, _same_noise(ours), guidance_scale=GUIDANCE)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs))


def test_flux_dev_with_its_resolution_dependent_shift_is_diffusers(tmp_path):
    """Pins: a FLUX.1-dev-like folder (``use_dynamic_shifting``, distilled guidance) samples the latents of
    ``FluxPipeline``'s own call (its σ grid linspace(1, 1/N, N), its μ) from the same noise."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(build_flux(tmp_path / "flux-dev", dynamic_shifting=True))
    ours = _tadq_latents(pipe, guidance_scale=3.5)
    theirs = _diffusers_latents("flux", pipe, PROMPTS, _same_noise(ours), guidance_scale=3.5)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs))


def test_tadq_run_takes_a_dynamic_shift_flux_folder(tmp_path):
    """``tadq quantize`` and ``tadq sample`` give a FLUX.1-dev-like folder (``use_dynamic_shifting``) the shift
    FluxPipeline computes for its image size (``pipeline_flow_shift``); ``tadq run --model FOLDER --sampler
    flow-euler`` does not, and stops with "pass it explicitly, SamplerConfig('flow-euler', shift=exp(mu))", which no
    ``tadq run`` flag can do. A user expects the main job to run on the folder as the other commands do."""
    folder = build_flux(tmp_path / "flux-dev", dynamic_shifting=True)
    (tmp_path / "calib.txt").write_text("a cat\na red dog\n")
    (tmp_path / "eval.txt").write_text("a blue cat\na dog\n")
    result, output = _invoke(["run", "--model", folder, "--sampler", "flow-euler", "--steps", 2, "--presets", "W8A8",
                              "--methods", "naive", "--num-samples", 2, "--calib-trajectories", 2, "--batch-size", 2,
                              "--calib-prompts", tmp_path / "calib.txt", "--eval-prompts", tmp_path / "eval.txt",
                              "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run", "--threads", 1])
    assert result.exit_code == 0, output


def test_an_undrivable_flow_scheduler_is_not_told_to_become_ddim(folders, tmp_path):
    """An SD3 folder whose scheduler is ``FlowMatchHeunDiscreteScheduler`` is refused, rightly, but the advice is
    "save DDIMScheduler.from_config(pipe.scheduler.config) (with the clip_sample and steps_offset the model was
    trained with) into its scheduler/ folder": a DDIM scheduler on a flow-matching model is itself refused ("ddim
    cannot drive a flow-matching model"). A user expects advice that fits a flow model
    (FlowMatchEulerDiscreteScheduler)."""
    folder = _copy(folders["sd3"], tmp_path / "sd3-heun")
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="FlowMatchHeunDiscreteScheduler")
    with pytest.raises(NotImplementedError) as refused:
        check_drivable_scheduler(folder)
    assert "DDIMScheduler.from_config" not in str(refused.value)
    assert "FlowMatchEulerDiscreteScheduler" in str(refused.value)


# --- damaged component configs ----------------------------------------------------------------------------------


def test_a_component_config_that_is_not_an_object_is_named_before_loading(folders, tmp_path):
    """``transformer/config.json`` holding valid JSON that is not an object (``[]``) passes
    ``check_pipeline_folder`` (it only checks that the file parses), and diffusers then fails with a traceback:
    "OSError: We couldn't connect to 'https://huggingface.co' ... [] is not the path to a directory containing a
    config.json file" (exit code 1 from ``tadq sample``). A user expects the folder check to name the file."""
    folder = _copy(folders["pixart"], tmp_path / "copy")
    (folder / "transformer" / "config.json").write_text("[]")
    with pytest.raises(PipelineFolderError, match="transformer"):
        check_pipeline_folder(folder)
    result, output = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--steps", 1, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 2, output


def test_a_vae_shift_factor_that_is_not_a_number_is_refused_before_sampling(folders, tmp_path):
    """SD3's and Flux's VAE ``shift_factor`` is added to the latents before decoding. ``scaling_factor`` is checked
    up front ("must be a positive number"), ``shift_factor`` is not: a string there samples every step and then
    fails at decode with "unsupported operand type(s) for +: 'Tensor' and 'str'". A user expects the folder check
    to name vae/config.json's shift_factor before any work."""
    folder = _copy(folders["sd3"], tmp_path / "copy")
    _edit_json(folder / "vae" / "config.json", shift_factor="0.1")
    with pytest.raises(PipelineFolderError, match="shift_factor"):
        check_pipeline_folder(folder)


@pytest.mark.parametrize(("name", "channels", "read"), [
    ("pixart", 16, "in_channels 4 "), ("sd3", 16, "in_channels 4 "),
    ("flux", 16, r"in_channels 16 \(2×2 patches of 4 channels\)")])
def test_a_vae_whose_latent_channels_are_not_the_transformers_is_refused(folders, tmp_path, name, channels, read):
    """The VAE decodes what the transformer samples: a 16-channel VAE (SD3's, Flux's) in a 4-channel pipeline was
    loaded, calibrated and sampled, and failed only in the VAE's first conv. Flux's transformer takes the latents
    packed in 2×2 patches (in_channels 4C), which the tiny folders' own VAE and transformer (4 and 16) agree with."""
    check_pipeline_folder(folders[name])
    folder = _copy(folders[name], tmp_path / "copy")
    _edit_json(folder / "vae" / "config.json", latent_channels=channels)
    with pytest.raises(PipelineFolderError, match=rf"latent_channels {channels}, but the transformer samples latents "
                                                  rf"of {read}"):
        check_pipeline_folder(folder)


def test_a_transformer_config_that_does_not_fit_its_weights_is_a_clean_error(folders, tmp_path):
    """A ``transformer/config.json`` that no longer describes its safetensors (here ``num_layers`` 3 for 2 layers
    of weights: an edited config, or a config and weights from two downloads) makes diffusers raise
    ``RuntimeError: Error(s) in loading state_dict for SD3Transformer2DModel``, which ``tadq sample`` does not
    count as an input error: a traceback and exit code 1. A user expects exit code 2 and one line naming the
    component (the shapes are in the safetensors header, so the folder check could compare them)."""
    folder = _copy(folders["sd3"], tmp_path / "copy")
    _edit_json(folder / "transformer" / "config.json", num_layers=3)
    result, output = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--steps", 1, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 2 and "transformer" in output, output

@pytest.mark.parametrize(("which", "key", "count", "model", "first"), [
    ("pixart", "caption_channels", 4, "PixArtTransformer2DModel", "caption_projection.linear_1.bias"),
    ("flux", "guidance_embeds", 4, "FluxTransformer2DModel", "time_text_embed.guidance_embedder.linear_1.bias")])
def test_a_transformer_config_that_lost_a_key_its_weights_need_is_named_not_run(folders, tmp_path, which, key, count,
                                                                               model, first):
    """A key deleted from ``transformer/config.json`` that turns off a part the weights hold: PixArt without
    ``caption_channels`` built no caption projection (the T5 width equals the cross-attention width here, so
    nothing failed), Flux.1-dev without ``guidance_embeds`` built a schnell that ignores the distilled guidance.
    diffusers dropped the stored tensors with a warning, and tadq quantized and sampled that other model. A user
    expects the folder to be refused, naming the component and the tensors."""
    folder = _copy(folders[which], tmp_path / "copy")
    _edit_json(folder / "transformer" / "config.json", drop=(key,))
    with pytest.raises(PipelineFolderError, match=rf"transformer: its weights hold {count} tensors the {model} "
                                                  rf".* no place for \({re.escape(first)}"):
        load_fp_pipeline(folder)


# --- artefacts ----------------------------------------------------------------------------------------------------


def _recipe(which: str) -> Recipe:
    sampler = SamplerConfig(SAMPLERS[which], num_steps=2)
    recipe = Recipe.from_preset("W8A8")
    calibration = dataclasses.replace(recipe.calibration, sampler=sampler, num_trajectories=2, num_steps_kept=2,
                                      samples_per_step=2, batch_size=8)
    scale = 1.0 if which == "flux" else GUIDANCE
    return dataclasses.replace(recipe, calibration=calibration,
                               deployments=(Deployment(sampler=sampler, guidance_scale=scale),))


@pytest.fixture(scope="module")
def artefacts(folders, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("transformer-input-artefacts")
    made = {}
    for which in SAMPLERS:
        pipe = load_fp_pipeline(folders[which])
        qmodel = tadq.quantize(pipeline_denoiser(pipe), pipe.scheduler, _recipe(which),
                               conditions=PromptConditions(pipe, PROMPTS), progress=False)
        save_pipeline(qmodel, folders[which], root / which)
        made[which] = root / which
    return made


def test_analyze_and_evaluate_ask_a_text_to_image_artefact_for_its_own_reference(artefacts, tmp_path):
    """``tadq analyze`` refused a transformer-pipeline artefact ("use tadq evaluate for it") and ``tadq evaluate``
    sent it to ``tadq run``; both measure it now. Without ``--reference`` the reference is the
    shipped digits pipeline, another architecture than the SD3 artefact's: refused naming the flag, before any
    sampling, and neither points at another command."""
    for command, flag in (("analyze", "--reference"), ("evaluate", "--reference")):
        result, output = _invoke([command, artefacts["sd3"], "--num-samples", 2, "--threads", 1,
                                  "--out", tmp_path / command])
        assert result.exit_code == 2 and f"pass {flag} FP_FOLDER" in output, output
        assert "tadq run" not in output and "use tadq evaluate" not in output, output


def test_evaluate_and_analyze_record_the_distilled_guidance_a_flux_artefact_was_sampled_with(artefacts, folders,
                                                                                               tmp_path):
    """Flux embeds a distilled guidance scale the model reads (a model input, not classifier-free guidance):
    `tadq sample` and `tadq run` record it, `tadq evaluate` and `tadq analyze` reported only the true-CFG scale
    (1: "unguided") and a hash. Their reports name it, and analyze's the prompts too, as evaluate's does."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a bird\n")
    common = ["--eval-prompts", prompts, "--num-samples", 1, "--threads", 1]
    result, output = _invoke(["evaluate", artefacts["flux"], "--reference", folders["flux"], *common,
                              "--out", tmp_path / "evaluate"])
    assert result.exit_code == 0, output
    result, output = _invoke(["analyze", artefacts["flux"], "--fp-model", folders["flux"], *common,
                              "--out", tmp_path / "analyze"])
    assert result.exit_code == 0, output
    evaluated = json.loads((tmp_path / "evaluate" / "results.json").read_text())["settings"]
    analysed = json.loads((tmp_path / "analyze" / "analysis.json").read_text())["settings"]
    recorded = tadq.load_pipeline(artefacts["flux"]).tadq_prompt_encoder().distilled_guidance
    assert recorded is not None
    assert evaluated["distilled_guidance"] == analysed["distilled_guidance"] == recorded
    assert analysed["prompts"] == evaluated["prompts"] == ["a bird"]


@needs_int8_w8
@pytest.mark.parametrize("which", list(SAMPLERS))
def test_the_int8_backend_agrees_with_fake_quant_on_transformer_artefacts(artefacts, folders, which):
    """Pins: ``tadq.load_pipeline(ART, backend="int8")`` runs the quantized transformer with integer kernels and
    agrees with the fake-quant latents from the same prompts and noise (PSNR ≥ 40 dB per sample, the integer
    issue's agreement goal), while both differ from the FP model by more (the quantization is active)."""
    from tadq.metrics.image import psnr_per_sample

    torch.set_num_threads(1)
    integer = tadq.load_pipeline(artefacts[which], backend="int8")
    assert type(integer.tadq_denoiser).__name__ == "IntegerDenoiser"
    call = {"seed": 2, "output_type": "latent", "progress": False}
    got = _unpacked(integer, integer(PROMPTS, **call).images)  # images for the PSNR: Flux's tokens unpacked
    simulated = tadq.load_pipeline(artefacts[which])
    fake = _unpacked(simulated, simulated(PROMPTS, **call).images)
    recipe, fp_pipe = integer.tadq_recipe, load_fp_pipeline(folders[which])
    fp = tadq.sample(pipeline_denoiser(fp_pipe), fp_pipe.scheduler, recipe.sampler, num_samples=len(PROMPTS), seed=2,
                     conditions=PromptConditions(fp_pipe, PROMPTS), guidance_scale=recipe.guidance_scale,
                     progress=False).images  # the FP model on the artefact's sampler
    assert not torch.equal(got, fake)  # integer kernels ran, not the simulation
    assert psnr_per_sample(got, fake).min() >= 40.0
    assert float((fake - fp).abs().max()) > float((got - fake).abs().max())


@pytest.mark.parametrize("which", list(SAMPLERS))
def test_a_transformer_artefact_loads_and_samples_in_bfloat16(artefacts, which):
    """Pins: ``tadq.load_pipeline(ART, dtype="bfloat16")`` samples (the prompt embeddings, Flux's guidance and
    PixArt's mask follow the model's dtype) and decodes to finite images close to the float32 ones."""
    torch.set_num_threads(1)
    call = {"seed": 2, "output_type": "latent", "progress": False}
    reference = tadq.load_pipeline(artefacts[which])(PROMPTS, **call).images
    pipe = tadq.load_pipeline(artefacts[which], dtype="bfloat16")
    latents = pipe(PROMPTS, **call).images
    assert latents.dtype == torch.bfloat16
    relative = float((latents.float() - reference).abs().max()) / float(reference.abs().max())
    assert relative < 0.1
    images = pipe(PROMPTS[:1], seed=2, output_type="np", progress=False).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


# --- behaviour that is right today ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", list(SAMPLERS))
def test_negative_prompts_give_diffusers_images(folders, which):
    """Pins: a negative prompt is the unconditional branch as in diffusers, for PixArt and SD3 (classifier-free
    guidance) and for Flux with ``true_cfg_scale`` > 1 (diffusers' true CFG)."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders[which])
    call = {"true_cfg_scale": 2.0, "guidance_scale": 3.5} if which == "flux" else {"guidance_scale": GUIDANCE}
    ours = _tadq_latents(pipe, negative_prompt="a blue dog", **call)
    theirs = _diffusers_latents(which, pipe, PROMPTS, _same_noise(ours), negative_prompt="a blue dog", **call)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs))
    empty = {"negative_prompt": ""} if which == "flux" else {}  # Flux's true CFG needs a negative prompt
    assert not torch.equal(ours, _tadq_latents(pipe, **call, **empty))  # the negative prompt reached the model


@pytest.mark.parametrize("which", list(SAMPLERS))
def test_images_per_prompt_and_output_types(folders, which):
    """Pins: ``num_images_per_prompt`` repeats prompts prompt-major (sample i keeps the noise of index i, so the
    first image of a two-prompt call is the one-prompt call's), and pil / np / pt give diffusers' layouts."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders[which])
    call = {"seed": 3, "num_inference_steps": 2, "progress": False}
    latents = pipe(PROMPTS, num_images_per_prompt=2, output_type="latent", **call).images
    single = pipe(PROMPTS[:1], output_type="latent", **call).images
    assert latents.shape[0] == 4 and not torch.equal(latents[0], latents[1])
    torch.testing.assert_close(latents[0], single[0], rtol=0, atol=_tolerance(single, 2))  # Flux: batch rounding
    arrays = pipe(PROMPTS, num_images_per_prompt=2, output_type="np", **call).images
    tensors = pipe(PROMPTS, num_images_per_prompt=2, output_type="pt", **call).images
    pictures = pipe(PROMPTS[:1], output_type="pil", **call).images
    assert arrays.shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and tensors.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert len(pictures) == 1 and pictures[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(arrays, tensors.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=f"own size {IMAGE_SIZE}x{IMAGE_SIZE}"):
        pipe("a cat", height=2 * IMAGE_SIZE, width=2 * IMAGE_SIZE, progress=False)


@pytest.mark.parametrize("command", ["sample-fp", "quantize"])
def test_ddim_on_a_flow_model_is_a_clean_refusal(folders, tmp_path, command):
    """Pins: ``--sampler ddim`` on SD3 (a flow-matching model) exits with code 2 and names flow-euler, writing
    nothing, in ``tadq sample`` and ``tadq quantize`` (without ``--sampler`` quantize picks flow-euler itself:
    tests/cli/test_transformer_pipeline_commands.py)."""
    if command == "sample-fp":
        args = ["sample", folders["sd3"], "--sampler", "ddim", "--prompt", "a cat", "--num-samples", 1, "--steps", 2,
                "--out", tmp_path / "samples"]
    else:
        args = ["quantize", folders["sd3"], "--out", tmp_path / "art", "--steps", 2, "--calib-trajectories", 1,
                "--calib-prompt", "a cat", "--cache-dir", tmp_path / "cache", "--sampler", "ddim"]
    result, output = _invoke([*args, "--threads", 1])
    assert result.exit_code == 2 and "flow-euler" in output, output
    assert not (tmp_path / "art").exists() and not (tmp_path / "samples").exists()


def test_a_prompt_longer_than_flux_clip_is_warned_and_t5s_limit_is_refused(folders, tmp_path):
    """Flux's CLIP tokenizer reads at most its ``model_max_length`` (16 here) and the pipeline cuts its copy of a
    longer prompt by design (T5 reads all of it): tadq samples it and says so. A prompt longer than T5's
    ``max_sequence_length`` is refused naming that tokenizer, before anything is loaded."""
    torch.set_num_threads(1)
    prompt = " ".join(["cat"] * 20)  # 22 CLIP tokens, 21 T5 tokens
    result, output = _invoke(["sample", folders["flux"], "--prompt", prompt, "--num-samples", 1, "--steps", 1,
                              "--out", tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 0 and "cut at 16 tokens" in output, output
    pipe = tadq.load_pipeline(folders["flux"])
    with pytest.raises(ValueError, match="21 tokens long .* at most 20"):
        pipe(prompt, max_sequence_length=20, progress=False)


def test_text_encoders_of_another_width_are_a_clean_error(folders, tmp_path):
    """Pins: a PixArt folder whose T5 is 32 wide while the transformer's captions are 16 (components of two models)
    exits with code 2 naming the embedding shape, not a matmul traceback."""
    folder = _copy(folders["pixart"], tmp_path / "copy")
    shutil.rmtree(folder / "text_encoder")
    shutil.copytree(folders["sd3"] / "text_encoder_3", folder / "text_encoder")
    result, output = _invoke(["sample", folder, "--prompt", "a cat", "--num-samples", 1, "--steps", 1, "--out",
                              tmp_path / "samples", "--threads", 1])
    assert result.exit_code == 2 and "encoder_hidden_states must be (N, L, 16)" in output, output


def _pixart_with_size_conditions(folder):
    """PixArt-α at sample_size 128 (the 1024 px model's latent side), where diffusers' transformer turns on
    ``use_additional_conditions`` and the pipeline passes resolution and aspect ratio. Width 24 (divisible by 3:
    the size embedder splits it in thirds), one layer, so 64×64 tokens stay fast."""
    torch.manual_seed(0)
    tokenizer = tiny.t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=24, sample_size=128, patch_size=2, norm_type="ada_norm_single",
        caption_channels=tiny.T5_WIDTH).eval()
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=tiny._t5_encoder(tokenizer, tiny.T5_WIDTH),
                               vae=tiny._vae(), transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_pixart_alpha_size_conditions_are_diffusers(tmp_path):
    """Pins: at sample_size 128 PixArt-α's transformer takes resolution and aspect-ratio conditions; tadq gives it
    the native size (both branches), equal to diffusers' own call from the same noise."""
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(_pixart_with_size_conditions(tmp_path / "pixart-1024"))
    assert pipe.transformer.use_additional_conditions
    ours = pipe(["a cat"], seed=5, num_inference_steps=2, guidance_scale=GUIDANCE, output_type="latent",
                progress=False).images
    size = 128 * pipe.vae_scale_factor
    theirs = PixArtAlphaPipeline.__call__(pipe, ["a cat"], negative_prompt="", guidance_scale=GUIDANCE,
                                          latents=_same_noise(ours), num_inference_steps=2, height=size, width=size,
                                          use_resolution_binning=False, clean_caption=False, output_type="latent",
                                          return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=_tolerance(theirs, 2))


def test_calls_and_configs_diffusers_users_write(folders, tmp_path):
    """PixArt's ``clean_caption=False`` / ``use_resolution_binning=False`` ask for what tadq does and are taken
    (True is refused by name); more than 512 T5 tokens for SD3 is refused as diffusers refuses it; a flow
    scheduler's ``shift`` of 0 (NaN latents) or below is refused naming the key before sampling."""
    torch.set_num_threads(1)
    pixart = tadq.load_pipeline(folders["pixart"])
    plain = _tadq_latents(pixart, guidance_scale=GUIDANCE)
    assert torch.equal(_tadq_latents(pixart, guidance_scale=GUIDANCE, clean_caption=False,
                                     use_resolution_binning=False), plain)
    with pytest.raises(TypeError, match="clean_caption"):
        pixart("a cat", clean_caption=True, progress=False)
    with pytest.raises(ValueError, match="at most 512"):
        tadq.load_pipeline(folders["sd3"])("a cat", max_sequence_length=600, progress=False)
    for shift in (0, -1.0):
        folder = _copy(folders["sd3"], tmp_path / f"shift{shift}")
        _edit_json(folder / "scheduler" / "scheduler_config.json", shift=shift)
        with pytest.raises(ValueError, match="shift"):
            tadq.load_pipeline(folder)("a cat", progress=False)


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_a_token_past_a_text_encoders_vocabulary_is_named_on_the_python_path(folders, tmp_path, family):
    """A token added to a T5 (PixArt) or CLIP (SD3) tokenizer only failed inside the pipeline's own encode_prompt
    ('index out of range in self'); the CLI refuses it from the folder, the Python path from the loaded encoders."""
    from transformers import AutoTokenizer

    from tadq.pipelines.prompts import prompt_encoder_for

    folder = _copy(folders[family], tmp_path / "copy")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(folder / "tokenizer")
    encoder = prompt_encoder_for(load_fp_pipeline(folder))
    with pytest.raises(ValueError, match="'<cat-toy>' id \\d+, past the \\d+-token vocabulary"):
        encoder.encode_text("a <cat-toy>")
    assert encoder.encode_text("a cat").hidden is not None
