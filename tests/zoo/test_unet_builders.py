"""The shipped UNet builders refuse widths that would build a model unable to run (zero attention heads), instead
of a ZeroDivisionError deep in diffusers at the first forward pass, after the training data was loaded."""

from __future__ import annotations

import pytest
import torch

from tadq.zoo.photos_model import build_photos_unet
from tadq.zoo.unet import ATTENTION_HEAD_DIM, NORM_GROUPS, build_digits_unet

NARROW = NORM_GROUPS  # a valid group-norm width, narrower than one attention head
assert NARROW < ATTENTION_HEAD_DIM


@pytest.mark.parametrize("channels", [(32, NARROW, 64), (32, 64, NARROW), (32, 64, 60), (0, 64, 64), (32, 64)])
@pytest.mark.parametrize("build", [lambda c: build_digits_unet(8, c), lambda c: build_photos_unet(channels=c)],
                         ids=["digits", "photos"])
def test_widths_that_cannot_run_are_refused_when_the_model_is_built(channels, build):
    with pytest.raises(ValueError, match="channels"):
        build(channels)


def test_a_narrow_first_level_without_attention_still_builds_and_runs():
    unet = build_digits_unet(8, (NARROW, ATTENTION_HEAD_DIM, ATTENTION_HEAD_DIM))
    with torch.no_grad():
        out = unet(torch.zeros(1, 1, 8, 8), torch.tensor([1])).sample
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
