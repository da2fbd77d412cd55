"""The photos dataset: deterministic patches in range, and a held-out region no training patch touches."""

from __future__ import annotations

import pytest
import torch

from tadq.zoo.photos import PHOTOS, PhotosConfig, load_photos_split, num_photo_classes


@pytest.fixture(scope="module")
def split():
    return load_photos_split(PhotosConfig())


def test_patches_are_rgb_in_range_and_every_photograph_is_in_both_parts(split):
    for images, labels, boxes in ((split.train_images, split.train_labels, split.train_boxes),
                                  (split.heldout_images, split.heldout_labels, split.heldout_boxes)):
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert len(images) == len(labels) == len(boxes)
        assert images.min() >= -1.0 and images.max() <= 1.0
        assert torch.equal(torch.unique(labels), torch.arange(num_photo_classes()))
    assert split.class_names == tuple(PHOTOS)


def test_no_heldout_patch_overlaps_a_training_patch(split):
    """Boxes are in each photograph's own pixels, so patches of both scales are compared with each other."""
    for image in torch.unique(split.train_boxes[:, 0]):
        train = split.train_boxes[split.train_boxes[:, 0] == image, 1:]
        heldout = split.heldout_boxes[split.heldout_boxes[:, 0] == image, 1:]
        assert len(train) and len(heldout)
        x_overlap = (train[:, None, 0] < heldout[None, :, 2]) & (heldout[None, :, 0] < train[:, None, 2])
        y_overlap = (train[:, None, 1] < heldout[None, :, 3]) & (heldout[None, :, 1] < train[:, None, 3])
        assert not (x_overlap & y_overlap).any()
        # and they are apart by more than the antialiasing filter reach: the margin holds at every scale
        assert heldout[:, 0].min() > train[:, 2].max()


def test_patches_are_deterministic(split):
    again = load_photos_split(PhotosConfig())
    assert torch.equal(again.train_images, split.train_images)
    assert torch.equal(again.heldout_images, split.heldout_images)
    assert torch.equal(again.train_labels, split.train_labels)


def test_config_refuses_nonsense():
    with pytest.raises(ValueError):
        PhotosConfig(heldout_fraction=0.6)
    with pytest.raises(ValueError):
        PhotosConfig(short_sides=(40,))
