"""The bench matrix config and the ``tadq bench`` command line."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.experiments.bench import BEST_STACK, BenchConfig, default_methods, matrix, parse_sampler, quick_methods
from tadq.experiments.bench.config import sampler_name
from tadq.experiments.rows import method_names
from tadq.experiments.rows.peers import PEERS
from tadq.sampling import SamplerConfig

runner = CliRunner()


def test_sampler_names_round_trip():
    assert parse_sampler("ddim-eta0") == SamplerConfig(kind="ddim", num_steps=50, eta=0.0)
    assert parse_sampler("DDIM-eta1@20") == SamplerConfig(kind="ddim", num_steps=20, eta=1.0)
    assert parse_sampler("ddpm", steps=30) == SamplerConfig(kind="ddpm", num_steps=30)
    for sampler in (SamplerConfig(kind="ddim", num_steps=7, eta=0.5), SamplerConfig(kind="ddpm", num_steps=9)):
        assert parse_sampler(sampler_name(sampler, with_steps=True)) == sampler
    for bad in ("heun", "ddpm-eta1", "ddim-eta2", "euler-eta1", "ddim-shift3", "dpmsolver++3", "euler2"):
        with pytest.raises(ValueError):
            parse_sampler(bad)


def test_ode_sampler_names_parse_and_round_trip():
    assert parse_sampler("euler") == SamplerConfig(kind="euler", num_steps=50)
    assert parse_sampler("Euler-Ancestral@20") == SamplerConfig(kind="euler-ancestral", num_steps=20)
    assert parse_sampler("dpmsolver++@25") == SamplerConfig(kind="dpmsolver++", num_steps=25, order=2)
    assert parse_sampler("dpmsolver++1", steps=12) == SamplerConfig(kind="dpmsolver++", num_steps=12, order=1)
    assert parse_sampler("flow-euler@28") == SamplerConfig(kind="flow-euler", num_steps=28)
    assert parse_sampler("flow-euler-shift3") == SamplerConfig(kind="flow-euler", num_steps=50, shift=3.0)
    for sampler in (SamplerConfig("euler", 30), SamplerConfig("euler-ancestral", 8), SamplerConfig("dpmsolver++", 20),
                    SamplerConfig("dpmsolver++", 20, order=1), SamplerConfig("flow-euler", 28),
                    SamplerConfig("flow-euler", 28, shift=3.0)):
        name = sampler_name(sampler, with_steps=True)
        assert parse_sampler(name) == sampler and parse_sampler(sampler_name(sampler), sampler.num_steps) == sampler
    assert sampler_name(SamplerConfig("dpmsolver++", 20)) == "dpmsolver++"
    assert sampler_name(SamplerConfig("euler-ancestral", 8), with_steps=True) == "euler-ancestral@8"


def test_matrices_take_their_methods_from_the_registry():
    full, quick = default_methods(), quick_methods()
    assert set(full) <= set(method_names()) and set(quick) < set(full)
    assert {"naive", "qdiffusion", "ptqd", "tac", "tcec", BEST_STACK} <= set(full)
    assert set(PEERS) <= set(full) and not set(PEERS) & set(quick)
    assert any(name.startswith("tfmq") for name in full) == any(n.startswith("tfmq") for n in method_names())
    fields = matrix("quick")
    assert fields["presets"] == ("W8A8", "W4A8") and fields["num_samples"] == 256 and len(fields["samplers"]) == 1
    assert len(matrix("default")["samplers"]) == 2 and "W4A16" in matrix("default")["presets"]
    with pytest.raises(ValueError, match="quick"):
        matrix("huge")


def test_config_rejects_bad_matrices_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="unknown methods"):
        BenchConfig(methods=("magic",), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="preset"):
        BenchConfig(methods=("naive",), presets=("W3A3",), out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="repeat"):
        BenchConfig(methods=("naive",), samplers=(parse_sampler("ddim-eta0"), parse_sampler("ddim-eta0")))
    with pytest.raises(ValueError, match="differ"):
        BenchConfig(methods=("naive",), eval_seed=0)
    assert not (tmp_path / "report.html").exists()


def test_command_reproduces_the_config():
    config = BenchConfig(methods=("naive", "ptqd"), presets=("W4A8",), samplers=(parse_sampler("ddim-eta1@20"),),
                         num_samples=64, out_dir="runs/b", models_dir="runs/main/models", threads=1)
    args = shlex.split(config.command())
    assert args[:2] == ["tadq", "bench"]
    flags = dict(zip(args[2::2], args[3::2], strict=True))
    assert flags == {"--methods": "naive,ptqd", "--presets": "W4A8", "--samplers": "ddim-eta1", "--steps": "20",
                     "--num-samples": "64", "--seed": "1000", "--calib-seed": "0", "--calib-trajectories": "256",
                     "--out": "runs/b", "--models-dir": "runs/main/models", "--threads": "1"}


def test_cli_runs_a_tiny_bench(tmp_path, tiny_model_dir):
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", "--model", str(tiny_model_dir), "--methods", "naive,quanto", "--presets", "W4A4",
        "--samplers", "ddim-eta0@3", "--num-samples", "4", "--calib-trajectories", "8", "--batch-size", "4",
        "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    status = {r["method"]: r["status"] for r in report["rows"]}
    assert status["naive"] == "ok" and status["quanto"].startswith("not supported: ")
    assert "--samplers ddim-eta0 --steps 3" in report["command"] and "report.html" in result.output


def test_cli_bad_sampler_is_a_clean_error(tmp_path):
    result = runner.invoke(app, ["bench", "--samplers", "heun", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "unknown sampler" in result.output
    assert not (tmp_path / "out").exists()


def test_models_dir_equal_to_the_bench_folder_is_refused_before_any_work(tmp_path):
    """The bench marked --out as its own first; each base model was then quantized and refused when saved into it,
    and every row read "not supported: OutputRefused"."""
    with pytest.raises(ValueError, match="is the bench folder itself"):
        BenchConfig(methods=("naive",), presets=("W8A8",), out_dir=str(tmp_path / "b"),
                    models_dir=str(tmp_path / "b" / "."))


def test_cli_models_dir_equal_to_out_is_refused_naming_the_flags(tmp_path):
    """The command's error named BenchConfig's field, models_dir, where the user had typed --models-dir."""
    out = tmp_path / "b"
    result = runner.invoke(app, ["bench", "--out", str(out), "--models-dir", str(out / "."), "--methods", "naive",
                                 "--presets", "W8A8"])
    assert result.exit_code != 0 and "is the bench folder itself" in result.output
    assert "--models-dir" in result.output and "--out" in result.output
    assert not re.search(r"(?<![-\w])models_dir\b", result.output)  # the field's name (the tmp path holds it too)
    assert not out.exists()
