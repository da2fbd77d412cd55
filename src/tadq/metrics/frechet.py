"""FD-digits: the Fréchet distance between two image sets in the digits classifier's feature space.

This is FID's formula with a different feature extractor (the tadq digits CNN, not Inception-v3), so its values are
not comparable with published FID numbers; call it "FD-digits", never "FID".

How it is computed, and why not through torchmetrics' ``compute``: ``DigitFeatures`` is a module that
``torchmetrics.image.fid.FrechetInceptionDistance(feature=DigitFeatures(classifier))`` accepts (torchmetrics hands
custom modules the images untouched, so grey [-1, 1] images go straight in). But torchmetrics takes the matrix square
root through the eigenvalues of ``sigma1 @ sigma2`` with no ridge and returns float32, so a set smaller than the
feature width (singular covariances) gives a value resting on round-off. ``fd_digits`` therefore takes the
features, forms float64 means and covariances, adds ``eps = 1e-6`` to both covariance diagonals and uses
``scipy.linalg.sqrtm``. On full-rank sets the two agree to float32 precision (a test checks it).
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from tadq.metrics.classifier import DigitClassifier
from tadq.progress import progress_bar
from tadq.safefiles import nonfinite_count
from tadq.zoo.data import DigitsConfig, load_digits_split

__all__ = [
    "DEFAULT_RIDGE",
    "REFERENCE_SETS",
    "DigitFeatures",
    "digit_features",
    "fd_digits",
    "fd_digits_reference",
    "frechet_distance",
    "gaussian_statistics",
    "rank_deficiency_note",
]

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-6
_IMAG_TOLERANCE = 1e-3  # relative size of sqrtm's imaginary part above which we warn instead of silently dropping it


class DigitFeatures(nn.Module):
    """Feature extractor for FD-digits with the interface torchmetrics' Fréchet metric expects.

    Takes grey images (B, 1, H, W) in [-1, 1] and returns (B, num_features) penultimate classifier activations.
    It stays in eval mode whatever ``train()`` is called with, because BatchNorm and dropout in training mode would
    make the features depend on the batch.
    """

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> DigitFeatures:
        """Ignore ``mode``: a measuring instrument never trains."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Features (B, num_features) of images (B, 1, H, W) in [-1, 1]."""
        return self.classifier.features(images)


