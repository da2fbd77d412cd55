"""A backend that cannot run here is refused with the reason, never replaced by the float simulation."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tadq.backends import BACKENDS, BackendUnavailableError, capability, check_backend, int8_cuda_missing, to_backend


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_int8_cuda_is_refused_without_cuda():
    with pytest.raises(BackendUnavailableError, match="int8-cuda.*CUDA is not available.*not replaced"):
        check_backend("int8-cuda")
    assert int8_cuda_missing() is not None


def test_int8_cpu_is_refused_without_int8_instructions(monkeypatch):
    monkeypatch.setattr(capability, "_torch_cpu_probe", lambda name: False)
    monkeypatch.setattr(capability, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(BackendUnavailableError, match="no int8 dot-product instructions"):
        check_backend("int8")


def test_int8_cpu_is_refused_without_the_onednn_engine(monkeypatch):
    monkeypatch.setattr(capability, "quantized_engines", lambda: ["qnnpack"])
    with pytest.raises(BackendUnavailableError, match="no oneDNN quantized engine"):
        check_backend("int8")


def test_refusal_happens_before_any_conversion(monkeypatch, tiny_unet):
    monkeypatch.setattr(capability, "cpu_flags", lambda: set())
    monkeypatch.setattr(capability, "_torch_cpu_probe", lambda name: False)
    with pytest.raises(BackendUnavailableError):
        to_backend(object(), "int8")  # refused on the machine, not on the argument


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'int4'.*fake"):
        check_backend("int4")
    assert set(BACKENDS) == {"fake", "int8", "int8-cuda"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_sample_refuses_int8_cuda_in_one_line(tiny_model_dir, tmp_path):
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_model_dir), "--backend", "int8-cuda", "--num-samples", "2",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output or "FP model" in result.output
