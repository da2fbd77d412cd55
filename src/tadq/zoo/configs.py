"""The training configs of the shipped models and classifiers (``tadq zoo train*``) and their checks, importable
without torch: the command line builds a config, refusing a bad flag, before it imports torch and diffusers. The
trainers (``tadq.zoo.train``, ``tadq.zoo.photos_model``, ``tadq.zoo.t2i``, ``tadq.zoo.dit``,
``tadq.metrics.classifier``, ``tadq.metrics.photo_classifier``) re-export them where they were."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tadq.names import check_seed

__all__ = ["SUPPORTED_RESOLUTIONS", "TrainConfig", "check_training_fields", "check_learning_rates",
           "ClassifierTrainConfig", "PhotosTrainConfig", "PhotoClassifierTrainConfig", "T2ITrainConfig",
           "DiTTrainConfig"]

SUPPORTED_RESOLUTIONS = (8, 16, 32)
"""The image sides of the digits data (``tadq.zoo.data.DigitsConfig``)."""


@dataclass(frozen=True)
class TrainConfig:
    """DDPM training of the digits UNet.

    Args:
        steps: optimiser steps.
        batch_size: images per step.
        learning_rate: AdamW peak learning rate (after a linear warm-up of ``warmup_steps``).
        warmup_steps: linear warm-up length.
        ema_decay: decay of the exponential moving average whose weights are saved (DDPM used 0.9999 for 800k
            steps; a shorter run needs a shorter memory).
        seed: seeds initialisation, batch order, timesteps and noise.
        resolution: image side length (see ``DigitsConfig``).
        checkpoint_every: steps between resumable checkpoints.
    """

    steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    resolution: int = 16
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        check_training_fields(self)
        if self.resolution not in SUPPORTED_RESOLUTIONS:  # refused here, not after --out was created
            raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution}")


def check_training_fields(config: Any, extra_counts: tuple[str, ...] = (), dropout: str | None = None) -> None:
    """ValueError for a training config's bad field: counts (steps, batch size, checkpoint interval and
    ``extra_counts``) below 1, an EMA decay outside (0, 1), or the ``dropout`` field (label/prompt dropout)
    outside (0, 1) — the checks every shipped model's training config shares."""
    for name in ("steps", "batch_size", "checkpoint_every", *extra_counts):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    check_seed("seed", config.seed)  # seed + 2 seeds the later stages: a 64-bit one overflowed after stage 1
    if not 0.0 < config.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in (0, 1), got {config.ema_decay}")
    check_learning_rates(config)
    if dropout is not None and not 0.0 < getattr(config, dropout) < 1.0:
        raise ValueError(f"{dropout} must be in (0, 1), got {getattr(config, dropout)}")


def check_learning_rates(config: Any, names: tuple[str, ...] = ("learning_rate",)) -> None:
    """ValueError for a learning rate that is not a finite number > 0 (AdamW would refuse it only once training
    starts, after data loading and any earlier stage)."""
    for name in names:
        value = getattr(config, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class ClassifierTrainConfig:
    """Training of the digits classifier.

    Args:
        epochs: passes over the train split.
        batch_size: images per optimiser step.
        lr: AdamW peak learning rate, decayed to zero with a cosine schedule.
        weight_decay: AdamW weight decay.
        seed: seeds initialisation, batch order, augmentation and dropout.
        resolution: image side length (one of ``tadq.zoo.data.SUPPORTED_RESOLUTIONS``).
        max_shift: largest random shift in pixels (each axis) applied to training images, so the classifier does
            not depend on digits being perfectly centred as generated samples may not be.
        noise_std: std of Gaussian noise added to training images (in [-1, 1] units), so the residual noise of
            generated or quantized samples does not throw the classifier off.
    """

    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    resolution: int = 16
    max_shift: int = 1
    noise_std: float = 0.1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "noise_std"):  # lr=inf trained and saved a NaN classifier
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution}")
        if not 0 <= self.max_shift < self.resolution // 2:
            raise ValueError(f"max_shift must be in [0, {self.resolution // 2 - 1}], got {self.max_shift}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


@dataclass(frozen=True)
class PhotosTrainConfig:
    """DDPM training of the photos UNet (fields as ``tadq.zoo.train.TrainConfig``, plus the label dropout).

    Args:
        label_dropout: probability that a training label is replaced by the null label (unconditional branch).
    """

    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 250
    label_dropout: float = 0.15

    def __post_init__(self) -> None:
        check_training_fields(self, dropout="label_dropout")


@dataclass(frozen=True)
class PhotoClassifierTrainConfig:
    """Training of the photo classifier.

    Args:
        epochs: passes over the training patches.
        batch_size: patches per step.
        lr: AdamW peak learning rate, cosine-decayed to zero.
        weight_decay: AdamW weight decay.
        seed: seeds initialisation, dropout, batch order and augmentation.
        noise_std: Gaussian noise added to training patches ([-1, 1] units), so the residual noise of generated
            or quantized samples does not throw the classifier off.
        flip: random horizontal flips (a photograph's content does not depend on the side it is seen from).
    """

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    noise_std: float = 0.1
    flip: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"epochs must be >= 1 and batch_size >= 2, got {self.epochs} and {self.batch_size}")
        for name in ("lr", "weight_decay", "noise_std"):  # lr=inf trained and saved a NaN classifier
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.lr <= 0 or self.weight_decay < 0 or self.noise_std < 0:
            raise ValueError("lr must be > 0, weight_decay and noise_std >= 0")