def _check_images(images: Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{name} must be grey images (N, 1, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    check_distance_inputs(images, name)


def check_distance_inputs(images: Tensor, name: str) -> None:
    """At least two images, every one finite: any feature space's Fréchet distance needs a covariance, and
    scipy's sqrtm spins for minutes on a NaN one before it fails with an internal error."""
    if len(images) < 2:
        raise ValueError(f"{name} needs at least 2 images for a covariance, got {len(images)}")
    if nonfinite := nonfinite_count(images):  # scipy's sqrtm spins for minutes on NaN covariances before it fails
        raise ValueError(f"{name}: {nonfinite} of {len(images)} images hold NaN or Inf; the model "
                         "produced non-finite samples, so no distance can be computed")


def digit_features(images: Tensor, classifier: DigitClassifier, batch_size: int = 256,
                   progress: bool = True) -> Tensor:
    """Float64 features (N, num_features) of images (N, 1, H, W) in [-1, 1], computed in batches in eval mode;
    ``progress=False`` (a caller's own setting) hides the bar a long extraction otherwise shows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = DigitFeatures(classifier)
    device = next(classifier.parameters()).device
    starts = range(0, len(images), batch_size)
    with progress_bar(starts, desc="FD-digits features", leave=False,
                      disable=not progress or len(starts) < 20) as bar:
        chunks = [extractor(images[i : i + batch_size].to(device)).cpu().double() for i in bar]
    return torch.cat(chunks)


def rank_deficiency_note(what: str, count: int, width: int) -> str:
    """The sentence said of ``what`` (``"FD-digits"``) from ``count`` samples of ``width`` features, or "" when
    N > D: logged by ``gaussian_statistics`` and printed by the reports beside such an FD (the log alone reached
    the console only; a results table read later showed a plain number, e.g. ``tadq run --num-samples 2``)."""
    if count > width:
        return ""
    return (f"{what} at {count} samples of {width} features: the samples' covariance has rank at most "
            f"{max(count - 1, 0)} < {width}, so the distance rests on the ridge and on the sample count; compare it "
            f"only at equal counts, and use more than {width} samples for a distance that means something.")


def gaussian_statistics(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean (D,) and unbiased covariance (D, D) of features (N, D).

    N ≤ D samples give a covariance of rank ≤ N − 1 < D: a Fréchet distance from it rests on the ridge along the
    missing directions and on round-off, which is logged as a warning (it was silent)."""
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    count, width = features.shape
    if note := rank_deficiency_note("Fréchet statistics", count, width):
        logger.warning(note)
    array = features.detach().cpu().double().numpy()  # float64 on the host: MPS has none
    # np.cov returns a 0-d array for one feature, which frechet_distance refused as a "shape mismatch"
    return array.mean(axis=0), np.atleast_2d(np.cov(array, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = DEFAULT_RIDGE
) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians.

    ``eps`` is added to both covariance diagonals (always, not only on failure, so the value never depends on a
    fallback branch); it makes singular covariances from small sets invertible and moves the value by about
    ``D * eps``. The imaginary part round-off leaves in the square root is dropped (with a warning if it is
    not negligible) and the result is clipped at 0, since the true distance cannot be negative.
    Shapes: ``mu`` (D,), ``sigma`` (D, D), all float64.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):  # a NaN mean gave NaN, a NaN covariance "try a larger eps"
            raise ValueError(f"{name} holds NaN or Inf: the features (or the images they came from) are not finite")
    ridge = eps * np.eye(len(mu1))
    sigma1, sigma2 = sigma1 + ridge, sigma2 + ridge
    # One BLAS thread: multi-threaded OpenBLAS made a 128x128 sqrtm take ~1 s instead of ~5 ms on a busy 2-core
    # machine, and even a 1024x1024 one ran 4x faster single-threaded there. (threadpoolctl comes with scikit-learn.)
    with threadpool_limits(limits=1, user_api="blas"):
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if np.iscomplexobj(covmean):
        imaginary = float(np.abs(covmean.imag).max())
        if imaginary > _IMAG_TOLERANCE * max(1.0, float(np.abs(covmean.real).max())):
            logger.warning("sqrtm left an imaginary part of %.3g; using the real part", imaginary)
        covmean = covmean.real
    if not np.all(np.isfinite(covmean)):
        raise FloatingPointError("matrix square root is not finite; try a larger eps")
    value = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def fd_digits(
    real: Tensor, fake: Tensor, classifier: DigitClassifier, batch_size: int = 256, eps: float = DEFAULT_RIDGE
) -> float:
    """FD-digits between real and generated images (N, 1, H, W) in [-1, 1]; lower means closer distributions.

    The value depends on the sample counts (a finite-sample bias), so compare runs only at equal counts and read it
    beside ``fd_digits_reference`` for the same count.
    """
    _check_images(real, "real")
    _check_images(fake, "fake")
    mu_r, sigma_r = gaussian_statistics(digit_features(real, classifier, batch_size))
    mu_f, sigma_f = gaussian_statistics(digit_features(fake, classifier, batch_size))
    return frechet_distance(mu_r, sigma_r, mu_f, sigma_f, eps=eps)


REFERENCE_SETS = ("heldout", "train")


def fd_digits_reference(
    n: int,
    seed: int,
    classifier: DigitClassifier,
    batch_size: int = 256,
    digits: DigitsConfig | None = None,
    reference_set: str = "heldout",
) -> float:
    """Real-vs-real FD-digits: the noise floor a perfect generator would score with ``n`` samples.

    The finite-sample bias of a Fréchet distance depends on both set sizes, so the floor must mirror how generated
    samples are scored. Two disjoint real sets are compared:

    - ``reference_set="heldout"``: the whole held-out split (359 images by default) against ``n`` train images
      drawn with ``seed``; the floor for ``fd_digits(heldout_images, n generated samples)``.
    - ``reference_set="train"``: the whole train split (1438 images by default) against ``n`` held-out images
      drawn with ``seed`` (``n`` <= held-out size); the floor for ``fd_digits(train_images, n generated samples)``.

    Args:
        n: number of images drawn from the other split (at least 2).
        seed: seed of the subset draw; vary it to see the spread of the floor.
        classifier: the feature extractor.
        batch_size: feature extraction batch size.
        digits: how the real digits are prepared; match the generator's resolution.
        reference_set: the split used whole, as the real set of the ``fd_digits`` call this floor is for.
    """
    if reference_set not in REFERENCE_SETS:
        raise ValueError(f"reference_set must be one of {REFERENCE_SETS}, got {reference_set!r}")
    split = load_digits_split(digits or DigitsConfig())
    if reference_set == "heldout":
        whole, pool = split.heldout_images, split.train_images
    else:
        whole, pool = split.train_images, split.heldout_images
    if not 2 <= n <= len(pool):
        other = "train" if reference_set == "heldout" else "held-out"
        raise ValueError(f"n must be in [2, {len(pool)}] ({other} split size), got {n}")
    index = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
    return fd_digits(whole, pool[index], classifier, batch_size=batch_size)
