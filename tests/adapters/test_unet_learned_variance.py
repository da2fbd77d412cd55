"""Learned-variance UNets (``out_channels = 2·in_channels``: improved DDPM, guided diffusion, DeepFloyd IF), the way
the DiT is supported: ``predict_eps`` returns the first ``in_channels`` (the prediction; the rest is the variance
interpolation v), so samplers, corrections and the trajectory see the ε half, while the layers are quantized on
everything they compute. Pinned on tiny random ``UNet2DModel`` / ``UNet2DConditionModel``s: the FP loop equals
diffusers' own from the same noise, W8A8 fake quantization stays close to FP, the int8 backend agrees with fake
quantization, corrections fit on C channels, and outputs of any other channel count (inpainting's 9 → 4) are
refused before any call."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from tests.backends.machine import needs_int8_cpu, needs_int8_w8
from tests.conftest import build_tiny_sd_unet
from torch import nn

import tadq
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.recipe import Deployment, Recipe
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.sampling.noise import initial_noise

C = 3  # image channels: diffusers' DPM-Solver splits a learned variance at channel 3 ([:, :3]) whatever the model
DDIM = SamplerConfig("ddim", num_steps=4, eta=0.0)
DPM = SamplerConfig("dpmsolver++", num_steps=4)
CALIB = CalibrationConfig(sampler=DDIM, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=8)
U = torch.finfo(torch.float32).eps / 2  # float32 unit roundoff


def build_learned_variance_unet(seed: int = 0, **overrides) -> UNet2DModel:
    """A pixel UNet predicting [ε | v]: 3 input channels, 6 output channels, 8×8, one attention level."""
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=C, out_channels=2 * C, layers_per_block=1, block_out_channels=(8, 16),
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    return UNet2DModel(**(config | overrides)).eval()


def learned_range_ddpm() -> DDPMScheduler:
    """The training scheduler such a model ships with (IF, improved DDPM): DDPM whose variance is the model's."""
    return DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return build_learned_variance_unet()


# ---------------------------------------------------------------- the adapter


@pytest.mark.parametrize("build", [build_learned_variance_unet,
                                   lambda: build_tiny_sd_unet(in_channels=4, out_channels=8)],
                         ids=["UNet2DModel", "UNet2DConditionModel"])
def test_the_prediction_is_the_first_in_channels_of_the_output(build):
    model = build()
    adapter = adapter_for(model)
    channels = model.config.in_channels
    assert adapter.sample_shape(model) == (channels, 8, 8)
    x, t = torch.randn(2, channels, 8, 8), torch.tensor([10, 700])
    cond = adapter.dummy_conditioning(model, 2)
    with torch.no_grad():
        if cond is None:
            whole = model(x, t).sample
        else:
            whole = model(x, t, encoder_hidden_states=cond.encoder_hidden_states).sample
        eps = adapter.predict_eps(model, x, t, cond)
    assert whole.shape[1] == 2 * channels and torch.equal(eps, whole[:, :channels])


@pytest.mark.parametrize(("build", "message"), [
    (lambda: build_learned_variance_unet(in_channels=2, out_channels=1),
     "returns 1 channels for 2 input channels .extra conditioning channels as in inpainting"),
    (lambda: build_learned_variance_unet(in_channels=1, out_channels=3), "returns 3 channels for 1 input channels"),
    (lambda: build_tiny_sd_unet(in_channels=9), "returns 4 channels for 9 input channels"),
], ids=["UNet2DModel-2-to-1", "UNet2DModel-1-to-3", "UNet2DConditionModel-inpainting-9-to-4"])
def test_any_other_output_width_is_refused_before_any_call(build, message):
    """Only C or 2·C: an inpainting UNet (extra input channels) and any other layout are refused where the sample
    shape is asked, naming both channel counts, before the denoiser runs."""
    model = build()
    model.forward = lambda *args, **kwargs: pytest.fail("the denoiser was called")
    with pytest.raises(ValueError, match=message):
        api.sample(model, learned_range_ddpm(), DDIM, num_samples=1, seed=0, progress=False)


# ---------------------------------------------------------------- the FP loop is diffusers' own


