"""benchmarks/common.save_naive_ptq, which makes the speed benchmarks' models: it must quantize a guided conditional
workload (the shipped DiT is sampled with guidance) from the calibration set it collects, not refuse that set."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tadq.experiments.workload import load_workload
from tadq.io import load_quantized

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import common as module

    yield module
    sys.modules.pop("common", None)


@pytest.fixture
def guided_class_model_dir(tmp_path, ddpm_scheduler):
    """A tiny class-conditional UNet2DModel (3 classes, null class 3), sampled with guidance 2 below."""
    from diffusers import DDPMPipeline
    from tests.conftest import build_tiny_unet

    path = tmp_path / "class-ddpm"
    DDPMPipeline(unet=build_tiny_unet(num_class_embeds=4), scheduler=ddpm_scheduler).save_pretrained(path)
    return path


@pytest.mark.slow  # ≈ 30 s (a guided workload calibrated twice): `make test-slow`
def test_naive_ptq_models_of_a_guided_conditional_workload_are_saved(common, guided_class_model_dir, tmp_path):
    workload = load_workload(str(guided_class_model_dir), labels="random", null_class=3, guidance_scale=2.0)
    sizes = common.save_naive_ptq(workload, ["W8A8", "W4A8"], tmp_path / "models", str(tmp_path / "cache"))
    assert set(sizes) == {"W8A8", "W4A8"} and sizes["W4A8"] < sizes["W8A8"]  # 4-bit codes packed two per byte
    for preset in sizes:
        qmodel, _ = load_quantized(tmp_path / "models" / preset)
        assert qmodel.config.preset_name == preset and qmodel.config.weights.bits == (4 if preset == "W4A8" else 8)
