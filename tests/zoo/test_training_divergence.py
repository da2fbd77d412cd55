"""A training run that diverges (a learning rate far too high: accepted, since only the user knows the scale) stops
at the first non-finite loss with a clear error, and leaves nothing that loads or counts as a finished model.

Before, every trainer carried the NaN on to the end and saved a model of NaN weights with a ``training_info.json``
recording a NaN loss; the next run into that folder was then refused as "already holds a trained model"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.zoo.test_training_commands import _few_digits
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.zoo import configs as zoo_configs
from tadq.zoo import train as zoo_train
from tadq.zoo.train import TrainConfig

# a finite, positive rate (the configs accept it) whose first AdamW step moves every weight by about itself: the
# square of such a weight overflows float32 in the next forward pass, so the loss is non-finite by step 2
DIVERGING_LR = float(torch.finfo(torch.float32).max) ** 0.5 * 10


def _finished_files(folder: Path) -> list[str]:
    names = ("model_index.json", "training_info.json", "model.safetensors")
    return [name for name in names if (folder / name).exists()]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_zoo_train_that_diverges_fails_cleanly_and_saves_no_model(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits(16))
    monkeypatch.setattr(zoo_configs, "TrainConfig", lambda **kw: TrainConfig(**{"warmup_steps": 1, **kw}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["zoo", "train", "--steps", "4", "--batch-size", "2", "--resolution", "8",
                                      "--learning-rate", str(DIVERGING_LR), "--out", str(out)])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "diverged" in text and "lower learning rate" in text, text
    assert _finished_files(out) == [], "a model of NaN weights was saved as a finished run"


def test_digit_classifier_that_diverges_raises_and_saves_nothing(tmp_path, monkeypatch):
    import tadq.metrics.classifier as classifier

    monkeypatch.setattr(classifier, "load_digits_split", _few_digits(16))
    config = classifier.ClassifierTrainConfig(epochs=2, batch_size=4, resolution=8, lr=DIVERGING_LR)
    with pytest.raises(ValueError, match="diverged"):
        classifier.train_digit_classifier(config, tmp_path / "clf")
    assert _finished_files(tmp_path / "clf") == []


def test_t2i_vae_stage_that_diverges_raises_before_the_vae_is_saved(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the text-to-image model needs transformers (CLIP)")
    import tadq.zoo.t2i as t2i

    monkeypatch.setattr(t2i, "load_digits_split", _few_digits(16))
    config = t2i.T2ITrainConfig(vae_steps=4, vae_batch_size=2, vae_channels=(8, 16), steps=1, batch_size=2,
                                unet_channels=(8, 16), text_hidden=8, vae_learning_rate=DIVERGING_LR)
    with pytest.raises(ValueError, match="diverged"):
        t2i.train_t2i(config, tmp_path / "t2i")
    assert not (tmp_path / "t2i" / "vae").exists() and not (tmp_path / "t2i" / t2i.VAE_STAGE_NAME).exists()