def _diffusers_loop(model: nn.Module, scheduler, noise: torch.Tensor, split: bool) -> torch.Tensor:
    """diffusers' denoising loop (DDPMPipeline's, with ``scheduler``): the network's whole output goes to
    ``scheduler.step``, or (``split``) its first C channels, as diffusers' DiT/IF pipelines split it themselves."""
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            output = model(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(output[:, :C] if split else output, t, x).prev_sample
    return x


def test_fp_ddim_equals_diffusers_ddim_on_the_eps_half(unet):
    """DDIM from the learned-range DDPM config (diffusers' ``DDIMScheduler.from_config``), stepped on the ε half:
    tadq's loop computes the same float32 operations (tadq.sampling.steps), so the samples are equal."""
    ours = api.sample(unet, learned_range_ddpm(), DDIM, num_samples=3, seed=4, progress=False).images
    reference = DDIMScheduler.from_config(learned_range_ddpm().config)
    reference.set_timesteps(DDIM.num_steps)
    theirs = _diffusers_loop(unet, reference, initial_noise(4, range(3), (C, 8, 8)), split=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_fp_dpmsolver_equals_diffusers_splitting_the_variance_itself(unet):
    """``DPMSolverMultistepScheduler(variance_type="learned_range")`` is handed the whole 6-channel output and
    drops the variance itself: tadq's dpmsolver++ on the ε half gives its samples, within a few ulps per step
    (tadq's multistep update is computed in another operation order than diffusers')."""
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, variance_type="learned_range")
    ours = api.sample(unet, scheduler, DPM, num_samples=3, seed=4, progress=False).images
    scheduler.set_timesteps(DPM.num_steps)
    theirs = _diffusers_loop(unet, scheduler, initial_noise(4, range(3), (C, 8, 8)), split=False)
    tolerance = 16 * DPM.num_steps * 2 * U * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)


def test_ddpm_with_the_learned_variance_is_refused_as_for_the_dit(unet):
    """tadq's DDPM step has a fixed σ_t per step (what PTQD/TAC/TCEC are derived for); a learned-range DDPM
    scheduler takes σ from the v half per pixel, so ``kind="ddpm"`` is refused before any forward, naming
    variance_type, as for a DiT; DDIM and DPM-Solver++ sample the ε half. The refusal names them: an FP Stable
    Diffusion folder shipping this DDPM config samples ddpm by default (its scheduler's own) and stopped there."""
    with pytest.raises(NotImplementedError, match=r"learned_range.* another kind \(ddim, euler"):
        api.sample(unet, learned_range_ddpm(), SamplerConfig("ddpm", num_steps=4), num_samples=1, seed=0,
                   progress=False)


def test_stable_diffusion_with_a_learned_variance_unet_is_diffusers_own(tmp_path):
    """A Stable Diffusion pipeline whose UNet returns [ε | v] (3 latent channels, 6 out) with a learned-range
    DPM-Solver++, which diffusers' ``StableDiffusionPipeline`` samples (the scheduler drops v): tadq's loop on the
    ε half gives diffusers' latents from the same noise and prompts, guidance included."""
    from tests.pipelines.builders import HIDDEN, _remove_tree, _text_config, write_tokenizer
    from transformers import CLIPTextModel

    from tadq.pipelines import PromptConditions, load_fp_pipeline

    torch.manual_seed(0)
    folder = tmp_path / "sd"
    tokenizer = write_tokenizer(folder / "_tok")
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=C, norm_num_groups=4, sample_size=8)
    unet = UNet2DConditionModel(sample_size=8, in_channels=C, out_channels=2 * C, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN,
                                attention_head_dim=2, norm_num_groups=4)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", variance_type="learned_range")
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer)).eval(), tokenizer=tokenizer,
                            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    _remove_tree(folder / "_tok")
    pipe = load_fp_pipeline(folder)
    prompts, guidance = ["a cat", "a red dog"], 3.0
    ours = tadq.sample(pipe.unet, pipe.scheduler, DPM, num_samples=2, seed=5, progress=False, guidance_scale=guidance,
                       conditions=PromptConditions(pipe, prompts)).images
    noise = initial_noise(5, range(2), (C, 8, 8))
    theirs = StableDiffusionPipeline.__call__(pipe, prompts, latents=noise.clone(), output_type="latent",
                                              num_inference_steps=DPM.num_steps, guidance_scale=guidance).images
    tolerance = 16 * DPM.num_steps * 2 * U * float(theirs.abs().max())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance)


# ---------------------------------------------------------------- quantized


@pytest.fixture(scope="module")
def quantized(unet):
    torch.set_num_threads(1)
    calibration = collect_calibration_set(unet, adapter_for(unet), learned_range_ddpm(), CALIB, progress=False)
    config = QuantConfig.from_preset("W8A8", calibration=CALIB, quantize_attention=True, split_shortcut=True)
    return calibration, api.quantize(unet, learned_range_ddpm(), config, calibration=calibration, progress=False)


def test_the_output_layer_is_quantized_on_both_halves_and_w8a8_is_close_to_fp(unet, quantized):
    """The calibration inputs are C-channel states (the sampler's); ``conv_out`` is quantized on all 2·C output
    channels (per-channel weight grids: the v rows have their own scales and cannot disturb the ε rows); the ε half
    of the fake-quant model is close to FP at W8A8 and clearly worse at W4A8 (the quantizers act)."""
    calibration, w8a8 = quantized
    assert calibration.x.shape[1:] == (C, 8, 8)
    assert w8a8.model.get_submodule("conv_out").weight_quantizer.scale.numel() == 2 * C
    w4a8 = api.quantize(unet, learned_range_ddpm(), QuantConfig.from_preset(
        "W4A8", calibration=CALIB, quantize_attention=True, split_shortcut=True), calibration=calibration,
        progress=False)
    with torch.no_grad():
        reference = adapter_for(unet).predict_eps(unet, calibration.x, calibration.t)
        snr = {name: float(10 * torch.log10(reference.pow(2).mean() / (q(calibration.x, calibration.t) - reference)
                                            .pow(2).mean())) for name, q in (("W8A8", w8a8), ("W4A8", w4a8))}
    # measured on this UNet built from seeds 0-3: W8A8 30.8-33.5 dB, W4A8 14.0-16.8 dB (a gap of 16-18 dB); an
    # uncalibrated quantizer or the v half read as ε falls to a few dB, quantizers that do not act leave no gap
    assert snr["W8A8"] > 27.0, snr
    assert snr["W4A8"] < snr["W8A8"] - 12.0, snr


