"""Paired per-sample metrics: how far a quantized model's sample is from the full-precision sample of the same noise.

Every function takes two batches (N, 1, H, W) in [-1, 1] where row i of both came from the same initial noise (and
the same per-step noise for stochastic samplers), so differences are caused by quantization alone.
Images are clipped to [-1, 1] and mapped to [0, 1] first (what a saved PNG holds), so ``data_range`` is 1.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from tadq.metrics.classifier import DigitClassifier
from tadq.safefiles import nonfinite_count
from tadq.zoo.data import to_unit_range

__all__ = [
    "PSNR_CAP_DB",
    "SSIM_SIGMA",
    "classifier_agreement",
    "predicted_labels",
    "psnr_per_sample",
    "ssim_per_sample",
]

PSNR_CAP_DB = 100.0
"""Upper bound on reported PSNR. Identical images have infinite PSNR, which would make any mean infinite; capping
at 100 dB equals flooring the MSE at 1e-10 (on [0, 1] images), far below one 8-bit grey level (MSE ~1.5e-5)."""

SSIM_WINDOW = 11  # torchmetrics' window for sigma 1.5
SSIM_MIN_SIDE = SSIM_WINDOW // 2 + 1  # reflect padding needs a side larger than the pad
SSIM_SIGMA = 1.5
"""Gaussian window std of SSIM (Wang et al. 2004's value; the window is 11x11, reflect-padded, fine at 16x16)."""


def _paired_unit(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    if x.shape != ref.shape or x.ndim != 4:
        raise ValueError(f"x and ref must be image batches (N, C, H, W) of equal shape, got {tuple(x.shape)} "
                         f"and {tuple(ref.shape)}")
    for name, images in (("the images", x), ("the reference images", ref)):  # clamping would score an Inf pixel
        if nonfinite := nonfinite_count(images):
            raise ValueError(f"{nonfinite} of {len(images)} of {name} hold NaN or Inf pixels: a "
                             "PSNR/SSIM of non-finite images means nothing")
    return to_unit_range(x.detach().float()), to_unit_range(ref.detach().float())


def psnr_per_sample(x: Tensor, ref: Tensor) -> Tensor:
    """PSNR in dB (N,) of each image against its reference, capped at ``PSNR_CAP_DB`` (identical images)."""
    x, ref = _paired_unit(x, ref)
    values = peak_signal_noise_ratio(x, ref, data_range=1.0, reduction="none", dim=(1, 2, 3))
    return values.clamp(max=PSNR_CAP_DB)


def ssim_per_sample(x: Tensor, ref: Tensor) -> Tensor:
    """SSIM (N,) of each image against its reference; 1 means identical."""
    x, ref = _paired_unit(x, ref)
    if min(x.shape[-2:]) < SSIM_MIN_SIDE:
        raise ValueError(f"SSIM needs images of at least {SSIM_MIN_SIDE}×{SSIM_MIN_SIDE} (its {SSIM_WINDOW}×"
                         f"{SSIM_WINDOW} window is reflect-padded by {SSIM_WINDOW // 2}), got "
                         f"{x.shape[-2]}×{x.shape[-1]}")
    return structural_similarity_index_measure(x, ref, data_range=1.0, sigma=SSIM_SIGMA, reduction="none")


@torch.no_grad()
def predicted_labels(x: Tensor, classifier: DigitClassifier, batch_size: int = 256) -> Tensor:
    """Predicted digit (N,) of each image (N, 1, H, W) in [-1, 1]; the classifier is put in eval mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classifier.eval()
    device = next(classifier.parameters()).device
    labels = [classifier(x[i : i + batch_size].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)


def classifier_agreement(x: Tensor, ref: Tensor, classifier: DigitClassifier, batch_size: int = 256) -> float:
    """Share of samples whose predicted digit equals that of the reference sample from the same noise.

    Quantization that keeps pixels close but turns a 3 into an 8 is caught here and barely by PSNR.
    """
    if x.shape != ref.shape or len(x) == 0:
        raise ValueError(f"x and ref must be non-empty batches of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(ref.shape)}")
    same = predicted_labels(x, classifier, batch_size) == predicted_labels(ref, classifier, batch_size)
    return float(same.float().mean())
