"""An unconditional latent pipeline (diffusers' ``LDMPipeline``: a ``UNet2DModel`` on the latents of a VQ-VAE named
``vqvae``) through `tadq quantize` and `tadq sample`: its samples are decoded as the pipeline decodes them, and the
decoder travels into the artefact. Both used to be missed: ``vqvae`` was never looked for (only ``vae``), and an
unconditional model's artefact kept no pipeline component, so the latents were written as images."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel, VQModel
from typer.testing import CliRunner

import tadq.report
from tadq.cli.app import app
from tadq.experiments.workload import decoder_component, folder_vae_decoder

LATENT_CHANNELS, LATENT_SIDE = 3, 4  # the VQ-VAE halves the side once: 3×4×4 latents, 3×8×8 images
SMALL = ["--preset", "W8A8", "--method", "naive", "--sampler", "ddim", "--steps", "2", "--calib-trajectories", "2",
         "--set", "calibration.samples_per_step=2", "--set", "calibration.num_steps_kept=2"]


def _vqvae() -> VQModel:
    return VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                   up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                   layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=8,
                   num_vq_embeddings=16, vq_embed_dim=LATENT_CHANNELS)


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=LATENT_SIDE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                       layers_per_block=1, block_out_channels=(4, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    folder = tmp_path_factory.mktemp("ldm") / "pipe"
    LDMPipeline(vqvae=_vqvae().eval(), unet=unet, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_an_ldm_folder_is_decoded_by_its_vqvae_as_ldm_pipeline_decodes(ldm_folder):
    assert decoder_component(ldm_folder) == "vqvae"
    vqvae = VQModel.from_pretrained(ldm_folder / "vqvae").eval().requires_grad_(False)
    latents = torch.randn(2, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # LDMPipeline.__call__: latents / scaling_factor, vqvae.decode, images in [-1, 1]
        expected = vqvae.decode(latents / vqvae.config.scaling_factor).sample.clamp(-1, 1)
        got = folder_vae_decoder(ldm_folder)(latents)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_quantize_keeps_the_vqvae_and_sample_writes_decoded_images(ldm_folder, tmp_path, monkeypatch):
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(ldm_folder), "--out", str(out), *SMALL,
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    for name in ("model_index.json", "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors"):
        assert (out / name).read_bytes() == (ldm_folder / name).read_bytes()  # the decoder travelled, byte for byte

    shown = []
    grid = tadq.report.save_comparison_grid
    monkeypatch.setattr(tadq.report, "save_comparison_grid",
                        lambda panels, path: (shown.extend(panels.values()), grid(panels, path))[1])
    for source in (ldm_folder, out):
        result = CliRunner().invoke(app, ["sample", str(source), "--num-samples", "2", "--steps", "2",
                                          "--out", str(tmp_path / f"{source.name}.png")])
        assert result.exit_code == 0, result.output
    assert [tuple(images.shape) for images in shown] == [(2, 3, 2 * LATENT_SIDE, 2 * LATENT_SIDE)] * 2


def test_analyze_reads_latents_and_does_not_load_the_decoder(ldm_folder, tmp_path, monkeypatch):
    """`tadq analyze` measures the error in the latents the sampler walks in: it loaded the folder's decoder all the
    same (a large VAE's time and memory, a damaged one refused), through the loading it shares with evaluate."""
    import tadq.experiments.workload

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(ldm_folder), "--out", str(out), *SMALL,
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output

    def no_decoder(*args, **kwargs):
        raise AssertionError("the decoder was loaded")

    monkeypatch.setattr(tadq.experiments.workload, "folder_vae_decoder", no_decoder)
    result = CliRunner().invoke(app, ["analyze", str(out), "--fp-model", str(ldm_folder), "--num-samples", "2",
                                      "--out", str(tmp_path / "analysis")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "analysis" / "analysis.json").is_file()