@needs_int8_w8  # W8A8: 8-bit weight codes
def test_int8_backend_agrees_with_fake_quantization(quantized):
    """The integer model's samples (conv_out run in integers on 2·C channels, the ε half sampled) agree with the
    fake-quant model's at the integer backend's ≥ 40 dB median PSNR (tests/backends/test_families.py)."""
    from tadq.backends import to_backend
    from tadq.metrics.image import psnr_per_sample

    _, fake = quantized
    integer = to_backend(fake, "int8")
    images = {name: api.sample(model, learned_range_ddpm(), DDIM, num_samples=4, seed=7, progress=False).images
              for name, model in (("fake", fake), ("int8", integer))}
    assert images["int8"].shape == (4, C, 8, 8)
    assert float(psnr_per_sample(images["int8"], images["fake"]).median()) >= 40.0


def test_corrections_are_fitted_on_the_eps_half(unet, quantized):
    """PTQD, TAC and TCEC are fitted on FP and quantized ε halves (a 2·C estimate would not fit their tables, which
    follow the sample's C channels), and sample with the ε half."""
    calibration, _ = quantized
    fits = (PTQDConfig(num_samples=8), TACConfig(num_samples=8), TCECConfig(num_samples=8, select=False))
    recipe = Recipe.from_preset("W8A8", calibration=CALIB, corrections=fits, deployments=(Deployment(DDIM),))
    corrected = tadq.quantize(unet, learned_range_ddpm(), recipe, calibration=calibration, progress=False,
                              fit_batch_size=8)
    tac, tcec = (next(c for c in corrected.corrections if type(c).__name__ == name)
                 for name in ("TACCorrection", "TCECCorrection"))
    assert tac.input_bias.shape[:2] == tac.scale.shape[:2] == tcec.k.shape[:2] == (DDIM.num_steps, C)
    assert bool(tac.input_bias.abs().sum() > 0) and bool(tcec.k.abs().sum() > 0)  # fitted, not left at zero
    images = api.sample(corrected, learned_range_ddpm(), DDIM, num_samples=2, seed=1, progress=False).images
    assert images.shape == (2, C, 8, 8) and bool(torch.isfinite(images).all())


# ---------------------------------------------------------------- the commands


@needs_int8_cpu
def test_quantize_sample_on_both_backends_and_evaluate_a_learned_variance_folder(tmp_path):
    """``tadq quantize`` → ``tadq sample`` (fake and int8) → ``tadq evaluate`` on a ``DDPMPipeline`` folder whose
    UNet predicts [ε | v] with a learned-range DDPM scheduler (the default DDIM deployment samples the ε half); the
    samples have the image's C channels. W4A8: its weight codes run on every CPU the int8 backend takes."""
    import json

    from diffusers import DDPMPipeline
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from tadq.cli.app import app

    folder, out = tmp_path / "pipe", tmp_path / "q"
    DDPMPipeline(unet=build_learned_variance_unet(), scheduler=learned_range_ddpm()).save_pretrained(folder)
    runner = CliRunner()

    def invoke(*args) -> str:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())

    invoke("quantize", folder, "--out", out, "--preset", "W4A8", "--method", "naive", "--correct", "tac",
           "--steps", 4, "--calib-trajectories", 8, "--set", "calibration.samples_per_step=4",
           "--set", "calibration.num_steps_kept=2", "--set", "corrections.0.num_samples=8",
           "--cache-dir", tmp_path / "cache", "--threads", 1)
    images = {}
    for backend in ("fake", "int8"):
        tensors = tmp_path / f"{backend}.safetensors"
        invoke("sample", out, "--num-samples", 2, "--backend", backend, "--threads", 1,
               "--out", tmp_path / f"{backend}.png", "--tensor-out", tensors)
        images[backend] = load_file(tensors)["images"]
    assert images["fake"].shape == images["int8"].shape == (2, C, 8, 8)
    report = tmp_path / "report"
    invoke("evaluate", out, "--reference", folder, "--num-samples", 4, "--out", report, "--threads", 1)
    rows = json.loads((report / "results.json").read_text())["rows"]
    assert rows[1]["psnr"] is not None and rows[1]["final_mse"] > 0
