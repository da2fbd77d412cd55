"""The architecture of the shipped digits denoiser: a small DDPM-CIFAR10-like diffusers UNet2DModel."""

from __future__ import annotations

from diffusers import DDPMScheduler, UNet2DModel

__all__ = ["build_digits_unet", "build_training_scheduler", "check_unet_channels"]

NORM_GROUPS, ATTENTION_HEAD_DIM = 8, 16


def check_unet_channels(channels: tuple[int, ...]) -> None:
    """ValueError unless ``channels`` fit the shipped UNet layout: 3 levels, each a multiple of the group norm's 8
    groups, and at least one 16-wide attention head at the attention level (the second) and in the middle block
    (the last): a narrower width built a model with zero heads that died in a ZeroDivisionError at its first
    forward pass, after the training data was loaded."""
    if len(channels) != 3:
        raise ValueError(f"channels must have 3 entries (one per resolution level), got {channels}")
    if any(not isinstance(c, int) or c < NORM_GROUPS or c % NORM_GROUPS for c in channels):
        raise ValueError(f"every width in channels must be a positive multiple of {NORM_GROUPS} (group norm), got "
                         f"{channels}")
    if min(channels[1], channels[-1]) < ATTENTION_HEAD_DIM:
        raise ValueError(f"channels[1] and channels[-1] carry self-attention with {ATTENTION_HEAD_DIM}-wide heads: "
                         f"each must be >= {ATTENTION_HEAD_DIM}, got {channels}")


def build_digits_unet(resolution: int = 16, channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DModel:
    """ResNet blocks with time-embedding projections and one self-attention level, as in DDPM-CIFAR10 but small.

    1.06 M parameters with the default channels; the attention level sits at half resolution.
    """
    check_unet_channels(channels)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=NORM_GROUPS,
        attention_head_dim=ATTENTION_HEAD_DIM,
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
