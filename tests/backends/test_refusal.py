"""A backend that cannot run here is refused with the reason, never replaced by the float simulation."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tadq import api
from tadq.backends import (
    BACKENDS,
    BackendUnavailableError,
    capability,
    check_backend,
    check_placement,
    int8_cpu_missing,
    int8_cuda_missing,
    to_backend,
)
from tadq.config import CalibrationConfig, QuantConfig
from tadq.sampling import SamplerConfig


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
    assert set(BACKENDS) == {"fake", "int8", "int8-compiled", "int8-cuda"}


@pytest.fixture
def tiny_artefact(tiny_unet, ddpm_scheduler, tmp_path):
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=calib),
                          progress=False)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    return tmp_path / "q"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_sample_refuses_int8_cuda_in_one_line(tiny_artefact, tmp_path):
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8-cuda", "--num-samples", "2",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "s.png").exists()


@pytest.mark.skipif(int8_cpu_missing() is not None, reason="no int8 CPU backend here")
def test_cli_sample_runs_int8(tiny_artefact, tmp_path):
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8", "--num-samples", "2",
                                      "--steps", "4", "--out", str(tmp_path / "s.png"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("backend, device, dtype, message", [
    ("int8", "cuda", torch.float32, "int8' runs on cpu devices only, not on cuda; choose device 'cpu' or backend "
                                    "'int8-cuda'"),
    ("int8-compiled", "cuda", torch.float32, "runs on cpu devices only"),
    ("int8-cuda", "cpu", torch.float32, "cuda devices only, not on cpu; choose device 'cuda' or backend 'int8'"),
    ("int8", "cpu", torch.bfloat16, "computes in float32.*use float32, or backend 'fake'"),
    ("int8-cuda", "cuda", torch.float16, "computes in float32"),
    ("nonsense", "cpu", torch.float32, "unknown backend"),
])
def test_a_backend_is_refused_on_a_device_or_dtype_its_kernels_do_not_run(backend, device, dtype, message):
    """Machine-independent (a device object needs no device): the placement rules alone."""
    with pytest.raises(ValueError, match=message):
        check_placement(backend, torch.device(device), dtype)


def test_the_simulation_runs_anywhere_in_any_dtype():
    for device in ("cpu", "cuda", "mps"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_placement("fake", torch.device(device), dtype)


@pytest.mark.skipif(int8_cpu_missing() is not None, reason="no int8 CPU backend here")
def test_cli_sample_refuses_a_bf16_integer_run_in_one_line(tiny_artefact, tmp_path):
    """It crashed inside deepcopy ("Cannot access storage of OpaqueTensorImpl") after loading; now refused first."""
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8", "--dtype", "bfloat16",
                                      "--num-samples", "2", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "computes in float32" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.png").exists()


@pytest.mark.skipif(int8_cpu_missing() is not None, reason="no int8 CPU backend here")
def test_sampling_an_integer_model_in_bf16_is_refused(tiny_artefact):
    from tadq.io import load_quantized

    model, scheduler = load_quantized(tiny_artefact, backend="int8")
    with pytest.raises(ValueError, match="computes in float32"):
        api.sample(model, scheduler, SamplerConfig(kind="ddim", num_steps=2), num_samples=2, seed=0,
                   dtype="bfloat16", progress=False)


@pytest.mark.skipif(int8_cpu_missing() is not None, reason="no int8 CPU backend here")
def test_casting_an_integer_model_is_refused_before_anything_changes(tiny_artefact):
    """``.half()``/``.to(bfloat16)`` on a converted model would cast its kernels' float32 scales and fail later inside
    oneDNN; refused up front, and the model is left as it was."""
    from tadq.io import load_quantized

    model, _ = load_quantized(tiny_artefact, backend="int8")
    for cast in (model.half, lambda: model.to(torch.bfloat16)):
        with pytest.raises(ValueError, match="computes in float32"):
            cast()
    assert all(t.dtype != torch.float16 and t.dtype != torch.bfloat16 for t in (*model.parameters(), *model.buffers()))
    model.float()  # a no-op cast is allowed
