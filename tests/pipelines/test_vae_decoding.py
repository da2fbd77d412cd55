"""Latents are decoded as the folder's own pipeline class decodes them, VAE config keys included: SDXL reads
``latents_mean``/``latents_std``, SD3 and Flux ``shift_factor``, Stable Diffusion and PixArt neither. tadq applied
every key to every class, so a Stable Diffusion folder whose VAE config holds a ``shift_factor`` or latent
statistics (a VAE saved from another model), or an SD3 folder whose VAE holds latent statistics, gave other images
than diffusers; and ``tadq evaluate`` / ``tadq run`` decoded an SDXL folder's latents without its VAE's statistics,
so they scored other images than ``tadq sample`` wrote."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.pipelines.builders_transformer import build_sd3

import tadq
from tadq.experiments.workload import _text_to_image_workload

MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]  # away from (0, 1), so applying them changes the images


def _folder(source, tmp_path, **vae_config):
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | vae_config))
    return folder


def _diffusers_latents_and_images(pipe, **call):
    """diffusers' own latents and images (pt, in [0, 1]) for one prompt from the same generator seed."""
    base = type(pipe).tadq_base
    arguments = {"num_inference_steps": 2, **call}
    latents = base.__call__(pipe, "a cat", generator=torch.Generator().manual_seed(3), output_type="latent",
                            **arguments).images
    images = base.__call__(pipe, "a cat", generator=torch.Generator().manual_seed(3), output_type="pt",
                           **arguments).images
    return latents, images


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return build_sd3(tmp_path_factory.mktemp("decode") / "sd3")


@pytest.mark.parametrize(("which", "vae_config"), [
    ("sd", {"latents_mean": MEAN, "latents_std": STD, "shift_factor": 0.3}),  # SD reads neither
    ("sdxl", {"latents_mean": MEAN, "latents_std": STD, "shift_factor": 0.3}),  # SDXL: mean/std, no shift
    ("sdxl", {"shift_factor": 0.3}),  # SDXL without statistics: no shift either
    ("sd3", {"latents_mean": MEAN, "latents_std": STD}),  # SD3: its shift, not the statistics
])
def test_latents_are_decoded_with_the_vae_keys_the_pipeline_class_reads(which, vae_config, sd_folder, sdxl_folder,
                                                                        sd3_folder, condition_adapter, tmp_path):
    torch.set_num_threads(1)
    source = {"sd": sd_folder, "sdxl": sdxl_folder, "sd3": sd3_folder}[which]
    pipe = tadq.load_pipeline(_folder(source, tmp_path, **vae_config))
    call = {"max_sequence_length": 16} if which == "sd3" else {}
    latents, images = _diffusers_latents_and_images(pipe, **call)
    # the same operations on the same tensors as diffusers' __call__: equal bit for bit
    assert torch.equal(pipe.tadq_decode(latents, "pt"), images)


def test_evaluate_and_run_decode_a_pipeline_as_sample_does(sdxl_folder, condition_adapter, tmp_path):
    """The decoder `tadq run` scores a pipeline's rows with (and `tadq evaluate`, built the same way) reads the
    SDXL VAE's latents mean/std as diffusers and `tadq sample` do; it left them out."""
    torch.set_num_threads(1)
    folder = _folder(sdxl_folder, tmp_path, latents_mean=MEAN, latents_std=STD)
    workload = _text_to_image_workload(folder, "sdxl", 2.0, ["a dog"], ["a cat"], "", None, None)
    latents, images = _diffusers_latents_and_images(tadq.load_pipeline(folder))
    # the decoder gives [-1, 1]; diffusers' pt output is (x / 2 + 0.5).clamp(0, 1): undoing it costs at most two
    # float32 roundings of numbers below 1 in magnitude (2**-24 each), bounded here by 2**-22
    torch.testing.assert_close(workload.decoder(latents), images * 2 - 1, rtol=0, atol=2 ** -22)
