"""32×32 RGB patches of the photographs bundled with scikit-image: the natural-image dataset of the photos model.

The photographs ship inside the scikit-image wheel (``skimage/data/*.png|jpg``), so nothing is downloaded. Each
photograph is one class (the stereo motorcycle pair is one class of two images). Every photograph is resized so
its short side is ``SHORT_SIDES`` pixels (two scales: close-up texture and a wider view), then cut into patches at a
fixed stride; everything is deterministic (no random crop), so the same call returns the same tensor.

The held-out split is by REGION, not by patch: the right-most ``heldout_fraction`` of every photograph's width
(in the photograph's own coordinates, so the same strip at every scale) is held out. A training patch must end at
least ``margin_fraction`` of the width left of the strip (the antialiasing filter of the resize reaches a few
pixels across), a held-out patch must lie inside the strip. So no held-out patch shares a pixel with a training
patch, at any scale; ``PatchSplit.train_boxes``/``heldout_boxes`` record where every patch came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PHOTOS", "PhotosConfig", "PatchSplit", "load_photo_images", "load_photos_split", "num_photo_classes"]

# class name -> skimage.data loader names (the motorcycle pair is one class of two images)
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut",),
    "chelsea": ("chelsea",),
    "coffee": ("coffee",),
    "rocket": ("rocket",),
    "hubble_deep_field": ("hubble_deep_field",),
    "retina": ("retina",),
    "immunohistochemistry": ("immunohistochemistry",),
    "motorcycle": ("motorcycle_left", "motorcycle_right"),
}


def num_photo_classes() -> int:
    """K, the number of photograph classes; a conditional model has K + 1 labels (the last one is null)."""
    return len(PHOTOS)


@dataclass(frozen=True)
class PhotosConfig:
    """How photographs are cut into patches.

    Args:
        patch: patch side in pixels.
        stride: step between patch corners (both axes), at every scale.
        short_sides: each photograph is resized so its short side has this many pixels, once per entry.
        heldout_fraction: right-most share of every photograph's width kept out of training.
        margin_fraction: gap (share of the width) between the last training pixel and the held-out strip.
    """

    patch: int = 32
    stride: int = 8
    short_sides: tuple[int, ...] = (256, 128)
    heldout_fraction: float = 0.25
    margin_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.patch < 4 or self.stride < 1:
            raise ValueError(f"patch must be >= 4 and stride >= 1, got {self.patch} and {self.stride}")
        if not self.short_sides or min(self.short_sides) < 2 * self.patch:
            raise ValueError(f"every short side must be >= 2 * patch, got {self.short_sides}")
        if not 0.0 < self.heldout_fraction < 0.5 or not 0.0 <= self.margin_fraction < 0.1:
            raise ValueError("heldout_fraction must be in (0, 0.5) and margin_fraction in [0, 0.1)")


@dataclass
class PatchSplit:
    """Patches (N, 3, P, P) in [-1, 1], labels (N,) and boxes (N, 5): image index, x0, y0, x1, y1 in the
    photograph's own pixel coordinates (float, for the overlap check)."""

    train_images: Tensor
    train_labels: Tensor
    train_boxes: Tensor
    heldout_images: Tensor
    heldout_labels: Tensor
    heldout_boxes: Tensor
    class_names: tuple[str, ...]


def _load(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(data, name)()


def load_photo_images() -> list[tuple[int, Tensor]]:
    """(class index, image (3, H, W) float in [0, 1]) for every bundled photograph, in class order."""
    images = []
    for label, names in enumerate(PHOTOS.values()):
        for name in names:
            array = _load(name)
            if array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"skimage.data.{name} is not an RGB image: shape {array.shape}")
            images.append((label, torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)))
    return images


def _corners(length: int, lo: float, hi: float, patch: int, stride: int) -> list[int]:
    """Patch starts s on a stride grid (anchored at lo) with the patch [s, s + patch) inside [lo, hi)."""
    start = int(np.ceil(lo))
    return list(range(start, int(np.floor(hi)) - patch + 1, stride)) if hi <= length else []


def load_photos_split(config: PhotosConfig | None = None) -> PatchSplit:
    """Cut every photograph into patches at every scale and split them by region (see the module docstring)."""
    config = config or PhotosConfig()
    parts: dict[str, list] = {key: [] for key in ("ti", "tl", "tb", "hi", "hl", "hb")}
    for index, (label, image) in enumerate(load_photo_images()):
        height, width = image.shape[-2:]
        for short in config.short_sides:
            scale = short / min(height, width)
            size = (round(height * scale), round(width * scale))
            resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False,
                                    antialias=True)[0].clamp(0.0, 1.0) * 2.0 - 1.0
            w = size[1]
            cut = (1.0 - config.heldout_fraction) * w
            regions = {"t": (0.0, cut - config.margin_fraction * w), "h": (cut, float(w))}
            for part, (lo, hi) in regions.items():
                xs = _corners(w, lo, hi, config.patch, config.stride)
                ys = list(range(0, size[0] - config.patch + 1, config.stride))
                for y in ys:
                    for x in xs:
                        parts[part + "i"].append(resized[:, y:y + config.patch, x:x + config.patch])
                        parts[part + "l"].append(label)
                        box = [index, x / scale, y / scale, (x + config.patch) / scale, (y + config.patch) / scale]
                        parts[part + "b"].append(box)
    return PatchSplit(
        train_images=torch.stack(parts["ti"]).contiguous(),
        train_labels=torch.tensor(parts["tl"], dtype=torch.long),
        train_boxes=torch.tensor(parts["tb"], dtype=torch.float64),
        heldout_images=torch.stack(parts["hi"]).contiguous(),
        heldout_labels=torch.tensor(parts["hl"], dtype=torch.long),
        heldout_boxes=torch.tensor(parts["hb"], dtype=torch.float64),
        class_names=tuple(PHOTOS),
    )
