"""Device and dtype arguments: refused by name when torch lacks them (before any work); a bfloat16 FP reference
samples, calibrates naive PTQ and fits corrections while the fake-quant network stays float32."""

from __future__ import annotations

import pytest
import torch

import tadq
from tadq.config import CalibrationConfig, ReconstructionConfig
from tadq.corrections import TACConfig
from tadq.device import place_model, resolve_device, resolve_dtype
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


def test_names_resolve_and_missing_devices_are_named():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="'float8'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1'.*no CUDA"):
            resolve_device("cuda:1")
    if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        with pytest.raises(ValueError, match="'mps'"):
            resolve_device("mps")


def test_an_mps_device_index_other_than_0_is_refused_before_work(monkeypatch):
    """A Mac has one MPS device: "mps:1" was accepted and failed at the first tensor moved there, after loading."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps") and resolve_device("mps:0") == torch.device("mps:0")
    with pytest.raises(ValueError, match="'mps:1'.*one MPS device"):
        resolve_device("mps:1")


def test_place_model_copies_only_when_needed(tiny_unet):
    assert place_model(tiny_unet, torch.device("cpu"), torch.float32) is tiny_unet
    moved = place_model(tiny_unet, torch.device("cpu"), torch.bfloat16)
    assert next(moved.parameters()).dtype is torch.bfloat16 and next(tiny_unet.parameters()).dtype is torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_quantize_and_sample_refuse_a_missing_device_before_work(tiny_unet, ddpm_scheduler):
    with pytest.raises(ValueError, match="no CUDA"):
        tadq.quantize(tiny_unet, ddpm_scheduler, Recipe(calibration=CALIB, deployments=(Deployment(SAMPLER),)),
                      device="cuda")
    with pytest.raises(ValueError, match="no CUDA"):
        tadq.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=2, seed=0, device="cuda")


def test_bfloat16_reference(tiny_unet, ddpm_scheduler):
    images = tadq.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=2, seed=0, dtype="bfloat16",
                         progress=False).images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    recon = Recipe.from_preset("W8A8", method=QDiffusionMethod(ReconstructionConfig(weight_iters=1)),
                               calibration=CALIB, deployments=(Deployment(SAMPLER),))
    with pytest.raises(NotImplementedError, match="dtype=float32"):
        tadq.quantize(tiny_unet, ddpm_scheduler, recon, dtype="bfloat16", progress=False)


def test_bfloat16_reference_calibrates_and_fits(tiny_unet, ddpm_scheduler):
    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),),
                                corrections=(TACConfig(num_samples=8),))
    qmodel = tadq.quantize(tiny_unet, ddpm_scheduler, recipe, dtype="bfloat16", progress=False)
    assert next(qmodel.model.parameters()).dtype is torch.float32 and qmodel.corrections[0].fitted
    assert next(tiny_unet.parameters()).dtype is torch.float32  # the caller's model is untouched


def test_wide_dtype_is_float64_except_on_mps():
    """MPS has no float64: the wide accumulations (and the float64 correction tables) need another dtype (and
    place) there; every other device keeps float64, so its numbers are unchanged."""
    from tadq.device import table_device, wide_dtype

    for name in ("cpu", "cuda", "cuda:1", "meta"):
        assert wide_dtype(torch.device(name)) == torch.float64 and wide_dtype(name) == torch.float64
        assert table_device(name) == torch.device(name)
    for name in ("mps", "mps:0"):
        assert wide_dtype(torch.device(name)) == torch.float32
        assert table_device(name) == torch.device("cpu")
