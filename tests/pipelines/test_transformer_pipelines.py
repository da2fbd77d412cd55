"""The transformer text-to-image pipelines (PixArt-α/Σ, SD3, Flux) end to end on tiny random folders: checked and
loaded like SD, prompts through the pipeline's own ``encode_prompt``, tadq's loop equal to diffusers' own call from
the same noise, a quantized artefact that keeps the pipeline layout and reloads bit-identically, Flux's guidance
semantics and dynamic shift, and the CLI (quantize on prompts, sample the artefact)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch
from tests.pipelines.builders_transformer import IMAGE_SIZE, build_flux, build_pixart, build_sd3
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.pipelines import PromptConditions, check_pipeline_folder, is_pipeline_folder, load_fp_pipeline, save_pipeline
from tadq.pipelines.components import PipelineFolderError, pipeline_denoiser
from tadq.pipelines.quantized import pipeline_flow_shift, pipeline_sampler
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig
from tadq.sampling.noise import initial_noise

STEPS, GUIDANCE = 3, 3.0
PROMPTS = ["a cat", "a red dog"]
KINDS = {"pixart": "dpmsolver++", "pixart-sigma": "dpmsolver++", "sd3": "flow-euler", "flux": "flow-euler"}
CLASSES = {"pixart": "PixArtAlphaPipeline", "pixart-sigma": "PixArtSigmaPipeline", "sd3": "StableDiffusion3Pipeline",
           "flux": "FluxPipeline"}


def _build(which: str, folder):
    if which.startswith("pixart"):
        return build_pixart(folder, sigma=which == "pixart-sigma")
    return build_sd3(folder) if which == "sd3" else build_flux(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformer-pipelines")
    return {which: _build(which, root / which) for which in KINDS}


def _scale(which: str) -> float:
    """tadq's classifier-free guidance: Flux (guidance-distilled) samples without it, the others with it."""
    return 1.0 if which == "flux" else GUIDANCE


def _recipe(which: str) -> Recipe:
    sampler = SamplerConfig(KINDS[which], num_steps=STEPS)
    recipe = Recipe.from_preset("W8A8")
    calibration = dataclasses.replace(recipe.calibration, sampler=sampler, num_trajectories=4, num_steps_kept=STEPS,
                                      samples_per_step=4, batch_size=8)
    return dataclasses.replace(recipe, calibration=calibration,
                               deployments=(Deployment(sampler=sampler, guidance_scale=_scale(which)),))


@pytest.mark.parametrize("which", list(KINDS))
def test_folders_are_checked_as_prompt_pipelines(which, folders, tmp_path):
    layout = check_pipeline_folder(folders[which])
    assert layout.class_name == CLASSES[which] and "transformer" in layout.components
    assert is_pipeline_folder(folders[which])
    broken = _build(which, tmp_path / "broken")
    for file in (broken / "transformer").iterdir():
        if file.suffix == ".safetensors":
            file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(PipelineFolderError, match="transformer.*damaged"):
        check_pipeline_folder(broken)


