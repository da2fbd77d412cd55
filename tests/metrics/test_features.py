"""Feature spaces: FD-digits unchanged through the new interface, a user's own extractor, and refusal on misfit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tadq.evaluation import evaluate_against_reference, quality_metrics
from tadq.metrics import fd_digits, frechet
from tadq.metrics.features import (
    DigitsFeatureSpace,
    MetricMismatchError,
    TorchScriptFeatureSpace,
    load_reference_images,
)
from tadq.sampling import SamplerConfig
from tadq.zoo.data import load_digits_split


@pytest.fixture(scope="module")
def digits_space() -> DigitsFeatureSpace:
    return DigitsFeatureSpace(16)


def test_digits_space_gives_exactly_fd_digits(digits_space) -> None:
    fake = load_digits_split().heldout_images[:50]
    assert digits_space.fd(fake) == fd_digits(digits_space.real, fake, digits_space.classifier)
    assert digits_space.metric_key == "fd_digits" and digits_space.floor > 0


def test_feature_width_is_what_the_extractor_returns(digits_space) -> None:
    assert digits_space.feature_width() == digits_space.features(digits_space.real[:3], progress=False).shape[1]


def test_digits_space_refuses_colour_images(digits_space) -> None:
    with pytest.raises(MetricMismatchError, match="reads grey digits"):
        digits_space.check_fits((3, 16, 16))
    with pytest.raises(MetricMismatchError, match="reads grey digits"):
        digits_space.fd(torch.zeros(4, 3, 16, 16))
    digits_space.check_fits((1, 32, 32))  # grey digits of another size are resized by the classifier


class _MeanColour(nn.Module):
    """A toy extractor: per-channel means and standard deviations (B, 2C)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


def _custom_space(tmp_path, real: torch.Tensor) -> TorchScriptFeatureSpace:
    torch.jit.script(_MeanColour()).save(str(tmp_path / "colour.pt"))
    save_file({"images": real.contiguous()}, str(tmp_path / "real.safetensors"))
    return TorchScriptFeatureSpace(tmp_path / "colour.pt", tmp_path / "real.safetensors", name="colour")


def test_a_users_extractor_scores_rgb_images(tmp_path) -> None:
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 8, 8, generator=generator) * 2 - 1
    space = _custom_space(tmp_path, real)
    assert space.input_shape == (3, 8, 8) and space.metric_key == "fd_colour"
    same = torch.rand(64, 3, 8, 8, generator=generator) * 2 - 1
    shifted = (same * 0.5 + 0.4).clamp(-1, 1)  # another distribution: brighter, less contrast
    assert space.fd(shifted) > 10 * space.fd(same)
    with pytest.raises(MetricMismatchError):
        space.fd(torch.zeros(4, 1, 8, 8))


def test_reference_images_must_be_one_named_tensor_in_range(tmp_path) -> None:
    save_file({"x": torch.zeros(4, 1, 8, 8)}, str(tmp_path / "wrong-name.safetensors"))
    with pytest.raises(ValueError, match="named 'images'"):
        load_reference_images(tmp_path / "wrong-name.safetensors")
    save_file({"images": torch.full((4, 1, 8, 8), 3.0)}, str(tmp_path / "range.safetensors"))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        load_reference_images(tmp_path / "range.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_reference_images(tmp_path / "garbage.safetensors")


def test_no_feature_space_means_no_distance_metrics() -> None:
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    states = torch.stack([torch.randn(4, 3, 8, 8), images])
    metrics = quality_metrics(images, states, images.flip(0), states.flip(1), None)
    row = metrics.to_dict()
    assert row["fd"] is None and row["agreement"] is None and row["psnr"] is not None


def test_evaluation_refuses_misfit_features_before_sampling(tmp_path, tiny_unet, ddpm_scheduler) -> None:
    # the tiny model samples 1×8×8 images; features read from 3×8×8 images do not fit: refused before sampling
    space = _custom_space(tmp_path, torch.rand(8, 3, 8, 8) * 2 - 1)
    calls = []
    tiny_unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(MetricMismatchError):
        evaluate_against_reference(tiny_unet, tiny_unet, ddpm_scheduler, SamplerConfig("ddim", num_steps=2),
                                   num_samples=2, seed=1, features=space, progress=False)
    assert not calls


def test_loading_the_shipped_classifiers_leaves_the_callers_torch_rng_stream_alone() -> None:
    """Building the classifier ran torch's random init before its weights were read: a feature space made inside a
    user's seeded script (tadq evaluate's, tadq.evaluation's) moved the script's later torch.randn draws."""
    from tadq.metrics.classifier import load_digit_classifier
    from tadq.metrics.photo_classifier import load_photo_classifier

    torch.manual_seed(4)
    expected = torch.randn(8)
    torch.manual_seed(4)
    load_digit_classifier()
    load_photo_classifier()
    assert torch.equal(torch.randn(8), expected)


@pytest.mark.parametrize("progress", [False, True])
def test_the_distance_shows_its_feature_bar_only_when_the_caller_shows_progress(digits_space, capsys, monkeypatch,
                                                                                 progress) -> None:
    """``quality_metrics(progress=False)`` (as ``evaluate_against_reference`` passes it) printed the FD-digits
    feature bar anyway: it turned on by sample count alone."""
    import tadq.metrics.features as features_module

    def in_batches_of_one(images, classifier, batch_size=256, progress=True):  # 20 images are 20 batches: a bar
        return frechet.digit_features(images, classifier, batch_size=1, progress=progress)

    monkeypatch.setattr(features_module, "digit_features", in_batches_of_one)
    heldout = load_digits_split().heldout_images
    count = 20  # digit_features draws its bar from 20 batches on
    images = heldout.repeat(-(-count // len(heldout)), 1, 1, 1)[:count]
    capsys.readouterr()
    quality_metrics(images, images[None], images, images[None], digits_space, progress=progress)
    bar = capsys.readouterr().err
    assert ("FD-digits features" in bar) is progress, bar
