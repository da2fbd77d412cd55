"""The shipped photo classifier names the held-out photograph well above chance; FD-photos is a fitting space."""

from __future__ import annotations

import math

import pytest
import torch

from tadq.metrics.features import MetricMismatchError, PhotosFeatureSpace
from tadq.metrics.photo_classifier import PhotoClassifier, load_photo_classifier, photo_accuracy, photo_features
from tadq.zoo.photos import PhotosConfig, load_photos_split


@pytest.fixture(scope="module")
def split():
    return load_photos_split(PhotosConfig())


@pytest.fixture(scope="module")
def classifier():
    return load_photo_classifier()


def test_heldout_accuracy_is_above_chance_by_a_margin_derived_from_the_class_count(split, classifier):
    """On 40 held-out patches per photograph (evenly spaced, not chosen), accuracy must exceed chance 1/K by six
    binomial standard deviations of a chance-level guesser on that many patches."""
    k = len(split.class_names)
    per_class = 40
    subset = torch.cat([
        torch.nonzero(split.heldout_labels == c).flatten()[
            torch.linspace(0, int((split.heldout_labels == c).sum()) - 1, per_class).long()]
        for c in range(k)])
    n, chance = len(subset), 1.0 / k
    margin = 6.0 * math.sqrt(chance * (1.0 - chance) / n)
    accuracy = photo_accuracy(classifier, split.heldout_images[subset], split.heldout_labels[subset])
    assert accuracy > chance + margin, (accuracy, chance, margin)


def test_features_are_full_width_and_batch_independent(split, classifier):
    images = split.heldout_images[:64]
    whole = photo_features(images, classifier, batch_size=64)
    pieces = photo_features(images, classifier, batch_size=7)
    assert whole.shape == (64, classifier.num_features) and whole.dtype == torch.float64
    torch.testing.assert_close(whole, pieces, rtol=1e-5, atol=1e-6)


def test_photos_feature_space_has_a_floor_and_refuses_grey_images():
    """A narrow random classifier keeps this fast; the space's logic does not depend on the weights."""
    torch.manual_seed(0)
    space = PhotosFeatureSpace(classifier=PhotoClassifier(channels=(4, 4, 4), num_features=16).eval(),
                               floor_samples=200)
    assert space.metric_key == "fd_photos" and space.input_shape == (3, 32, 32)
    assert space.floor is not None and space.floor > 0
    with pytest.raises(MetricMismatchError):
        space.check_fits((1, 16, 16))
    noise = torch.rand(200, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert space.fd(noise) > 2 * space.floor  # uniform noise is far from photographs, even in random features
