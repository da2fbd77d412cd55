"""tadq run, recipe, bench, analyze, sample-sharded and zoo on bad input: refused in one line (exit code 2) naming
the flag, before calibration, sampling or training, with no output folder left behind and nothing written into
the input model's folder or a folder tadq did not write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.io.tiny_artefacts import save_tiny_artefact
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.corrections.tac.config import TACConfig
from tadq.fsguard import MARKER_FILE

runner = CliRunner()


def _text(result) -> str:
    return " ".join(result.output.split())


def _run(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--num-samples", "2",
            "--steps", "2", "--calib-trajectories", "2", "--batch-size", "2", "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), *extra]


def _bench(model: Path, tmp_path: Path, *extra: str, out: str = "out") -> list[str]:
    return ["bench", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--samplers", "ddim-eta0",
            "--steps", "2", "--num-samples", "2", "--calib-trajectories", "2", "--batch-size", "2",
            "--out", str(tmp_path / out), "--cache-dir", str(tmp_path / "cache"), *extra]


def _recipe(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["recipe", str(model), "--budget-bits", "W8A8", "--presets", "W8A8", "--bases", "naive", "--stacks",
            "none", "--steps", "2", "--calib-trajectories", "2", "--fit-trajectories", "2", "--selection-samples",
            "2", "--heldout", "2", "--batch-size", "2", "--out", str(tmp_path / "out"), *extra]


def _refused(result, *needles: str) -> str:
    text = _text(result)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text
    return text


def _snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("extra, needle", [
    (("--batch-size", "0"), "--batch-size must be >= 1"),  # sampling refused it only after calibration
    (("--recon-iters", "-5"), "--recon-iters must be >= 0, or -1"),  # was silently the default
    (("--recon-activation-iters", "-2"), "--recon-activation-iters must be >= 0, or -1"),
    (("--methods", ","), "at least one preset and one method"),  # ran FP alone
    (("--presets", " "), "at least one preset and one method"),
    (("--negative-prompt", "blurry"), "--negative-prompt"),  # silently ignored for an unconditional model
])
def test_run_refuses_bad_flags_before_calibration(tiny_model_dir, tmp_path, extra, needle):
    _refused(runner.invoke(app, _run(tiny_model_dir, tmp_path, *extra)), needle)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("inside", ["", "cache"])
def test_cache_dir_in_the_input_model_is_refused(tiny_model_dir, tmp_path, command, inside):
    before = _snapshot(tiny_model_dir)
    build = _run if command == "run" else _bench
    cache = tiny_model_dir / inside if inside else tiny_model_dir
    result = runner.invoke(app, build(tiny_model_dir, tmp_path, "--cache-dir", str(cache)))
    _refused(result, "--cache-dir", "input")
    assert _snapshot(tiny_model_dir) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["missing", "empty"])
def test_bench_leaves_no_out_folder_for_a_bad_model(tmp_path, model):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, _bench(tmp_path / model, tmp_path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bench_models_dir_must_be_tadq_s_own(tiny_model_dir, tmp_path):
    before = _snapshot(tiny_model_dir)
    _refused(runner.invoke(app, _bench(tiny_model_dir, tmp_path, "--models-dir", str(tiny_model_dir))),
             "--models-dir", "is the input")
    assert _snapshot(tiny_model_dir) == before  # base models used to be saved into the model's folder
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _refused(runner.invoke(app, _bench(tiny_model_dir, tmp_path, "--models-dir", str(foreign))),
             "--models-dir", "tadq did not write")
    assert _snapshot(foreign) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")  # used to turn every row into "not supported" and exit 0
    _refused(runner.invoke(app, _bench(tiny_model_dir, tmp_path, "--models-dir", str(afile))),
             "--models-dir", "is a file")
    assert not (tmp_path / "out").exists()


def test_bench_models_dir_it_filled_is_reused(tiny_model_dir, tmp_path):
    models = tmp_path / "models"
    first = runner.invoke(app, _bench(tiny_model_dir, tmp_path, "--models-dir", str(models), out="a"))
    assert first.exit_code == 0, first.output
    assert (models / MARKER_FILE).is_file() and (tmp_path / "a" / MARKER_FILE).is_file()
    second = runner.invoke(app, _bench(tiny_model_dir, tmp_path, "--models-dir", str(models), out="b"))
    assert second.exit_code == 0, second.output  # the folder it filled is accepted again, and reused
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["rows"]


@pytest.mark.parametrize("extra, needle", [
    (("--evaluate", "-1"), "--evaluate must be >= 0"),  # said ">= 1, got 0"
    (("--recon-iters", "-3"), "--recon-iters must be >= 0, or -1"),
    (("--negative-prompt", "x"), "--negative-prompt"),
])
def test_recipe_refuses_bad_flags(tiny_model_dir, tmp_path, extra, needle):
    _refused(runner.invoke(app, _recipe(tiny_model_dir, tmp_path, *extra)), needle)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tac_artefact(tmp_path_factory) -> Path:
    """A tiny W8A8 artefact with TAC tables fitted for its recipe's sampler, DDIM 2 steps."""
    return save_tiny_artefact(tmp_path_factory.mktemp("harness-cli") / "q", "W8A8",
                              corrections=(TACConfig(num_samples=4),))


