"""A rerun of `tadq run` / `tadq evaluate` / `tadq analyze` into its own report folder with other settings,
interrupted while it draws the new figures: the folder must not hold the earlier run's results.json/.md (analysis.json)
beside this run's figures (they were replaced last, so an interrupt there left two runs' results mixed, with nothing
saying so)."""

from __future__ import annotations

import json

import pytest
from tests.distributed.tiny_runs import save_tiny_model
from typer.testing import CliRunner

import tadq.report
from tadq.cli.app import app

RUN = ["--methods", "naive", "--presets", "W8A8", "--num-samples", "4", "--steps", "3", "--calib-trajectories", "4",
       "--batch-size", "4", "--threads", "1"]
EVALUATE = ["--num-samples", "4", "--steps", "3", "--batch-size", "4", "--threads", "1"]


def _ok(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("reports") / "model", 0)


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_an_interrupted_report_never_keeps_the_earlier_runs_numbers(command, model_dir, tmp_path, monkeypatch):
    out, cache = tmp_path / "report", tmp_path / "cache"
    if command == "run":
        def args(seed: int) -> list:
            return ["run", "--model", model_dir, *RUN, "--seed", seed, "--out", out, "--cache-dir", cache]
    else:
        artefact = tmp_path / "artefact"
        _ok("quantize", model_dir, "--out", artefact, "--cache-dir", cache, "--steps", "3", "--calib-trajectories",
            "4", "--threads", "1")

        def args(seed: int) -> list:
            return ["evaluate", artefact, "--reference", model_dir, *EVALUATE, "--seed", seed, "--out", out]
    _ok(*args(11))
    assert json.loads((out / "results.json").read_text())

    def interrupted(*args, **kwargs):  # the second figure: the new samples.png is already in place
        raise KeyboardInterrupt

    import tadq.experiments.run as run_module

    monkeypatch.setattr(tadq.report, "save_error_curves", interrupted)  # evaluate imports it at call time
    monkeypatch.setattr(run_module, "save_error_curves", interrupted)
    interrupted_run = CliRunner().invoke(app, [str(a) for a in args(22)])
    assert interrupted_run.exit_code == 130, interrupted_run.output  # typer's exit code for Ctrl-C
    monkeypatch.undo()
    for name in ("results.json", "results.md"):
        assert not (out / name).exists(), f"the earlier run's {name} is left beside the new samples.png"
    _ok(*args(22))  # the rerun finishes the report
    assert json.loads((out / "results.json").read_text()) and (out / "results.md").exists()


def test_an_interrupted_analyze_rerun_never_keeps_the_earlier_numbers(model_dir, tmp_path, monkeypatch):
    """``tadq analyze`` wrote analysis.json before drawing propagation.png: a rerun with another seed cut while
    drawing left the earlier analysis's numbers in the folder as if they were this run's."""
    import tadq.analysis

    artefact, out = tmp_path / "artefact", tmp_path / "analysis"
    _ok("quantize", model_dir, "--out", artefact, "--cache-dir", tmp_path / "cache", "--steps", "3",
        "--calib-trajectories", "4", "--threads", "1")

    def args(seed: int) -> list:
        return ["analyze", artefact, "--fp-model", model_dir, "--num-samples", "4", "--steps", "3", "--threads", "1",
                "--seed", seed, "--out", out]

    _ok(*args(11))
    assert json.loads((out / "analysis.json").read_text())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tadq.analysis, "save_propagation_plot", interrupted)  # analyze imports it at call time
    interrupted_run = CliRunner().invoke(app, [str(a) for a in args(22)])
    assert interrupted_run.exit_code == 130, interrupted_run.output
    monkeypatch.undo()
    assert not (out / "analysis.json").exists(), "the earlier analysis.json is left as if it were this run's"
    _ok(*args(22))
    assert json.loads((out / "analysis.json").read_text())["settings"]
