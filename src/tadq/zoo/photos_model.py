"""The shipped photos DDPM: a class-conditional UNet2DModel on 32×32 RGB patches of scikit-image's photographs.

Reproduce the shipped weights with
``tadq zoo train-photos --out src/tadq/zoo/weights/photos-ddpm --threads 1`` (defaults below; the exact command,
seed, wall time and final loss are in ``training_info.json`` beside the weights). The training loop is the digits
model's (``tadq.zoo.train.train_ddpm``); only the data, the architecture and the label dropout differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel

from tadq.zoo.configs import PhotosTrainConfig
from tadq.zoo.photos import PhotosConfig, load_photos_split, num_photo_classes
from tadq.zoo.train import train_ddpm
from tadq.zoo.unet import check_unet_channels

__all__ = ["PhotosTrainConfig", "build_photos_unet", "null_label", "train_photos_ddpm"]


def null_label(num_classes: int | None = None) -> int:
    """The label of the unconditional branch: the last class embedding (index K for K photographs)."""
    return num_photo_classes() if num_classes is None else num_classes


def build_photos_unet(num_classes: int | None = None, channels: tuple[int, ...] = (32, 64, 64)) -> UNet2DModel:
    """The digits architecture (ResNet blocks, attention at 16×16) for RGB 32×32 with K + 1 class embeddings.

    The class embedding is added to the time embedding (diffusers' ``num_class_embeds``); label K is the null
    class, trained by label dropout, so one network samples unconditionally and with classifier-free guidance.
    """
    check_unet_channels(channels)
    k = num_photo_classes() if num_classes is None else num_classes
    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=k + 1,
    )


def train_photos_ddpm(config: PhotosTrainConfig, out_dir: str | Path, command: str = "",
                      progress: bool = True) -> Path:
    """Train on the training region of every photograph and save a ``DDPMPipeline`` layout with EMA weights."""
    torch.manual_seed(config.seed)
    split = load_photos_split(PhotosConfig())
    return train_ddpm(config, build_photos_unet(), split.train_images, out_dir, command=command,
                      labels=split.train_labels, null_label=null_label(), label_dropout=config.label_dropout,
                      desc="train photos DDPM", progress=progress)
