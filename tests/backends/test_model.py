"""A tiny diffusers UNet end to end on the int8 backend: sampling, corrections on top, loading, memory."""

from __future__ import annotations

import pytest
import torch
from tests.backends.machine import int8_reason, needs_int8_w8

from tadq import api
from tadq.backends import IntegerDenoiser, held_weight_bytes, to_backend
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig
from tadq.corrections.ptqd.experiment import fit_ptqd
from tadq.denoiser import QuantizedDenoiser
from tadq.io import load_quantized
from tadq.metrics.image import psnr_per_sample
from tadq.quant import QuantLayer
from tadq.sampling import SamplerConfig

pytestmark = pytest.mark.skipif(int8_reason() is not None, reason=f"int8 CPU backend: {int8_reason()}")

SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
MIN_PSNR_DB = 40.0  # the agreement goal: same arithmetic up to accumulation order


def _agree(images: torch.Tensor, reference: torch.Tensor) -> bool:
    """Median PSNR ≥ 40 dB: a single code flip can derail one sample of this tiny random UNet (test_tfmq.py), which
    says nothing about the backend; a systematic error would fail every sample."""
    return bool(psnr_per_sample(images, reference).median() >= MIN_PSNR_DB)


def _quantize(unet, scheduler, preset: str, **overrides) -> QuantizedDenoiser:
    config = QuantConfig.from_preset(preset, calibration=CALIB, **overrides)
    return api.quantize(unet, scheduler, config, progress=False)


def _images(model, scheduler, seed: int = 5) -> torch.Tensor:
    return api.sample(model, scheduler, SAMPLER, num_samples=6, seed=seed, progress=False).images


@pytest.mark.parametrize("preset, overrides", [pytest.param("W8A8", {}, marks=needs_int8_w8),
                                              ("W4A8", {"split_shortcut": True, "quantize_attention": True})])
def test_integer_sampling_agrees_with_fake_quant(tiny_unet, ddpm_scheduler, preset, overrides):
    """Same noise → same samples up to float rounding; a rare code flip at a rounding boundary may move a value by
    one step, which is why agreement is measured as PSNR (the issue's ≥ 40 dB), not elementwise."""
    fake = _quantize(tiny_unet, ddpm_scheduler, preset, **overrides)
    integer = to_backend(fake, "int8")
    assert isinstance(integer, IntegerDenoiser) and isinstance(integer, QuantizedDenoiser)
    assert integer is not fake and integer.layers["integer"]
    if overrides.get("quantize_attention"):
        assert any("attention" in why for why in integer.layers["float"].values())
    assert _agree(_images(integer, ddpm_scheduler), _images(fake, ddpm_scheduler))


def _offset_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if getattr(module, "has_offset", False)]


@needs_int8_w8
def test_symmetric_weight_preset_needs_no_offset_correction(tiny_unet, ddpm_scheduler):
    """W8A8's asymmetric 8-bit weight codes need the offset correction (o_c·window sums); W8A8-WSYM's do not, and
    its integer model still agrees with its own fake-quant model."""
    assert _offset_layers(to_backend(_quantize(tiny_unet, ddpm_scheduler, "W8A8"), "int8").model)
    fake = _quantize(tiny_unet, ddpm_scheduler, "W8A8-WSYM")
    assert fake.config.label == "W8A8-WSYM"
    integer = to_backend(fake, "int8")
    assert integer.layers["integer"] and not _offset_layers(integer.model)
    assert _agree(_images(integer, ddpm_scheduler), _images(fake, ddpm_scheduler))


def test_ptqd_runs_unchanged_on_the_integer_model(tiny_unet, ddpm_scheduler):
    base = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    corrected = fit_ptqd(base, tiny_unet, ddpm_scheduler, SAMPLER, PTQDConfig(num_samples=16, seed=3))
    integer = to_backend(corrected, "int8")
    assert len(integer.correction_hooks()) == 1
    with_ptqd, without = _images(integer, ddpm_scheduler), _images(to_backend(base, "int8"), ddpm_scheduler)
    assert not torch.equal(with_ptqd, without)
    assert _agree(with_ptqd, _images(corrected, ddpm_scheduler))


def test_load_with_backend_holds_packed_int8_weights(tiny_unet, ddpm_scheduler, tmp_path):
    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    fake.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = load_quantized(tmp_path / "q", backend="int8")
    assert isinstance(loaded, IntegerDenoiser) and loaded.backend == "int8"
    assert not any(isinstance(m, QuantLayer) for m in loaded.model.modules())
    fp_bytes = 4 * sum(p.numel() for p in tiny_unet.parameters())
    assert held_weight_bytes(loaded.model) < fp_bytes  # int8 codes replace the float weights (ratio: benchmark)
    assert _agree(_images(loaded, ddpm_scheduler), _images(fake, ddpm_scheduler))
    with pytest.raises(TypeError, match="save the 'fake' model"):
        loaded.save_pretrained(tmp_path / "again", ddpm_scheduler)


def test_fake_backend_is_the_model_itself(tiny_unet, ddpm_scheduler):
    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    assert to_backend(fake, "fake") is fake
    with pytest.raises(ValueError, match="already runs"):
        to_backend(to_backend(fake, "int8"), "int8")


def test_weight_only_model_is_refused_naming_a_layer(tiny_unet, ddpm_scheduler):
    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A16")
    with pytest.raises(ValueError, match=r"conv_in: its input is not quantized"):
        to_backend(fake, "int8")
