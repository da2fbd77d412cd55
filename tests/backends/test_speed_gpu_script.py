"""benchmarks/speed_gpu.py end to end on the CPU, its CUDA calls stubbed: a GPU lease is minutes long, so the
script's own code (tables, hooks, JSON, failure rows) must not be what fails there. Not a GPU test: the int8-cuda
arithmetic runs on the CPU's ``torch._int_mm`` and every timing is meaningless."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import tadq
from tadq.backends import registry

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed_gpu.py"


@pytest.fixture
def speed_gpu(monkeypatch):
    """The script as a module, with CUDA stubbed and int8-cuda allowed to run on the CPU."""
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *args, **kwargs: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 1024)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "stub")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (0, 0))
    on_cpu = dataclasses.replace(registry.BACKENDS["int8-cuda"], missing=lambda: None, finish=None, device_type=None)
    monkeypatch.setitem(registry.BACKENDS, "int8-cuda", on_cpu)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("speed_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "resolve_device", lambda device: torch.device("cpu"))
    monkeypatch.setattr(module, "REPEATS", 1)
    return module


def _run(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["speed_gpu.py", *args])
    module.main()


@pytest.mark.slow  # ≈ 25 s (three prepares and the speed table): `make test-slow`
def test_the_gpu_speed_script_writes_every_row_and_the_kernel_table(speed_gpu, monkeypatch, tiny_model_dir,
                                                                    tmp_path):
    artefacts, out = tmp_path / "artefacts", tmp_path / "out"
    prepare = ("--prepare", "--model", str(tiny_model_dir), "--artefacts", str(artefacts), "--cache-dir",
               str(tmp_path / "cache"))
    _run(speed_gpu, monkeypatch, *prepare, "--presets", "W8A8")
    _run(speed_gpu, monkeypatch, *prepare, "--presets", "W8A8")  # again: was refused after quantizing
    notes = artefacts / "W4A8" / "notes.txt"  # a folder tadq did not write: refused before quantizing, kept
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        _run(speed_gpu, monkeypatch, *prepare, "--presets", "W8A8,W4A8")
    assert exit_info.value.code == 2 and notes.read_text() == "mine"
    original = tadq.sample

    def failing_for_integer_models(model, *args, **kwargs):  # the row of a variant that cannot sample
        if type(model).__name__ == "IntegerDenoiser":
            raise RuntimeError("simulated failure\nsecond line")
        return original(model, *args, **kwargs)

    monkeypatch.setattr(speed_gpu.tadq, "sample", failing_for_integer_models)
    _run(speed_gpu, monkeypatch, "--model", str(tiny_model_dir), "--presets", "W8A8", "--artefacts",
         str(artefacts), "--samples", "2", "--batches", "1,17", "--out", str(out))
    report = json.loads((out / "speed_gpu.json").read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["FP fp32", "FP bf16", "FP fp16", "W8A8 fake", "W8A8 int8-cuda"]
    assert rows["W8A8 int8-cuda"]["error"] == "RuntimeError: simulated failure"
    assert rows["W8A8 int8-cuda"]["ddim50_s"] is None and rows["W8A8 fake"]["ddim50_s"] > 0
    assert all(rows[name]["latency_b17_ms"] > 0 for name in rows)
    assert rows["W8A8 int8-cuda"]["held_vs_fp32"] < rows["W8A8 fake"]["held_vs_fp32"]
    kinds = {row["kind"] for row in report["kernels"]}
    assert kinds == {"conv", "linear"} and all(row["int8 layer"] > 0 for row in report["kernels"])
    table = (out / "speed_gpu.md").read_text()
    assert "failed (RuntimeError: simulated failure)" in table and "int8-cuda layer faster than bf16" in table
