"""scikit-learn's bundled digits as a tiny image dataset for diffusion.

The dataset ships inside scikit-learn (1797 grey 8x8 images, values 0..16), so nothing is downloaded.
Images are upsampled bilinearly to ``resolution`` and scaled to [-1, 1], the range DDPM training expects.
The train/held-out split is fixed by ``split_seed`` so every run of tadq sees the same held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tadq.zoo.configs import SUPPORTED_RESOLUTIONS

__all__ = ["DigitsConfig", "DigitsSplit", "load_digits_split", "to_unit_range"]



@dataclass(frozen=True)
class DigitsConfig:
    """How the digits images are prepared.

    Args:
        resolution: output side length in pixels; 16 is the shipped default (6x cheaper than 32 on CPU,
            and the 8x8 source holds no detail a 32x32 image could add).
        heldout_fraction: share of the 1797 images kept out of training (for FD reference and classifier accuracy).
        split_seed: seed of the fixed permutation that defines the split.
    """

    resolution: int = 16
    heldout_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution not in SUPPORTED_RESOLUTIONS:
            raise ValueError(f"resolution must be one of {SUPPORTED_RESOLUTIONS}, got {self.resolution}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass
class DigitsSplit:
    """Images (N, 1, R, R) in [-1, 1] and their labels (N,), split into train and held-out parts."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] images to [0, 1] (for PNGs, PSNR and SSIM)."""
    return ((images.clamp(-1.0, 1.0) + 1.0) / 2.0).clamp(0.0, 1.0)


def _prepare(raw: np.ndarray, resolution: int) -> torch.Tensor:
    images = torch.from_numpy(raw.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8) in [0, 1]
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0) * 2.0 - 1.0


def load_digits_split(config: DigitsConfig | None = None) -> DigitsSplit:
    """Load the digits, upsample them and split them with a fixed permutation."""
    from sklearn.datasets import load_digits

    config = config or DigitsConfig()
    bunch = load_digits()
    images = _prepare(bunch.data, config.resolution)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.split_seed))
    n_heldout = int(round(len(labels) * config.heldout_fraction))
    if not 0 < n_heldout < len(labels):  # an empty part failed only after training (accuracy of no images)
        raise ValueError(f"heldout_fraction={config.heldout_fraction} of {len(labels)} digits leaves "
                         f"{'no held-out' if n_heldout == 0 else 'no training'} image; choose a fraction that keeps "
                         "at least one image in each part")
    heldout, train = order[:n_heldout], order[n_heldout:]
    return DigitsSplit(images[train], labels[train], images[heldout], labels[heldout])
