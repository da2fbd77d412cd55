"""The headline job (``make run``) and the ``best`` row: which (row, preset) pairs it builds, without building any.

``make run`` is read from the Makefile and parsed by the real ``tadq run`` command; only ``run_main_job`` is
replaced, so a changed flag, a renamed row or a moved best recipe fails here rather than after an hour of work.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tadq.experiments.run as run_module
from tadq.cli.app import app
from tadq.config import ReconstructionConfig
from tadq.experiments.rows import BEST_ROWS, method_label, row_for
from tadq.experiments.rows.recipes import README_TABLES_RECONSTRUCTION
from tadq.experiments.run import HEADLINE_METHODS, HEADLINE_SAMPLES, RunConfig, cell_key, job_rows

ROOT = Path(__file__).resolve().parents[2]
# the headline: each default preset's naive-PTQ baseline against the README's best row at that preset
EXPECTED = [("naive", "W8A8"), ("naive", "W4A8"), ("naive", "W4A4"),
            ("tfmq-model+tac", "W8A8"), ("tac", "W4A8"), ("svdquant+tac", "W4A4")]


def _make_target(name: str) -> list[list[str]]:
    """The commands of Makefile target ``name``, split like a shell, ``$(BIN)/`` dropped."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}:"))
    commands = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        commands.append(shlex.split(line.strip().replace("$(BIN)/", ""), comments=True))
    return commands


def _parsed(args: list[str], tmp_path, monkeypatch) -> RunConfig:
    """The ``RunConfig`` the real ``tadq run`` builds from ``args`` (the job itself is not run)."""
    seen: list[RunConfig] = []

    def fake_job(config: RunConfig) -> dict:
        seen.append(config)
        return {"rows": [], "notes": {"fd": "", "fake_quant": ""}}

    monkeypatch.setattr(run_module, "run_main_job", fake_job)
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    (config,) = seen
    return config


def test_make_run_is_the_headline(tmp_path, monkeypatch):
    (command,) = _make_target("run")
    assert command[:2] == ["tadq", "run"]
    config = _parsed(command[1:], tmp_path, monkeypatch)
    assert config.model is None  # the shipped digits model
    assert config.presets == ("W8A8", "W4A8", "W4A4")
    assert config.methods == HEADLINE_METHODS
    assert job_rows(config) == EXPECTED
    assert config.num_samples == HEADLINE_SAMPLES == 256 and config.batch_size == 256
    # block reconstruction by GPTQ rounding without the activation phase (the measured fast setting); everything
    # else of the library's method settings untouched
    assert config.reconstruction == ReconstructionConfig(rounding="gptq", activation_iters=0)
    assert config.calibration == RunConfig().calibration
    # the input and output convs in float in every row, naive included (the diagnosis of what limits W8A8)
    assert config.fp_layers == "first_last"


def test_bench_full_is_the_former_main_job_and_the_corrections_table(tmp_path, monkeypatch):
    full, corrections = (_parsed(command[1:], tmp_path / str(i), monkeypatch)
                         for i, command in enumerate(_make_target("bench-full")))
    assert (full.methods, full.presets, full.num_samples) == (("naive", "qdiffusion", "ptqd"),
                                                               ("W8A8", "W4A8", "W4A4"), 1000)
    assert set(corrections.methods) == {"naive", "qdiffusion", "ptqd", "tac", "tcec", "ibc", "ner", "tac+tcec"}
    assert corrections.presets == ("W4A4", "W4A8") and corrections.num_samples == 1000
    # the main table's own setting (docs/results/digits.md), not the defaults: AdaRound 1000 / 400, every layer
    # quantized
    for config in (full, corrections):
        assert config.reconstruction == README_TABLES_RECONSTRUCTION and config.fp_layers == "none"
    assert README_TABLES_RECONSTRUCTION == ReconstructionConfig(rounding="adaround", activation_iters=400)


def test_the_defaults_are_the_headlines_setting():
    assert ReconstructionConfig() == ReconstructionConfig(rounding="gptq", activation_iters=0)
    assert RunConfig().fp_layers == "first_last"


@pytest.mark.parametrize(("preset_name", "row"), sorted(BEST_ROWS.items()))
def test_best_is_exactly_the_measured_row(preset_name, row):
    config = RunConfig(methods=("best",), presets=(preset_name,))
    best, named = row_for("best", None, config, preset_name), row_for(row, None, config, preset_name)
    assert (best.name, best.bits, best.settings) == (method_label(row), preset_name, named.settings)
    assert cell_key("fp", config, best) == cell_key("fp", config, named)  # one cell, whichever name built it


def test_best_without_a_measured_row_is_refused_before_any_work():
    with pytest.raises(ValueError, match="no measured best recipe at W4A16"):
        RunConfig(methods=("naive", "best"), presets=("W8A8", "W4A16"))
    assert job_rows(RunConfig(methods=("naive",), presets=("W4A16",))) == [("naive", "W4A16")]
