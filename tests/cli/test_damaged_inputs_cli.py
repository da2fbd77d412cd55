"""The CLI on damaged and hostile files the loader used to accept or let escape as a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.io.tiny_artefacts import save_tiny_artefact
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.io import WEIGHTS_FILE
from tadq.io.manifest import write_manifest

runner = CliRunner()


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("probe-cli") / "q", "W4A8")


def test_verify_reports_a_scheduler_diffusers_cannot_build_as_failed_not_a_traceback(copy):
    file = copy / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"beta_schedule": "magic"}))
    write_manifest(copy)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1, result.output
    assert "FAILED" in result.output and "scheduler_config.json" in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_sample_refuses_a_zero_weight_step_before_sampling(copy, tmp_path):
    key = "model.down_blocks.0.resnets.0.conv1.weight_quantizer.scale"
    with safe_open(str(copy / WEIGHTS_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(copy / WEIGHTS_FILE)
    tensors[key] = torch.zeros_like(tensors[key])  # used to load and sample with that layer's weights all zero
    save_file(tensors, str(copy / WEIGHTS_FILE), metadata=metadata)
    write_manifest(copy)
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(copy), "--num-samples", "1", "--steps", "2", "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "error:" in text and WEIGHTS_FILE in text and "step size Δ = 0.0" in text, text
    assert "Traceback" not in result.output and not out.exists()


def test_quantize_refuses_a_pickled_model_before_any_work(tmp_path, tiny_model_dir):
    (weights,) = (tiny_model_dir / "unet").glob("*.safetensors")
    torch.save(load_file(weights), tiny_model_dir / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--steps", "2",
                                 "--calib-trajectories", "4", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2, result.output
    assert "never a pickle" in " ".join(result.output.split()), result.output
    assert not out.exists() and not (tmp_path / "cache").exists()