def test_analyze_refuses_an_fp_model_of_another_architecture(tac_artefact, tmp_path):
    # no --fp-model: the shipped digits model, which the tiny artefact was not quantized from
    result = runner.invoke(app, ["analyze", str(tac_artefact), "--num-samples", "2", "--batch-size", "2",
                                 "--no-jacobian", "--out", str(tmp_path / "out")])
    _refused(result, "differs from the quantized model", "pass the FP model it was quantized from")
    assert not (tmp_path / "out").exists()


def test_sample_sharded_uses_the_artefact_s_sampler_and_refuses_another_before_sampling(tac_artefact, tmp_path):
    base = ["sample-sharded", str(tac_artefact), "--num-samples", "2", "--batch-size", "2", "--device", "cpu",
            "--no-metrics"]
    result = runner.invoke(app, [*base, "--steps", "3", "--out-dir", str(tmp_path / "other")])
    _refused(result, "fitted for ddim-2-eta0.0, not ddim-3-eta0.0")
    assert not (tmp_path / "other").exists()  # used to fail in the first chunk, after writing its manifest
    result = runner.invoke(app, [*base, "--out-dir", str(tmp_path / "own")])  # used to sample DDIM 50 and fail
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "own" / "manifest.json").read_text())
    assert "ddim-2-eta0.0" in json.dumps(manifest)


def test_sample_sharded_refuses_one_sample_with_metrics_before_sampling(tac_artefact, tmp_path):
    result = runner.invoke(app, ["sample-sharded", str(tac_artefact), "--num-samples", "1", "--device", "cpu",
                                 "--out-dir", str(tmp_path / "out")])
    _refused(result, "--num-samples 1", "--no-metrics")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, extra", [
    ("train", ("--learning-rate", "-1")),
    ("train", ("--learning-rate", "nan")),
    ("train-photos", ("--learning-rate", "0")),
    ("train-dit", ("--learning-rate", "-0.5")),
    ("train-t2i", ("--learning-rate", "-1")),  # was refused by AdamW after minutes of VAE training
])
def test_zoo_refuses_a_learning_rate_before_training(tmp_path, command, extra):
    result = runner.invoke(app, ["zoo", command, "--steps", "1", "--out", str(tmp_path / "out"), *extra])
    _refused(result, "learning_rate must be a finite number > 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "train-classifier", "train-photos", "train-photo-classifier",
                                     "train-t2i", "train-dit"])
def test_zoo_refuses_to_train_over_a_finished_model_without_overwrite(tmp_path, command):
    """A second ``tadq zoo train`` into a folder holding a finished model (its default --out is the shipped model's
    own folder) replaced it without a word; now only with --overwrite. A folder with an unfinished run's
    checkpoint is resumed as before."""
    from tadq.cli.zoo import check_not_finished
    from tadq.zoo.train import CHECKPOINT_NAME

    out = tmp_path / "model"
    out.mkdir()
    (out / "training_info.json").write_text(json.dumps({"versions": {"tadq": "0"}, "command": "tadq zoo ..."}))
    before = sorted(p.name for p in out.iterdir())
    result = runner.invoke(app, ["zoo", command, "--out", str(out)])
    _refused(result, "already holds a trained model", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written, nothing trained
    check_not_finished(out, overwrite=True)  # allowed with --overwrite
    (out / CHECKPOINT_NAME).write_bytes(b"")
    check_not_finished(out, overwrite=False)  # an unfinished run's checkpoint: resumed


def test_the_shipped_model_folder_is_named_as_such_when_retraining_is_refused():
    from tadq.cli.zoo import SHIPPED, check_not_finished
    from tadq.fsguard import OutputRefused

    with pytest.raises(OutputRefused, match="already holds the model tadq ships .every number measured on it"):
        check_not_finished(SHIPPED / "digits-ddpm", overwrite=False)


def test_run_refuses_a_peer_method_whose_tool_is_missing_before_calibrating(tmp_path, monkeypatch):
    """It sampled the calibration trajectories, then died with a 62-line traceback (PeerNotInstalled)."""
    import tadq.experiments.rows.peers as peer_rows

    monkeypatch.setattr(peer_rows, "_missing", lambda module: True)
    result = runner.invoke(app, ["run", "--presets", "W8A8", "--methods", "naive,quanto", "--num-samples", "4",
                                 "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    _refused(result, "method 'quanto' needs optimum-quanto, which is not installed", "pip install")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
