"""Paired image metrics: PSNR and SSIM fall with noise, identical images score their maxima, agreement counts."""

from __future__ import annotations

import math

import pytest
import torch

from tadq.metrics import (
    classifier_agreement,
    load_digit_classifier,
    predicted_labels,
    psnr_per_sample,
    ssim_per_sample,
)
from tadq.metrics.image import PSNR_CAP_DB
from tadq.zoo.data import load_digits_split


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return load_digits_split().heldout_images[:64]


def _noisy(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    return images + std * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))


def test_psnr_falls_monotonically_with_noise(digits) -> None:
    means = [psnr_per_sample(_noisy(digits, std), digits).mean().item() for std in (0.01, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(means, means[1:], strict=False))
    assert psnr_per_sample(digits, digits).shape == (len(digits),)


def test_psnr_of_identical_images_is_the_finite_cap(digits) -> None:
    values = psnr_per_sample(digits, digits.clone())
    assert torch.all(values == PSNR_CAP_DB) and math.isfinite(values.mean().item())


def test_ssim_is_one_for_identical_and_falls_with_noise(digits) -> None:
    torch.testing.assert_close(ssim_per_sample(digits, digits.clone()), torch.ones(len(digits)))
    means = [ssim_per_sample(_noisy(digits, std), digits).mean().item() for std in (0.02, 0.1, 0.4)]
    assert 1.0 > means[0] > means[1] > means[2]


def test_paired_metrics_reject_mismatched_shapes(digits) -> None:
    with pytest.raises(ValueError):
        psnr_per_sample(digits, digits[:-1])
    with pytest.raises(ValueError):
        ssim_per_sample(digits[:, 0], digits[:, 0])


def test_classifier_agreement_counts_same_predictions(digits) -> None:
    classifier = load_digit_classifier()
    labels = predicted_labels(digits, classifier)
    assert labels.shape == (len(digits),) and labels.dtype == torch.long
    assert classifier_agreement(digits, digits.clone(), classifier) == 1.0
    shuffled = digits[torch.roll(torch.arange(len(digits)), 1)]
    expected = (predicted_labels(shuffled, classifier) == labels).float().mean().item()
    assert classifier_agreement(shuffled, digits, classifier) == pytest.approx(expected)
    assert expected < 1.0
