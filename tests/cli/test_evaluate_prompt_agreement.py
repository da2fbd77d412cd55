"""``tadq evaluate`` measures what ``tadq run`` measures for a shipped model: its classifier's features by default
(digits for the digits, text-to-image and DiT models, photos for the photos model) and prompt agreement on the
shipped text-to-image model's digit prompts and the shipped DiT's and photos model's random class labels."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.evaluate import _prompted_labels, _shipped_features
from tadq.experiments.workload import SHIPPED_MODELS
from tadq.metrics.features import DigitsFeatureSpace
from tadq.sampling import ClassLabels
from tadq.zoo.dit import shipped_dit_path
from tadq.zoo.t2i import shipped_t2i_path

runner = CliRunner()
DIGITS = DigitsFeatureSpace(16)


def test_the_shipped_text_to_image_prompts_give_their_digits_cyclically() -> None:
    prompts = ("a handwritten seven", "the digit 2", "a drawing of zero")
    expected = [7, 2, 0, 7, 2]
    for reference in (None, shipped_t2i_path()):
        labels = _prompted_labels(DIGITS, object(), prompts, reference, num_samples=5, seed=1000)
        assert labels.tolist() == expected and labels.dtype == torch.long


def test_no_prompt_agreement_for_a_user_pipeline_or_a_prompt_without_a_digit(tmp_path, capsys) -> None:
    prompts = ("a handwritten seven",)
    assert _prompted_labels(DIGITS, object(), prompts, tmp_path, num_samples=2, seed=0) is None
    assert _prompted_labels(None, object(), prompts, None, num_samples=2, seed=0) is None
    assert _prompted_labels(DIGITS, object(), ("a cat",), None, num_samples=2, seed=0) is None
    assert "prompt agreement not measured" in capsys.readouterr().err


def test_the_shipped_dit_scores_its_class_labels_and_not_its_null_class() -> None:
    from tadq.experiments.workload import _NullLabels  # what --labels null samples with

    labels = ClassLabels((3, 1, 4, 1, 5), null_class=10)
    got = _prompted_labels(DIGITS, labels, (), shipped_dit_path(), num_samples=5, seed=7)
    assert got.tolist() == [3, 1, 4, 1, 5]
    assert _prompted_labels(DIGITS, _NullLabels(10), (), shipped_dit_path(), num_samples=5, seed=7) is None
    assert _prompted_labels(DIGITS, labels, (), None, num_samples=5, seed=7) is None


def test_evaluate_reports_the_shipped_dits_prompt_agreement(tmp_path: Path) -> None:
    """The row `tadq run --model dit` has, from `tadq evaluate` of a DiT artefact against the shipped DiT."""
    dit, artefact = shipped_dit_path(), tmp_path / "w8a8"

    def ok(*args) -> None:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    ok("quantize", dit, "--preset", "W8A8", "--steps", "4", "--calib-trajectories", "4", "--out", artefact,
       "--cache-dir", tmp_path / "cache", "--threads", "1")
    ok("evaluate", artefact, "--reference", dit, "--num-samples", "8", "--batch-size", "4",  # features: auto
       "--threads", "1", "--out", tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    for row in report["rows"]:
        assert 0 <= row["prompt_accuracy"] <= 1 and row["fd_digits"] > 0
    assert "prompt agree" in (tmp_path / "eval" / "results.md").read_text()


def test_the_shipped_models_labels_are_those_tadq_run_scores() -> None:
    """Same labels, so `tadq evaluate` of a shipped model's artefact reports `tadq run`'s prompt agreement."""
    from tadq.experiments.workload import load_workload
    from tadq.zoo.t2i_prompts import EVALUATION_PROMPTS

    run = load_workload("t2i").expected_labels(1000, 45)
    evaluate = _prompted_labels(DIGITS, object(), tuple(EVALUATION_PROMPTS), None, num_samples=45, seed=1000)
    assert torch.equal(evaluate, run)
    dit = load_workload("dit")
    run = dit.expected_labels(1000, 12)
    evaluate = _prompted_labels(DIGITS, dit.evaluation_conditions, (), shipped_dit_path(), 12, 1000)
    assert torch.equal(evaluate, run)


def test_tadq_run_measures_the_shipped_t2i_without_prompt_agreement_for_prompts_without_a_digit(caplog) -> None:
    """`tadq evaluate` dropped prompt agreement for evaluation prompts that name no digit and scored the rest;
    `tadq run` refused the same prompts on the shipped text-to-image model. Both measure them now."""
    from tadq.experiments.workload import load_workload

    with caplog.at_level("WARNING"):
        workload = load_workload("t2i", evaluation_prompts=("a cat", "the numeral 7 in ink"))
    assert workload.expected_labels is None and workload.features is not None
    assert "prompt agreement not measured" in caplog.text and "'a cat'" in caplog.text


def test_auto_features_are_the_shipped_references_classifier(tmp_path) -> None:
    assert _shipped_features(None) == "digits"  # the shipped digits DDPM, or the shipped t2i for a t2i artefact
    assert _shipped_features(SHIPPED_MODELS["dit"]()) == "digits"
    assert _shipped_features(SHIPPED_MODELS["photos"]()) == "photos"
    assert _shipped_features(tmp_path) == "none"


def test_the_shipped_photos_model_scores_the_labels_its_samples_get_and_not_its_null_class() -> None:
    """Read from the conditions evaluate samples with: a photos *artefact* without --labels samples random labels
    (the shipped folder's null-class default is not the artefact's), which were left unscored."""
    from tadq.experiments.workload import _NullLabels
    from tadq.metrics.features import PhotosFeatureSpace
    from tadq.sampling import RandomClassLabels

    photos = PhotosFeatureSpace.__new__(PhotosFeatureSpace)  # reads_labels is all this asks of it
    folder = SHIPPED_MODELS["photos"]()
    random = RandomClassLabels(8, None)
    got = _prompted_labels(photos, random, (), folder, num_samples=3, seed=0)
    assert torch.equal(got, random(0, range(3)).class_labels)
    assert _prompted_labels(photos, _NullLabels(8), (), folder, num_samples=3, seed=0) is None


def test_evaluate_measures_the_shipped_photos_model_in_its_own_features(tmp_path: Path) -> None:
    """`--features auto` against the shipped photos model: FD-photos and, with random labels, prompt agreement (it
    offered digits, none or a file: the photos artefact got no Fréchet distance unless the user built one)."""
    photos, artefact = SHIPPED_MODELS["photos"](), tmp_path / "w8a8"
    result = runner.invoke(app, [str(a) for a in (
        "quantize", photos, "--preset", "W8A8", "--method", "naive", "--steps", "2", "--calib-trajectories", "2",
        "--out", artefact, "--cache-dir", tmp_path / "cache", "--threads", "1")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [str(a) for a in (  # an artefact samples random labels by default
        "evaluate", artefact, "--reference", photos, "--num-samples", "4", "--threads", "1",
        "--out", tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    for row in json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]:
        assert row["fd_photos"] > 0 and 0 <= row["prompt_accuracy"] <= 1
