"""Real Inception-v3 FID from a local TorchScript weights file, for users who need the standard feature space.

torchmetrics' built-in Inception path needs torch-fidelity, which needs torchvision; tadq does not depend on either
(they would pull a different torch build), so that path is not available. What is supported instead is the
TorchScript Inception published by the StyleGAN3 / clean-fid authors as ``inception-2015-12-05.pt`` (a port of the
TensorFlow FID graph): a file ``torch.jit.load`` can open, called as ``model(images, return_features=True)`` with
float images (B, 3, 299, 299) in [0, 255], returning pool features (B, 2048). Download it yourself and pass its path.

Grey [-1, 1] digits are rounded to 8-bit levels (what a PNG would hold), copied to three channels and resized
bilinearly to 299x299. Resizing filters differ between FID implementations, and 16x16 digits are far from
ImageNet, so these values are comparable only with other values from this function, never with published FIDs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.metrics.frechet import DEFAULT_RIDGE, check_distance_inputs, frechet_distance, gaussian_statistics
from tadq.progress import progress_bar
from tadq.zoo.data import to_unit_range

__all__ = ["INCEPTION_INPUT_SIZE", "InceptionFeatures", "inception_fid"]

logger = logging.getLogger(__name__)

INCEPTION_INPUT_SIZE = 299
_SUPPORTED = (
    "a TorchScript Inception file such as StyleGAN3's / clean-fid's inception-2015-12-05.pt, loadable with "
    "torch.jit.load and called as model(images_0_255 (B, 3, 299, 299), return_features=True) -> (B, 2048); "
    "torchmetrics' own Inception (torch-fidelity + torchvision) cannot be used in tadq"
)


class InceptionFeatures(nn.Module):
    """Inception pool features of grey images, loaded from a local TorchScript file.

    Args:
        weights_path: path of the TorchScript file (see the module docstring for the supported format).
        device: where to load and run the network.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not TorchScript, or calling it as described does not give (B, D) features.
    """

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights file {path} does not exist; expected {_SUPPORTED}")
        try:
            network = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"{path} is not a TorchScript file ({error.__class__.__name__}); expected {_SUPPORTED}"
                             ) from error
        self.network = network.eval()
        self.device = torch.device(device)
        probe = self._call(torch.zeros(1, 3, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE, device=self.device), path)
        self.num_features = int(probe.shape[1])  # 2048 for inception-2015-12-05.pt
        if self.num_features != 2048:
            logger.warning("%s gives %d features, not Inception's 2048", path, self.num_features)

    def _call(self, images: Tensor, path: Path | None = None) -> Tensor:
        try:
            features = self.network(images, return_features=True)
        except Exception as error:  # TorchScript raises various types for a wrong signature
            raise ValueError(f"calling {path or 'the Inception network'} failed ({error}); expected {_SUPPORTED}"
                             ) from error
        if not isinstance(features, Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"expected features (B, D) from the network, got {shape}; expected {_SUPPORTED}")
        return features

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Ignore ``mode``: the feature network always runs in eval mode."""
        return super().train(False)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """Grey (B, 1, H, W) in [-1, 1] to 8-bit-level floats (B, 3, 299, 299) in [0, 255]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        levels = torch.round(to_unit_range(images.float()) * 255.0)
        levels = levels.expand(-1, 3, -1, -1)
        if levels.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            size = (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
            levels = F.interpolate(levels, size=size, mode="bilinear", align_corners=False)
        return levels.clamp(0.0, 255.0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, num_features) of images (B, 1, H, W) in [-1, 1]."""
        return self._call(self.prepare(images.to(self.device)))


def _features(images: Tensor, extractor: InceptionFeatures, batch_size: int, progress: bool = True) -> Tensor:
    starts = range(0, len(images), batch_size)
    with progress_bar(starts, desc="Inception features", leave=False,
                      disable=not progress or len(starts) < 4) as bar:
        chunks = [extractor(images[i : i + batch_size]).cpu().double() for i in bar]
    return torch.cat(chunks)


def inception_fid(
    real: Tensor,
    fake: Tensor,
    weights_path: str | Path,
    batch_size: int = 50,
    eps: float = DEFAULT_RIDGE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> float:
    """FID between real and generated images (N, C, H, W) in [-1, 1] (C = 1 or 3, the same in both) with a local
    TorchScript Inception.

    The distance is computed as in ``tadq.metrics.frechet.frechet_distance`` (float64, ridge ``eps``);
    ``progress=False`` hides the feature-extraction bar.
    """
    for name, images in (("real", real), ("fake", fake)):
        check_distance_inputs(images, name)
    if real.ndim != 4 or fake.ndim != 4 or real.shape[1] != fake.shape[1]:  # prepare() makes both 3-channel
        raise ValueError(f"real images {tuple(real.shape[1:])} and generated images {tuple(fake.shape[1:])} "
                         "(C, H, W) must be image batches with the same channels: grey digits copied to three "
                         "channels and colour samples are different data, not a distance between generators")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = InceptionFeatures(weights_path, device=device)
    mu_r, sigma_r = gaussian_statistics(_features(real, extractor, batch_size, progress))
    mu_f, sigma_f = gaussian_statistics(_features(fake, extractor, batch_size, progress))
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f, eps=eps)
