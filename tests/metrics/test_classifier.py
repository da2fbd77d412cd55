"""Digits classifier: training runs, deterministic, round-trips through disk, and the shipped one is accurate."""

from __future__ import annotations

import json

import pytest
import torch

from tadq.metrics import (
    ClassifierTrainConfig,
    DigitClassifier,
    default_classifier_path,
    load_digit_classifier,
    predicted_labels,
    save_digit_classifier,
    train_digit_classifier,
)
from tadq.zoo.data import DigitsConfig, load_digits_split

TINY = ClassifierTrainConfig(epochs=1, batch_size=128)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tiny-classifier")
    return out, train_digit_classifier(TINY, out)


@pytest.mark.parametrize(
    "kwargs", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"resolution": 12}, {"max_shift": 8}, {"noise_std": -1}]
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ClassifierTrainConfig(**kwargs)


def test_tiny_training_writes_artefacts_and_features(tiny_run) -> None:
    out, info = tiny_run
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "training_info.json"}
    saved = json.loads((out / "training_info.json").read_text())
    assert saved["seed"] == TINY.seed and saved["command"].startswith("tadq zoo train-classifier")
    assert 0.0 <= info["heldout_accuracy"] <= 1.0 and "torch" in saved["versions"]
    model = load_digit_classifier(out)
    images = load_digits_split().heldout_images[:7]
    assert model.features(images).shape == (7, model.num_features)
    assert model(images).shape == (7, 10)
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_training_is_deterministic_for_a_seed(tiny_run, tmp_path) -> None:
    out, info = tiny_run
    again = train_digit_classifier(TINY, tmp_path)
    assert again["heldout_accuracy"] == info["heldout_accuracy"]
    assert (tmp_path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_save_load_round_trips_outputs_exactly(tmp_path) -> None:
    torch.manual_seed(0)
    model = DigitClassifier(channels=(8, 16), num_features=32).eval()
    save_digit_classifier(model, tmp_path)
    loaded = load_digit_classifier(tmp_path)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
        assert torch.equal(model.features(x), loaded.features(x))
    assert loaded.num_features == 32


def test_other_resolutions_are_resized() -> None:
    model = DigitClassifier().eval()
    for size in (8, 32):
        assert model.features(torch.zeros(2, 1, size, size)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="grey images"):
        model(torch.zeros(2, 3, 16, 16))


def test_missing_folder_names_the_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tadq zoo train-classifier"):
        load_digit_classifier(tmp_path / "nothing-here")


def test_shipped_classifier_is_accurate_on_heldout_digits() -> None:
    assert (default_classifier_path() / "model.safetensors").is_file()
    model = load_digit_classifier()
    split = load_digits_split(DigitsConfig(resolution=model.resolution))
    accuracy = (predicted_labels(split.heldout_images, model) == split.heldout_labels).float().mean().item()
    assert accuracy >= 0.95


@pytest.mark.parametrize("kind", ["digits", "photos"])
def test_two_saves_into_one_folder_do_not_share_a_temp_file(tmp_path, monkeypatch, kind) -> None:
    """Both classifiers wrote their weights to a fixed ``.model.safetensors.tmp``: a second training saving into the
    same folder meanwhile rewrote it and renamed it away, so the first save failed (or renamed the other's
    half-written file into place)."""
    import safetensors.torch

    import tadq.metrics.classifier as digits
    import tadq.metrics.photo_classifier as photos
    import tadq.safefiles as safefiles

    if kind == "digits":
        build, save, load = (lambda: digits.DigitClassifier(channels=(4, 8), num_features=8).eval(),
                             digits.save_digit_classifier, digits.load_digit_classifier)
    else:
        build, save, load = (lambda: photos.PhotoClassifier(channels=(4, 4, 8), num_features=8).eval(),
                             photos.save_photo_classifier, photos.load_photo_classifier)
    torch.manual_seed(0)
    first, second = build(), build()
    real_save_file, calls = safetensors.torch.save_file, []

    def save_file_meanwhile(tensors, filename, metadata=None) -> None:
        real_save_file(tensors, filename, metadata=metadata)
        calls.append(filename)
        if len(calls) == 1:  # the other process saves while this one's file is written, not yet renamed
            save(second, tmp_path)

    for module in (digits, photos, safefiles):
        monkeypatch.setattr(module, "save_file", save_file_meanwhile, raising=False)
    save(first, tmp_path)
    loaded = load(tmp_path)
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in first.state_dict().items())
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
