"""The digits split: the held-out part never overlaps the training part, and a fraction that would leave either
part empty is refused when the split is made (an empty held-out part failed only after a classifier had trained,
dividing by zero images)."""

from __future__ import annotations

import pytest

from tadq.zoo.data import DigitsConfig, load_digits_split


def test_heldout_and_training_digits_are_disjoint_and_cover_the_data():
    split = load_digits_split(DigitsConfig(resolution=8))
    train = {bytes(image.numpy().tobytes()) for image in split.train_images}
    heldout = {bytes(image.numpy().tobytes()) for image in split.heldout_images}
    assert not train & heldout
    assert len(split.train_images) + len(split.heldout_images) == len(train) + len(heldout)


@pytest.mark.parametrize("fraction", [1e-5, 1 - 1e-5])
def test_a_fraction_that_empties_a_part_is_refused(fraction):
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_digits_split(DigitsConfig(resolution=8, heldout_fraction=fraction))
