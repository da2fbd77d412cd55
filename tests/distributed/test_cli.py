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


def test_an_interrupted_rerun_with_more_samples_leaves_no_metrics_of_the_earlier_run(
        tiny_setup: TinySetup, tmp_path: Path, monkeypatch) -> None:
    """A rerun with another N rewrites the manifest (complete: false) and deletes the earlier samples.safetensors
    before it samples; the earlier run's metrics.json was deleted only after sampling, so a rerun interrupted in
    between left the N=4 metrics beside an unfinished N=6 run, numbers of samples that run is not made of."""
    import tadq.distributed.sampling as sharded_sampling

    out = tmp_path / "run"
    flags = ["sample-sharded", str(tiny_setup.candidate_dir), "--steps", "3", "--batch-size", "2", "--seed", "7",
             "--threads", "1", "--out-dir", str(out)]
    run_cli([*flags, "--num-samples", "4"])
    assert (out / "metrics.json").is_file()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded_sampling, "save_chunk", interrupt)
    result = runner.invoke(app, [*flags, "--num-samples", "6"])
    assert result.exit_code != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["complete"]) == (6, False)
    assert not (out / "metrics.json").exists(), "the N=4 run's metrics outlived it beside the unfinished N=6 run"
    assert not (out / "samples.safetensors").exists()
