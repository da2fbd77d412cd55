"""The architecture of the shipped digits denoiser: a small DDPM-CIFAR10-like diffusers UNet2DModel."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

__all__ = ["build_digits_unet", "build_training_scheduler"]


def build_digits_unet(resolution: int = 16, channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DModel:
    """ResNet blocks with time-embedding projections and one self-attention level, as in DDPM-CIFAR10 but small.

    1.06 M parameters with the default channels; the attention level sits at half resolution.
    """
    if len(channels) != 3:
        raise ValueError(f"channels must have 3 entries (one per resolution level), got {channels}")
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


def build_training_scheduler() -> DDPMScheduler:
    """1000 training steps, linear betas, epsilon prediction (Ho et al. 2020)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=True,
    )
