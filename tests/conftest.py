"""Shared fixtures: tiny random diffusers models (diffusers' own test sizes), built after a fixed seed."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel


def build_tiny_unet(seed: int = 0, num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, num_class_embeds=num_class_embeds,
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
def tiny_model_dir(tmp_path, tiny_unet, ddpm_scheduler):
    """A tiny model saved as a diffusers pipeline folder (unet/, scheduler/, model_index.json)."""
    path = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet, scheduler=ddpm_scheduler).save_pretrained(path)
    return path
