"""FD-digits: zero for identical sets, ordered sensibly, consistent with torchmetrics, finite for tiny sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.device_standins import OnDeviceWithoutFloat64
from torchmetrics.image.fid import FrechetInceptionDistance

from tadq.metrics import (
    DigitFeatures,
    digit_features,
    fd_digits,
    fd_digits_reference,
    frechet_distance,
    load_digit_classifier,
)
from tadq.zoo.data import load_digits_split


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def test_identical_sets_have_zero_distance(classifier, split) -> None:
    assert abs(fd_digits(split.heldout_images, split.heldout_images, classifier)) < 1e-6


def test_real_digits_are_closer_than_noise(classifier, split) -> None:
    n = len(split.heldout_images)
    other_real = split.train_images[:n]
    noise = torch.rand(other_real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    real_vs_real = fd_digits(split.heldout_images, other_real, classifier)
    real_vs_noise = fd_digits(split.heldout_images, noise, classifier)
    assert 0 < real_vs_real < real_vs_noise


def test_reference_is_finite_positive_and_shrinks_with_more_samples(classifier) -> None:
    small = fd_digits_reference(50, seed=0, classifier=classifier)
    large = fd_digits_reference(359, seed=0, classifier=classifier)
    assert math.isfinite(small) and math.isfinite(large)
    assert 0 < large < small
    with pytest.raises(ValueError, match="train split size"):
        fd_digits_reference(1, seed=0, classifier=classifier)


def test_reference_against_train_draws_heldout_images(classifier, split) -> None:
    value = fd_digits_reference(100, seed=0, classifier=classifier, reference_set="train")
    assert math.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="held-out split size"):
        fd_digits_reference(len(split.heldout_images) + 1, seed=0, classifier=classifier, reference_set="train")
    with pytest.raises(ValueError, match="heldout"):
        fd_digits_reference(100, seed=0, classifier=classifier, reference_set="test")


def test_matches_torchmetrics_on_full_rank_sets(classifier, split) -> None:
    real, fake = split.heldout_images, split.train_images[:359]
    metric = FrechetInceptionDistance(feature=DigitFeatures(classifier))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = fd_digits(real, fake, classifier)
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-3)


def _reassociation_tolerance(model: torch.nn.Module, scale: float) -> float:
    """Bound on the float32 difference two summation orders may make in the features.

    A batch size changes only the order in which the CPU's kernels (oneDNN, AVX2/AVX512/AMX paths alike) add the
    K products of each output element; re-associating a K-term float32 sum moves it by about √K · eps32 of its
    magnitude (random-walk rounding growth), and the layers' errors add along the path. With every layer's
    output at most ``scale`` (BatchNorm keeps the penultimate features O(1)), the features may differ by
    Σ_layers √K_l · eps32 · scale.
    """
    lengths = [m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
               for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    lengths += [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(math.sqrt(k) for k in lengths) * torch.finfo(torch.float32).eps * scale


def test_digit_features_are_batch_independent(classifier, split) -> None:
    images = split.heldout_images[:40]
    whole = digit_features(images, classifier, batch_size=64)
    pieces = digit_features(images, classifier, batch_size=7)
    assert whole.dtype == torch.float64 and whole.shape == (40, classifier.num_features)
    scale = float(whole.abs().max())
    tolerance = _reassociation_tolerance(classifier, scale)
    # the bound stays far below what a batch-coupled computation (e.g. BatchNorm in training mode) would change
    assert tolerance < 1e-3 * scale
    torch.testing.assert_close(whole, pieces, rtol=0.0, atol=tolerance)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.5, 2.0, size=6), rng.uniform(0.5, 2.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), eps=0.0)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fewer_samples_than_features_stay_finite(classifier, split) -> None:
    value = fd_digits(split.heldout_images[:10], split.train_images[:10], classifier)
    assert math.isfinite(value) and value > 0


def test_rejects_single_images_and_colour(classifier, split) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fd_digits(split.heldout_images[:1], split.train_images[:5], classifier)
    with pytest.raises(ValueError, match="grey"):
        fd_digits(torch.zeros(4, 3, 16, 16), split.train_images[:5], classifier)


def test_fewer_samples_than_features_is_logged_as_a_rank_deficient_covariance(caplog):
    """N ≤ D samples give a covariance of rank ≤ N − 1 < D, and the distance rests on the ridge: this was silent."""
    from tadq.metrics.frechet import gaussian_statistics

    features = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING", logger="tadq.metrics.frechet"):
        gaussian_statistics(features)  # 9 > 8: full rank possible, nothing to say
        assert not caplog.records
        gaussian_statistics(features[:8])
    assert len(caplog.records) == 1
    assert "8 samples of 8 features" in caplog.text and "rank at most 7 < 8" in caplog.text


def test_a_rank_deficient_fd_comes_with_a_note_for_the_report():
    """The warning above reaches the console only: reports carry ``rank_deficiency_note`` beside such an FD."""
    from tadq.metrics.frechet import rank_deficiency_note

    assert rank_deficiency_note("FD-digits", 129, 128) == ""
    note = rank_deficiency_note("FD-digits", 128, 128)
    assert "FD-digits at 128 samples of 128 features" in note and "rank at most 127 < 128" in note
    assert "rank at most 0 < 128" in rank_deficiency_note("FD-digits", 1, 128)


def test_features_reach_float64_on_the_host_not_on_their_device():
    """Features were cast to float64 before leaving the device (``.double().cpu()``): on MPS, which has no float64,
    every Fréchet statistic raised. They move to the host first (the same float64 values: the cast is exact)."""
    from tadq.metrics.frechet import gaussian_statistics
    from tadq.metrics.inception import _features

    features = torch.randn(6, 3)
    mean, covariance = gaussian_statistics(features.as_subclass(OnDeviceWithoutFloat64))
    expected = gaussian_statistics(features)
    assert np.array_equal(mean, expected[0]) and np.array_equal(covariance, expected[1])
    extracted = _features(torch.randn(5, 3, 4, 4), lambda x: x.flatten(1).as_subclass(OnDeviceWithoutFloat64), 2,
                          progress=False)
    assert extracted.dtype == torch.float64 and extracted.shape == (5, 48)
