"""A shipped model folder that is missing or damaged is a one-line error naming the folder and how to get it back
(restore the package's copy, or the `tadq zoo` command that retrains it, with absolute paths so the command works
from any working directory). Everything runs on copies under ``tmp_path``: nothing shipped is touched."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tadq.zoo.shipped as shipped
from tadq.cli.app import app


@pytest.fixture
def weights(tmp_path, monkeypatch) -> Path:
    """An empty stand-in for the package's weights folder; copies of shipped folders go in with ``_copy``."""
    folder = tmp_path / "weights"
    folder.mkdir()
    monkeypatch.setattr(shipped, "SHIPPED_WEIGHTS", folder.resolve())
    return folder


def _copy(weights: Path, name: str) -> Path:
    source = Path(shipped.__file__).resolve().parent / "weights" / name
    if not source.is_dir():
        pytest.skip(f"shipped {name} not in this checkout")
    return Path(shutil.copytree(source, weights / name))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def test_damaged_shipped_denoiser_says_how_to_get_it_back(weights, monkeypatch):
    import tadq.models as models

    folder = _copy(weights, "digits-ddpm")
    monkeypatch.setattr(models, "shipped_model_path", lambda: folder)
    _truncate(folder / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as caught:
        models.load_pipeline_parts()
    message = str(caught.value)
    # its training_info.json is still there, so the retrain needs --overwrite (refused without it)
    assert f"tadq zoo train --out {folder.resolve()} --overwrite" in message, message
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match=f"tadq zoo train --out {folder.resolve()}"):
        models.load_pipeline_parts()


@pytest.mark.parametrize(("name", "command"), [("digits-classifier", "train-classifier"),
                                               ("photo-classifier", "train-photo-classifier")])
def test_damaged_classifier_is_a_clear_error_not_a_bare_decoder_error(weights, monkeypatch, name, command):
    import tadq.metrics.classifier as classifier
    import tadq.metrics.photo_classifier as photo_classifier

    folder = _copy(weights, name)
    monkeypatch.setattr(classifier, "default_classifier_path", lambda: folder)
    monkeypatch.setattr(photo_classifier, "default_photo_classifier_path", lambda: folder)
    load = classifier.load_digit_classifier if name == "digits-classifier" else photo_classifier.load_photo_classifier
    for damaged in ("model.safetensors", "config.json"):
        backup = (folder / damaged).read_bytes()
        _truncate(folder / damaged) if damaged.endswith("safetensors") else (folder / damaged).write_text("{")
        with pytest.raises(ValueError, match="damaged") as caught:
            load()
        assert str(folder) in str(caught.value) and f"tadq zoo {command} --out" in str(caught.value)
        (folder / damaged).write_bytes(backup)
    load()  # restored: loads again


def test_missing_classifier_names_an_absolute_out_that_works_from_any_directory(weights, monkeypatch, tmp_path):
    """The hint was `tadq zoo train-classifier --out src/tadq/zoo/weights/digits-classifier`: run from anywhere but
    a source checkout's root, it trained into a new folder there and the shipped one stayed missing."""
    import tadq.metrics.classifier as classifier

    folder = weights / "digits-classifier"
    monkeypatch.setattr(classifier, "default_classifier_path", lambda: folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as caught:
        classifier.load_digit_classifier()
    assert f"--out {folder.resolve()}" in str(caught.value), str(caught.value)


def test_missing_text_to_image_model_is_a_file_not_found_naming_its_command(weights, monkeypatch, tmp_path):
    pytest.importorskip("transformers", reason="the text-to-image model needs transformers (CLIP)")
    import tadq.zoo.t2i as t2i

    folder = weights / "digits-t2i"
    monkeypatch.setattr(t2i, "shipped_t2i_path", lambda: folder)
    with pytest.raises(FileNotFoundError, match=f"tadq zoo train-t2i --out {folder.resolve()}"):
        t2i.load_t2i_pipeline()
    with pytest.raises(FileNotFoundError, match="not-there"):  # a user's folder: named, no shipped-model hint
        t2i.load_t2i_pipeline(tmp_path / "not-there")


def test_train_dit_without_the_text_to_image_vae_fails_in_one_line(weights, monkeypatch, tmp_path):
    """train-dit reads the shipped t2i model's VAE: missing, diffusers' OSError about connecting to huggingface.co
    ended the command in a traceback (exit 1)."""
    pytest.importorskip("transformers", reason="the text-to-image model needs transformers (CLIP)")
    import tadq.zoo.t2i as t2i

    monkeypatch.setattr(t2i, "shipped_t2i_path", lambda: weights / "digits-t2i")
    result = CliRunner().invoke(app, ["zoo", "train-dit", "--steps", "1", "--out", str(tmp_path / "dit")])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "tadq zoo train-t2i" in text, text
    assert not (tmp_path / "dit").exists(), "the output folder was created before the missing input was found"
