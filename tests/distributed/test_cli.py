"""``tadq sample-sharded`` in one process: registration, clean errors on bad input, and an exact rerun."""

from __future__ import annotations

import json
from pathlib import Path

from tests.distributed.tiny_runs import RUN_FLAGS, TinySetup, run_cli
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()


def test_registered_with_its_options() -> None:
    result = runner.invoke(app, ["sample-sharded", "--help"])
    assert result.exit_code == 0
    for option in ("--num-samples", "--out-dir", "--reference-dir", "--no-metrics", "--chunk-size", "--device"):
        assert option in result.output


def test_finished_run_is_only_measured_again(tiny_setup: TinySetup) -> None:
    before = json.loads((tiny_setup.candidate_run / "metrics.json").read_text())
    output = run_cli(["sample-sharded", str(tiny_setup.candidate_dir), *RUN_FLAGS, "--out-dir",
                      str(tiny_setup.candidate_run), "--reference-dir", str(tiny_setup.reference_run)])
    assert "5 chunks reused" in output
    assert json.loads((tiny_setup.candidate_run / "metrics.json").read_text()) == before


def test_out_dir_of_another_configuration_is_a_clean_error(tiny_setup: TinySetup) -> None:
    result = runner.invoke(app, ["sample-sharded", str(tiny_setup.candidate_dir), *RUN_FLAGS, "--out-dir",
                                 str(tiny_setup.reference_run), "--no-metrics"])
    assert result.exit_code == 2
    assert "another configuration" in result.output and "model_fingerprint" in result.output


def test_reference_that_is_not_a_run_is_a_clean_error(tiny_setup: TinySetup, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample-sharded", str(tiny_setup.candidate_dir), *RUN_FLAGS, "--out-dir",
                                 str(tmp_path / "out"), "--reference-dir", str(tiny_setup.reference_dir)])
    assert result.exit_code == 2 and "not a `tadq sample-sharded` run folder" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_device_is_a_clean_error(tiny_setup: TinySetup, tmp_path: Path) -> None:
    result = runner.invoke(app, ["sample-sharded", str(tiny_setup.candidate_dir), "--device", "tpu", "--out-dir",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2 and "device must be one of" in result.output


def test_metrics_on_the_seed_an_artefact_was_calibrated_on_are_refused_before_any_chunk(tmp_path: Path) -> None:
    from tests.io.tiny_artefacts import save_tiny_artefact

    artefact = save_tiny_artefact(tmp_path / "q", "W8A8")  # calibration seed 0
    flags = ["sample-sharded", str(artefact), "--num-samples", "2", "--steps", "2", "--batch-size", "2", "--seed", "0"]
    result = runner.invoke(app, [*flags, "--out-dir", str(tmp_path / "measured")])
    assert result.exit_code == 2 and "calibration.seed" in result.output, result.output
    assert not (tmp_path / "measured" / "chunks").exists()
    result = runner.invoke(app, [*flags, "--out-dir", str(tmp_path / "sampled"), "--no-metrics"])  # samples only
    assert result.exit_code == 0, result.output
