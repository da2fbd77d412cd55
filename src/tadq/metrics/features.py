"""Feature spaces for distribution metrics: a feature extractor, the real images it compares against, and (when it
can) a label reader for agreement — chosen by the user, and refused when it does not fit the data.

A Fréchet distance is only as meaningful as its features: the shipped digits classifier reads 1×16×16 grey digits
and nothing else. ``FeatureSpace.check_fits`` raises before any sampling when the model's samples have another
shape, so an RGB model is never scored with digit features (and a grey model only when the user asks for it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from tadq.metrics.classifier import DigitClassifier, load_digit_classifier
from tadq.metrics.frechet import (
    check_distance_inputs,
    digit_features,
    fd_digits_reference,
    frechet_distance,
    gaussian_statistics,
)
from tadq.metrics.image import classifier_agreement, predicted_labels
from tadq.metrics.photo_classifier import PhotoClassifier, load_photo_classifier, photo_features
from tadq.zoo.data import SUPPORTED_RESOLUTIONS, DigitsConfig, load_digits_split
from tadq.zoo.photos import PhotosConfig, load_photos_split

__all__ = ["FeatureSpace", "MetricMismatchError", "DigitsFeatureSpace", "PhotosFeatureSpace",
           "TorchScriptFeatureSpace", "load_reference_images"]


class MetricMismatchError(ValueError):
    """A metric was asked for on data it cannot measure (e.g. digit features on RGB images)."""


class FeatureSpace(ABC):
    """What a Fréchet distance is measured in: features of images in [-1, 1] and a set of real images.

    Args (attributes):
        name: short name; the metric is reported as ``fd_<name>`` ("FD-<name>", never "FID").
        real: real images (M, C, H, W) in [-1, 1], the reference distribution.
        input_shape: the (C, H, W) the extractor reads; ``None`` when it takes any shape.
        floor: real-vs-real distance a perfect generator would score, when known.
    """

    name: str
    real: Tensor
    input_shape: tuple[int, int, int] | None = None
    floor: float | None = None
    reads_labels = False  # whether prompted_accuracy can read a sample's label back (a classifier's features)

    @abstractmethod
    def features(self, images: Tensor, progress: bool = True) -> Tensor:
        """Float64 features (N, D) of images (N, C, H, W) in [-1, 1]; ``progress=False`` (the caller's setting)
        hides any bar the extraction shows."""

    def agreement(self, images: Tensor, reference: Tensor) -> float | None:
        """Share of samples whose predicted label equals the reference sample's; ``None`` without a label reader."""
        return None

    def prompted_accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Share of conditional samples read as the label they were prompted with (a CLIP-score stand-in).

        Raises:
            MetricMismatchError: this feature space reads no labels.
        """
        raise MetricMismatchError(f"FD-{self.name} features read no labels, so prompt agreement cannot be measured")

    def feature_width(self) -> int:
        """D, the number of features per image (read from two real images: the extractor is the authority)."""
        return int(self.features(self.real[:2], progress=False).shape[1])

    @property
    def metric_key(self) -> str:
        return f"fd_{self.name}"

    def check_fits(self, sample_shape: tuple[int, ...], what: str = "the samples") -> None:
        """Raise ``MetricMismatchError`` unless samples of ``sample_shape`` (C, H, W) can be read by the extractor."""
        if self.input_shape is not None and tuple(sample_shape) != tuple(self.input_shape):
            raise MetricMismatchError(
                f"FD-{self.name} reads images of shape {tuple(self.input_shape)} (C, H, W) but {what} are "
                f"{tuple(sample_shape)}; choose features that fit the data (tadq evaluate --features PATH "
                "--reference-images PATH) or none (--features none: PSNR, SSIM and trajectory error only)")

    def fd(self, images: Tensor, progress: bool = True) -> float:
        """Fréchet distance between the real images and ``images`` in this feature space (float64, ridge 1e-6);
        ``progress=False`` hides the feature-extraction bars."""
        self.check_fits(tuple(images.shape[1:]))
        if len(images) < 2:
            raise MetricMismatchError(f"FD-{self.name} needs at least 2 samples for a covariance, got {len(images)}")
        check_distance_inputs(images, f"FD-{self.name}")
        mu_r, sigma_r = gaussian_statistics(self.features(self.real, progress))
        mu_f, sigma_f = gaussian_statistics(self.features(images, progress))
        return frechet_distance(mu_r, sigma_r, mu_f, sigma_f)


class DigitsFeatureSpace(FeatureSpace):
    """The shipped digits classifier's penultimate features against the real training digits (FD-digits)."""

    name = "digits"
    reads_labels = True

    def __init__(self, resolution: int, classifier: DigitClassifier | None = None) -> None:
        if resolution not in SUPPORTED_RESOLUTIONS:  # DigitsConfig said only "resolution must be one of ..."
            raise MetricMismatchError(
                f"FD-digits compares samples with the real digits at their size, which exist at "
                f"{SUPPORTED_RESOLUTIONS} pixels, not {resolution}; choose features that fit the data (tadq evaluate "
                "--features FILE.pt --reference-images FILE) or none (--features none: PSNR, SSIM and trajectory "
                "error only)")
        self.classifier = classifier if classifier is not None else load_digit_classifier()
        digits_config = DigitsConfig(resolution=resolution)
        digits = load_digits_split(digits_config)
        self.real = digits.train_images
        self.input_shape = (1, resolution, resolution)
        self.heldout_count = len(digits.heldout_images)
        self.floor = fd_digits_reference(n=self.heldout_count, seed=0, classifier=self.classifier,
                                         digits=digits_config, reference_set="train")

    def check_fits(self, sample_shape: tuple[int, ...], what: str = "the samples") -> None:
        """Grey images of any size fit (the classifier resizes them to its own resolution); colour images do not."""
        if len(sample_shape) != 3 or sample_shape[0] != 1:
            raise MetricMismatchError(
                f"FD-digits reads grey digits (1, H, W) but {what} are {tuple(sample_shape)}; choose features "
                "that fit the data (tadq evaluate --features FILE.pt --reference-images FILE) or none "
                "(--features none: PSNR, SSIM and trajectory error only)")

    def features(self, images: Tensor, progress: bool = True) -> Tensor:
        return digit_features(images, self.classifier, progress=progress)

    def agreement(self, images: Tensor, reference: Tensor) -> float | None:
        return classifier_agreement(images, reference, self.classifier)

    def prompted_accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Share of samples the digit classifier reads as the digit their prompt (or class label) asked for."""
        self.check_fits(tuple(images.shape[1:]))
        return float((predicted_labels(images, self.classifier) == labels.cpu()).float().mean())


class PhotosFeatureSpace(FeatureSpace):
    """The photo classifier's penultimate features against the held-out region patches (FD-photos).

    Real images are the held-out strips of every photograph (never trained on, by the model or the classifier).
    The floor is ``floor_samples`` training patches (drawn with ``floor_seed``) against the same held-out patches:
    what a generator that reproduced the training regions exactly would score with that many samples.
    """

    name = "photos"
    reads_labels = True

    def __init__(self, classifier: PhotoClassifier | None = None, floor_samples: int = 1000,
                 floor_seed: int = 0) -> None:
        self.classifier = classifier if classifier is not None else load_photo_classifier()
        split = load_photos_split(PhotosConfig())
        self.real, self.input_shape = split.heldout_images, tuple(split.heldout_images.shape[1:])
        self.class_names = split.class_names
        self._real_features = photo_features(self.real, self.classifier)
        order = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(floor_seed))
        self.floor_samples = min(floor_samples, len(order))
        self.floor = self.fd(split.train_images[order[: self.floor_samples]])

    def features(self, images: Tensor, progress: bool = True) -> Tensor:
        if images is self.real and hasattr(self, "_real_features"):
            return self._real_features
        return photo_features(images, self.classifier)

    def agreement(self, images: Tensor, reference: Tensor) -> float | None:
        return classifier_agreement(images, reference, self.classifier)

    def prompted_accuracy(self, images: Tensor, labels: Tensor) -> float:
        """Share of conditional samples the classifier reads as the photograph they were prompted with."""
        return float((predicted_labels(images, self.classifier) == labels.cpu()).float().mean())


def load_reference_images(path: str | Path) -> Tensor:
    """Real images (M, C, H, W) in [-1, 1] from a safetensors file holding one tensor named ``images``.

    Safetensors, not pickle: a file handed to tadq is read, never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference images {path} do not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    if keys != ["images"]:
        raise ValueError(f"{path} must hold exactly one tensor named 'images' (M, C, H, W) in [-1, 1]; found {keys}")
    images = load_file(str(path))["images"]
    if not images.is_floating_point():  # uint8 0..255 (a PNG's pixels) passed the range test only when all dark
        raise ValueError(f"{path}: 'images' is {images.dtype}, not floating point; store them as floats in [-1, 1] "
                         "(uint8 pixels p: p / 127.5 - 1)")
    images = images.float()
    if images.ndim != 4 or len(images) < 2:
        raise ValueError(f"{path}: 'images' must be (M ≥ 2, C, H, W), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{path}: 'images' must be finite and in [-1, 1]; it holds NaN or Inf")
    low, high = float(images.min()), float(images.max())
    if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
        raise ValueError(f"{path}: 'images' must be in [-1, 1], got values in [{low:.4g}, {high:.4g}]")
    if low >= 0.0:  # [0, 1] images: every real image would sit in the upper half of the samples' range
        raise ValueError(f"{path}: 'images' has no value below 0 (range [{low:.4g}, {high:.4g}]): images in [0, 1], "
                         "not [-1, 1]; the distance to [-1, 1] samples would be wrong. Store x * 2 - 1")
    return images


class TorchScriptFeatureSpace(FeatureSpace):
    """A user's feature extractor (a TorchScript file: images (B, C, H, W) in [-1, 1] → (B, D)) and real images.

    Args:
        extractor_path: the TorchScript file (``torch.jit.save``); loaded with ``torch.jit.load``, no pickle.
        reference_path: a safetensors file with the real images (``load_reference_images``).
        name: the metric's name (reported as ``fd_<name>``).
        batch_size: images per extractor call.
    """

    def __init__(self, extractor_path: str | Path, reference_path: str | Path, name: str = "custom",
                 batch_size: int = 256) -> None:
        if not name.isidentifier():
            raise ValueError(f"feature space name must be an identifier (it becomes fd_<name>), got {name!r}")
        extractor_path = Path(extractor_path)
        if not extractor_path.is_file():
            raise FileNotFoundError(f"feature extractor {extractor_path} does not exist")
        try:
            self.extractor = torch.jit.load(str(extractor_path), map_location="cpu").eval()
        except Exception as error:  # TorchScript raises RuntimeError subclasses for any damaged archive
            raise ValueError(f"{extractor_path} is not a TorchScript module: {error}") from error
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.name, self.batch_size = name, batch_size
        self.extractor_path = extractor_path
        self.real = load_reference_images(reference_path)
        self.input_shape = tuple(self.real.shape[1:])
        # the real images' features now: an extractor that cannot read this shape, or returns no (N, D) features,
        # is named before any model samples (the samples must have the real images' shape, ``check_fits``)
        self._real_features = self.features(self.real)
        if not torch.isfinite(self._real_features).all():
            raise MetricMismatchError(f"the feature extractor {extractor_path} returned NaN or Inf features for the "
                                      f"real images {tuple(self.real.shape)}")

    @torch.no_grad()
    def features(self, images: Tensor, progress: bool = True) -> Tensor:
        if images is self.real and hasattr(self, "_real_features"):
            return self._real_features
        try:
            chunks = [self.extractor(images[i: i + self.batch_size].float()).cpu().double()
                      for i in range(0, len(images), self.batch_size)]
        except Exception as error:  # TorchScript re-raises a shape error as a long interpreter traceback
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            message = lines[-1] if lines else type(error).__name__  # the cause, after the TorchScript source
            raise MetricMismatchError(f"the feature extractor {self.extractor_path} cannot read images of shape "
                                      f"{tuple(images.shape[1:])} (C, H, W): {message}") from error
        features = torch.cat(chunks)
        if features.ndim != 2 or len(features) != len(images) or features.shape[1] < 1:
            raise MetricMismatchError(f"the feature extractor {self.extractor_path} returned shape "
                                      f"{tuple(features.shape)} for {len(images)} images; it must return (N, D)")
        return features