def _diffusers_latents(which: str, pipe, noise: torch.Tensor, sampler: SamplerConfig) -> torch.Tensor:
    """diffusers' own ``__call__`` of the pipeline's class from ``noise`` (unpacked latents), as latents."""
    base = type(pipe).tadq_base
    common = {"num_inference_steps": STEPS, "output_type": "latent", "return_dict": False,
              "height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if which.startswith("pixart"):
        return base.__call__(pipe, PROMPTS, negative_prompt="", guidance_scale=GUIDANCE, latents=noise,
                             use_resolution_binning=False, clean_caption=False, **common)[0]
    if which == "sd3":
        return base.__call__(pipe, PROMPTS, guidance_scale=GUIDANCE, latents=noise, **common)[0]
    # FluxPipeline's own grid, linspace(1, 1/N, N): tadq's Flux pipeline samples flow-euler on it (flow_sigmas)
    assert sampler.flow_sigmas == "uniform"
    packed = base._pack_latents(noise, *noise.shape)
    out = base.__call__(pipe, PROMPTS, guidance_scale=3.5, latents=packed, **common)[0]
    return base._unpack_latents(out, IMAGE_SIZE, IMAGE_SIZE, pipe.vae_scale_factor)


@pytest.mark.parametrize("which", ["pixart", "sd3", "flux"])
def test_fp_pipeline_equals_diffusers_own_call_from_the_same_noise(which, folders):
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders[which])
    sampler, scale = pipe.tadq_deployment(STEPS, GUIDANCE if which != "flux" else None, None)
    assert sampler.kind == KINDS[which] and scale == _scale(which)  # the folder's own sampler and guidance
    conditions = PromptConditions(pipe, PROMPTS)
    ours = pipe.tadq_latents(conditions, len(PROMPTS), sampler, scale, seed=5, progress=False)
    noise = initial_noise(5, range(len(PROMPTS)), ours.shape[1:])
    theirs = _diffusers_latents(which, pipe, noise, sampler)
    # the same float32 operations up to the order of a few sums per step: an error of a few ulps of the largest
    # value per step, grown by at most the number of steps
    tolerance = 16 * STEPS * torch.finfo(torch.float32).eps * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def artefacts(folders, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("transformer-artefacts")
    made = {}
    for which in ("pixart", "sd3", "flux"):
        pipe = load_fp_pipeline(folders[which])
        qmodel = tadq.quantize(pipeline_denoiser(pipe), pipe.scheduler, _recipe(which),
                               conditions=PromptConditions(pipe, PROMPTS), progress=False)
        save_pipeline(qmodel, folders[which], root / which)
        made[which] = (qmodel, root / which)
    return made


@pytest.mark.parametrize("which", ["pixart", "sd3", "flux"])
def test_artefact_keeps_the_layout_and_its_pipeline_equals_tadq_sample(which, folders, artefacts):
    qmodel, art = artefacts[which]
    source = folders[which]
    assert (art / "model_index.json").read_bytes() == (source / "model_index.json").read_bytes()
    assert sorted(p.name for p in (art / "transformer").iterdir()) == ["config.json"]
    for name in ("vae", "text_encoder", "tokenizer"):
        assert all((art / name / f.name).read_bytes() == f.read_bytes() for f in (source / name).iterdir())
    pipe = tadq.load_pipeline(art)
    output = pipe(PROMPTS, seed=4, output_type="latent", progress=False)
    expected = {"pixart": "ImagePipelineOutput", "sd3": "StableDiffusion3PipelineOutput",
                "flux": "FluxPipelineOutput"}[which]
    assert type(output).__name__ == expected
    recipe = qmodel.recipe
    direct = tadq.sample(qmodel, pipe.scheduler, recipe.sampler, num_samples=len(PROMPTS), seed=4, batch_size=8,
                         conditions=PromptConditions(pipe, PROMPTS), guidance_scale=recipe.guidance_scale,
                         progress=False).images
    # reloaded artefact = the in-memory model, bit for bit (Flux's latent output packed, as FluxPipeline's)
    assert torch.equal(pipe.tadq_latent_output(direct), output.images)
    images = pipe(PROMPTS[:1], seed=4, output_type="np", progress=False).images
    assert images.shape == (1, IMAGE_SIZE, IMAGE_SIZE, 3) and np.isfinite(images).all()


def test_flux_guidance_is_distilled_and_cfg_is_true_cfg_scale(folders):
    torch.set_num_threads(1)
    pipe = tadq.load_pipeline(folders["flux"])
    latents = {g: pipe(PROMPTS[:1], seed=1, guidance_scale=g, num_inference_steps=2, output_type="latent",
                       progress=False).images for g in (1.5, 3.5)}
    assert not torch.equal(latents[1.5], latents[3.5])  # the embedded scale reaches the model
    default = inspect.signature(type(pipe).tadq_base.__call__).parameters["guidance_scale"].default
    assert torch.equal(pipe(PROMPTS[:1], seed=1, num_inference_steps=2, output_type="latent",
                            progress=False).images, latents[default])
    cfg = pipe(PROMPTS[:1], seed=1, guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt="",
               num_inference_steps=2, output_type="latent", progress=False).images
    assert not torch.equal(cfg, latents[3.5])  # a second, unconditional branch
    with pytest.raises(ValueError, match="without a negative_prompt"):  # FluxPipeline would not guide at all
        pipe(PROMPTS[:1], true_cfg_scale=2.0, progress=False)
    sd3 = tadq.load_pipeline(folders["sd3"])
    with pytest.raises(TypeError, match="true_cfg_scale is Flux's"):
        sd3(PROMPTS, true_cfg_scale=2.0)


def test_t5_prompts_are_held_to_max_sequence_length(folders):
    pipe = tadq.load_pipeline(folders["pixart"])
    long = " ".join(["cat"] * 20)  # 21 T5 tokens with the end token
    with pytest.raises(ValueError, match="21 tokens long .* at most 16"):
        pipe(long, max_sequence_length=16, progress=False)
    conditions = PromptConditions(pipe.tadq_prompt_encoder(max_sequence_length=24), [long])
    cond = conditions(0, [0])
    assert cond.encoder_hidden_states.shape[1] == 24 and cond.attention_mask.shape == (1, 24)
    other = PromptConditions(pipe.tadq_prompt_encoder(max_sequence_length=32), [long])
    assert conditions.key != other.key  # the length changes the conditioning, so it keys calibration


def test_flux_dynamic_shift_is_the_pipelines(tmp_path):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    pipe = load_fp_pipeline(build_flux(tmp_path / "flux-dynamic", dynamic_shifting=True))
    sampler = pipeline_flow_shift(pipe, SamplerConfig("flow-euler", num_steps=4))
    config = pipe.scheduler.config
    tokens = (IMAGE_SIZE // pipe.vae_scale_factor // 2) ** 2
    mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    assert sampler.shift == pytest.approx(math.exp(mu), rel=1e-12)
    given = SamplerConfig("flow-euler", num_steps=4, shift=2.0)
    assert pipeline_flow_shift(pipe, given) is given


def test_cli_quantizes_and_samples_a_transformer_pipeline(folders, tmp_path):
    runner = CliRunner()
    art = tmp_path / "sd3-w8a8"
    result = runner.invoke(app, ["quantize", str(folders["sd3"]), "--out", str(art), "--preset", "W8A8",
                                 "--method", "naive", "--sampler", "flow-euler", "--steps", str(STEPS),
                                 "--calib-trajectories", "4", "--calib-prompt", "a cat", "--calib-prompt", "a dog",
                                 "--guidance-scale", str(GUIDANCE), "--cache-dir", str(tmp_path / "cache"),
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "samples"
    result = runner.invoke(app, ["sample", str(art), "--prompt", "a red dog", "--num-samples", "2", "--out",
                                 str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    settings = json.loads((out / "prompts.json").read_text())
    assert settings["sampler"]["data"]["kind"] == "flow-euler" and settings["guidance_scale"] == GUIDANCE
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_0000.png", "sample_0001.png"]


def test_cli_quantize_of_a_dynamic_shift_flux_folder_records_the_pipelines_shift(tmp_path):
    runner = CliRunner()
    folder = build_flux(tmp_path / "flux-dynamic", dynamic_shifting=True)
    art = tmp_path / "flux-w8a8"
    result = runner.invoke(app, ["quantize", str(folder), "--out", str(art), "--preset", "W8A8", "--method", "naive",
                                 "--sampler", "flow-euler", "--steps", "2", "--calib-trajectories", "2",
                                 "--calib-prompt", "a cat", "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    recipe = tadq.load_pipeline(art).tadq_recipe
    expected = pipeline_sampler(load_fp_pipeline(folder), SamplerConfig("flow-euler", num_steps=2))
    assert recipe.sampler == expected and recipe.calibration.sampler == expected
    assert expected.shift is not None and expected.flow_sigmas == "uniform"  # as FluxPipeline samples
    assert recipe.guidance_scale == 1.0  # Flux samples without classifier-free guidance by default


def test_cli_distilled_guidance_is_recorded_and_is_the_artefacts_default(folders, tmp_path):
    runner = CliRunner()
    art = tmp_path / "flux-w8a8"
    result = runner.invoke(app, ["quantize", str(folders["flux"]), "--out", str(art), "--preset", "W8A8",
                                 "--method", "naive", "--sampler", "flow-euler", "--steps", "2",
                                 "--calib-trajectories", "2", "--calib-prompt", "a cat", "--distilled-guidance", "2.5",
                                 "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    pipe = tadq.load_pipeline(art)
    assert pipe.tadq_recipe.deployments[0].distilled_guidance == 2.5
    assert PromptConditions(pipe, ["a cat"])(0, [0]).added_cond_kwargs["guidance"].tolist() == [2.5]
    for flag, expected in (([], 2.5), (["--distilled-guidance", "4"], 4.0)):  # no fitted tables: any scale
        out = tmp_path / f"samples-{expected}"
        result = runner.invoke(app, ["sample", str(art), "--prompt", "a cat", "--num-samples", "1", "--out", str(out),
                                     "--threads", "1", *flag])
        assert result.exit_code == 0, result.output
        assert json.loads((out / "prompts.json").read_text())["distilled_guidance"] == expected
    result = runner.invoke(app, ["sample", str(folders["sd3"]), "--prompt", "a cat", "--distilled-guidance", "2",
                                 "--out", str(tmp_path / "sd3"), "--threads", "1"])
    assert result.exit_code == 2 and "embeds no guidance" in " ".join(result.output.split())
