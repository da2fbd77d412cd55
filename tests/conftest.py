"""Shared fixtures: tiny random diffusers models (diffusers' own test sizes), built after a fixed seed."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel


def build_tiny_unet(seed: int = 0, num_class_embeds: int | None = None, dropout: float = 0.0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, num_class_embeds=num_class_embeds,
        dropout=dropout,
    ).eval()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)


@pytest.fixture
def tiny_unet() -> UNet2DModel:
    return build_tiny_unet()


@pytest.fixture
def ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


@pytest.fixture
def copy(artefact, tmp_path) -> Path:
    """A copy, for one test to damage or edit, of the ``artefact`` fixture of the requesting module (a tiny saved
    artefact built once per module, of the preset and corrections that module needs)."""
    return Path(shutil.copytree(artefact, tmp_path / "q"))


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_unet, ddpm_scheduler):
    """A tiny model saved as a diffusers pipeline folder (unet/, scheduler/, model_index.json)."""
    path = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet, scheduler=ddpm_scheduler).save_pretrained(path)
    return path


def build_tiny_sd_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A Stable Diffusion 1.x-layout ``UNet2DConditionModel`` (cross-attention on a (N, L, 16) text embedding),
    diffusers' own class at test size: 4 latent channels, 8x8, one cross-attention down and up block."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
    )
    return UNet2DConditionModel(**(config | overrides)).eval()


SDXL_POOLED_DIM = 8  # the tiny SDXL UNet's pooled text width D'
SDXL_TIME_EMBED_DIM = 4  # addition_time_embed_dim: each of the 6 time ids gets a 4-wide sinusoid


def build_tiny_sdxl_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """An SDXL-layout ``UNet2DConditionModel``: ``addition_embed_type="text_time"`` (pooled text (N, 8) + 6 time ids
    added to the timestep embedding), linear transformer projections, two transformer layers in the deep block."""
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
    )
    return UNet2DConditionModel(**(config | overrides)).eval()


@contextlib.contextmanager
def counting_forwards(module: torch.nn.Module):
    """Counts ``module``'s forwards inside the block (a refusal that must come before any network call)."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()
