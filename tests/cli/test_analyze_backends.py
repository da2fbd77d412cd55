"""``tadq analyze --backend``: the error propagation of the network a deployment runs (the integer kernels), not only
of its float simulation; a backend the machine cannot run is refused before anything is read."""

from __future__ import annotations

import json
import math

import pytest
from tests.backends.machine import needs_int8_cpu
from typer.testing import CliRunner

import tadq.analysis
from tadq.backends import IntegerDenoiser
from tadq.cli.app import app

runner = CliRunner()


@needs_int8_cpu
def test_analyze_measures_the_network_of_the_chosen_backend(tmp_path, tiny_model_dir, monkeypatch):
    """W4A8 (weight codes within ±15: exact on every oneDNN CPU, AVX2 included): ``--backend int8`` hands the
    integer network to the analysis, the report and its settings name the backend, and the first state (the shared
    noise) has no error on either backend."""
    artefact = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--preset", "W4A8", "--out", str(artefact),
                                 "--cache-dir", str(tmp_path / "cache"), "--steps", "4", "--calib-trajectories", "8"])
    assert result.exit_code == 0, result.output
    analysed = []
    original = tadq.analysis.analyze_propagation

    def spy(q_denoiser, *args, **kwargs):
        analysed.append(q_denoiser)
        return original(q_denoiser, *args, **kwargs)

    monkeypatch.setattr(tadq.analysis, "analyze_propagation", spy)
    reports = {}
    for backend in ("fake", "int8"):
        out = tmp_path / f"analysis-{backend}"
        result = runner.invoke(app, ["analyze", str(artefact), "--fp-model", str(tiny_model_dir), "--num-samples", "3",
                                     "--steps", "3", "--no-jacobian", "--backend", backend, "--out", str(out)])
        assert result.exit_code == 0, result.output
        reports[backend] = json.loads((out / "analysis.json").read_text())
        assert (out / "propagation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not isinstance(analysed[0], IntegerDenoiser)
    assert isinstance(analysed[1], IntegerDenoiser) and analysed[1].backend == "int8"
    for backend, report in reports.items():
        assert report["settings"]["backend"] == backend
        assert report["settings"]["reference"] == str(tiny_model_dir)  # the key tadq evaluate's report uses
        assert report["measured"][0] == 0.0 and math.isfinite(report["measured"][-1]) and report["measured"][-1] > 0


@pytest.mark.parametrize("backend", ["int4", "int8-cuda"])
def test_analyze_refuses_a_backend_it_cannot_run_before_reading_the_artefact(tmp_path, backend):
    """Unknown, or not runnable on the default CPU placement: refused before the (missing) artefact is looked at."""
    result = runner.invoke(app, ["analyze", str(tmp_path / "missing"), "--backend", backend])
    assert result.exit_code == 2 and backend in result.output, result.output
    assert "does not exist" not in result.output and "not a tadq artefact" not in result.output, result.output