@dataclass(frozen=True)
class T2ITrainConfig:
    """Both training stages of the text-to-image digits model.

    Args:
        seed: seeds every initialisation, batch, timestep, noise draw and prompt choice.
        vae_steps, vae_batch_size, vae_learning_rate: stage 1 (AdamW, constant rate).
        kl_weight: weight of the KL term per latent element against the per-pixel MSE.
        vae_channels: encoder/decoder widths; one downsampling per extra level (2 levels: 16×16 → 8×8).
        steps, batch_size, learning_rate, warmup_steps, ema_decay, checkpoint_every: stage 2, as
            ``tadq.zoo.train.TrainConfig`` (AdamW, warm-up then constant, clipping at 1, EMA weights saved).
        prompt_dropout: probability a training prompt is replaced by "" (the unconditional branch of guidance).
        train_text_encoder: train the text encoder with the UNet (else it stays at its random initialisation).
        unet_channels: UNet widths (cross-attention at every level and in the middle).
        text_hidden, text_layers, max_length: text encoder width, depth and the tokenizer's/position limit.
    """

    seed: int = 0
    vae_steps: int = 400
    vae_batch_size: int = 64
    vae_learning_rate: float = 1e-3
    kl_weight: float = 1e-4
    vae_channels: tuple[int, ...] = (32, 64)
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 200
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    prompt_dropout: float = 0.1
    train_text_encoder: bool = True
    unet_channels: tuple[int, ...] = (32, 64)
    text_hidden: int = 32
    text_layers: int = 2
    max_length: int = 16
    resolution: int = field(default=16)

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch_size", "steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in (0, 1), got {self.prompt_dropout}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        check_learning_rates(self, ("vae_learning_rate", "learning_rate"))
        check_seed("seed", self.seed)  # seed + 2 seeds stage 2: a 64-bit one overflowed there, after stage 1
        if self.text_hidden % 2 or self.text_hidden < 8:
            raise ValueError(f"text_hidden must be even and >= 8, got {self.text_hidden}")
        for name in ("vae_channels", "unet_channels"):  # the UNet's were refused by its group norm after stage 1
            widths = getattr(self, name)
            if not widths or any(not isinstance(w, int) or w < 8 or w % 8 for w in widths):
                raise ValueError(f"{name} must be one or more positive multiples of 8 (group norm with 8 groups), "
                                 f"got {widths}")

    def vae_part(self) -> dict[str, Any]:
        """The fields stage 1 depends on (a saved VAE is reused only when these match)."""
        keys = ("seed", "vae_steps", "vae_batch_size", "vae_learning_rate", "kl_weight", "vae_channels", "resolution")
        return json.loads(json.dumps({k: getattr(self, k) for k in keys}))


@dataclass(frozen=True)
class DiTTrainConfig:
    """DDPM training of the digits DiT (optimisation fields as ``tadq.zoo.train.TrainConfig``).

    Args:
        label_dropout: probability that a training label is replaced by the null class (unconditional branch).
        heads, head_dim, layers, patch_size: the transformer (width = heads × head_dim).
    """

    steps: int = 6000
    batch_size: int = 128
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    label_dropout: float = 0.1
    heads: int = 4
    head_dim: int = 32
    layers: int = 4
    patch_size: int = 2

    def __post_init__(self) -> None:
        check_training_fields(self, ("heads", "head_dim", "layers", "patch_size"), dropout="label_dropout")
