"""Quantized attention matmuls (docs/methods/qdiffusion.md#attention): q, k, v and the softmax output P."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

import tadq
from tadq import api
from tadq.calibration import Calibrate, activation_quantizers, collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant import QScheme, Quantizer
from tadq.quant.attention import (
    QUANTIZER_NAMES,
    QuantAttnProcessor,
    RowSoftmaxQuantizer,
    apply_attention_quantization,
    install_attention_quantizers,
    softmax_scheme,
)
from tadq.quant.granularity import dynamic_fake_quantize
from tadq.quant.quantizer import quantizers_bypassed
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

T = torch.tensor([3, 250, 500, 999])
EPS = torch.finfo(torch.float32).eps


def _with_attention_quantizers(model, scheme: QScheme, softmax_bits: int = 8, granularity: str = "per_tensor"):
    quantized = copy.deepcopy(model)
    for name in adapter_for(quantized).attention_modules(quantized):
        install_attention_quantizers(quantized.get_submodule(name), scheme, softmax_bits,
                                     softmax_granularity=granularity)
    return quantized


def _calibrate(model, x: torch.Tensor) -> None:
    with torch.no_grad(), Calibrate(model):
        model(x, T)


def test_attention_modules_are_the_diffusers_attention_blocks(tiny_unet):
    names = adapter_for(tiny_unet).attention_modules(tiny_unet)
    assert names == ["down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                     "mid_block.attentions.0"]
    assert all(isinstance(tiny_unet.get_submodule(n), Attention) for n in names)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_disabled_quantizers_reproduce_the_default_processor(tiny_unet, granularity):
    quantized = _with_attention_quantizers(tiny_unet, QScheme.off(), granularity=granularity)
    assert all(isinstance(quantized.get_submodule(n).processor, QuantAttnProcessor)
               for n in adapter_for(quantized).attention_modules(quantized))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference, out = tiny_unet(x, T).sample, quantized(x, T).sample
    assert isinstance(tiny_unet.mid_block.attentions[0].processor, AttnProcessor2_0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_bypassed_per_row_quantizers_reproduce_the_default_processor(tiny_unet):
    """Installed and enabled (P per row), but passed through: only the explicit matmuls differ from diffusers' fused
    kernel. Their difference is float reassociation over sums of at most 16 tokens × 4 channels of O(1) terms,
    a few float32 ulps of the O(1) output: 1e-5 holds it with room; one 8-bit P step (≥ 1/255 of a row
    maximum) is far above it, so a quantizer that was not bypassed would fail this."""
    quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=8), granularity="per_row")
    _calibrate(quantized, torch.randn(4, 1, 8, 8))
    assert quantized.mid_block.attentions[0].softmax_quantizer.scheme.granularity == "per_token"
    assert isinstance(quantized.mid_block.attentions[0].softmax_quantizer, RowSoftmaxQuantizer)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference = tiny_unet(x, T).sample
        with quantizers_bypassed(quantized):
            out = quantized(x, T).sample
        quantized_out = quantized(x, T).sample
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    assert (quantized_out - reference).abs().max() > 1e-5  # not bypassed: the operands are quantized


def _rows_over_many_keys(keys: int = 1024) -> torch.Tensor:
    """Eight softmax rows over ``keys`` keys: seven diffuse (entries near 1/keys ≪ 1/256) and one peaked row
    (max ≈ 1), as the photos model's attention mixes them (docs/methods/qdiffusion.md#attention)."""
    generator = torch.Generator().manual_seed(0)
    scores = 0.3 * torch.randn(1, 1, 8, keys, generator=generator)
    scores[..., 7, 0] = 40.0  # one query attends to a single key
    return scores.softmax(dim=-1)


def test_per_row_softmax_keeps_each_row_within_its_own_step():
    """P̂_ij = Δ_i · round(P_ij / Δ_i) with Δ_i = max_j P_ij / (2^b − 1): every entry is within Δ_i / 2, so a row's
    mass is within M · Δ_i / 2 of 1, and its maximum is exact (code 2^b − 1). Float32 adds a relative error of a
    few ε to P / Δ_i (≤ 255), i.e. ≤ 255 · 4ε · Δ_i ≈ 1e-4 Δ_i per entry, and ≤ M ε to a row sum."""
    probs = _rows_over_many_keys()
    keys, levels = probs.shape[-1], 255
    quantizer = RowSoftmaxQuantizer(softmax_scheme(QScheme(bits=8), 8, "per_row"))
    out = quantizer(probs)
    step = probs.amax(dim=-1, keepdim=True) / levels  # Δ_i
    assert ((out - probs).abs() <= step * (0.5 + 1e-4)).all()
    codes = out / step
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= 0 and codes.max() <= levels + 1e-3
    torch.testing.assert_close(out.amax(dim=-1), probs.amax(dim=-1), rtol=4 * EPS, atol=0)
    mass_error = (out.sum(dim=-1) - 1).abs()
    bound = keys * step.squeeze(-1) * (0.5 + 1e-4) + keys * EPS
    assert (mass_error <= bound).all()
    diffuse = probs[..., :7, :]
    assert diffuse.amax() < 1 / 256 and diffuse.median() < 1 / 1024 * 1.5  # the rows the test is about
    assert (bound[..., :7] < 0.5).all()  # the bound says something: at most half the mass of a diffuse row

    # The per-tensor grid, calibrated on the same rows, has Δ ≈ max P / 255 ≈ 1/255 for every row: the diffuse
    # rows' entries (< Δ / 2 ≈ 1/510) round to zero and their mass is lost, outside the per-row bound.
    per_tensor = Quantizer(softmax_scheme(QScheme(bits=8, range_method="minmax"), 8), kind="activation")
    per_tensor.set_range(probs.amin().reshape(1), probs.amax().reshape(1))
    lost = (per_tensor(probs).sum(dim=-1) - 1).abs()
    assert (lost[..., :7] > bound[..., :7]).all()


def test_fused_per_row_path_matches_the_generic_dynamic_path():
    """Without gradients ``RowSoftmaxQuantizer`` runs the fused per-channel kernel (x · 1/Δ_i) instead of the
    generic x / Δ_i: the two differ only where x / Δ_i is within float rounding of a half step, by one code (Δ_i),
    so on random rows at most a few entries in 10^5 may differ; with gradients it is the generic path exactly."""
    probs = torch.randn(4, 2, 64, 256, generator=torch.Generator().manual_seed(1)).softmax(dim=-1)
    scheme = softmax_scheme(QScheme(bits=8), 8, "per_row")
    quantizer, generic = RowSoftmaxQuantizer(scheme), dynamic_fake_quantize(probs, scheme, -1)
    fused = quantizer(probs)
    step = probs.amax(dim=-1, keepdim=True) / 255
    differ = fused != generic
    assert ((fused - generic).abs() <= step * (1 + 1e-4)).all()
    assert differ.float().mean() <= 1e-4
    leaf = probs.clone().requires_grad_(True)
    with_grad = quantizer(leaf)
    assert torch.equal(with_grad.detach(), generic)
    with_grad.sum().backward()  # straight through inside the range
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_per_row_softmax_scheme_is_the_dynamic_per_token_scheme_along_the_keys():
    scheme = softmax_scheme(QScheme(bits=8, symmetric=True), 6, "per_row")
    assert scheme.granularity == "per_token" and scheme.dynamic and scheme.bits == 6 and not scheme.symmetric
    assert not softmax_scheme(QScheme(bits=8), 16, "per_row").enabled
    with pytest.raises(ValueError, match="softmax granularity"):
        softmax_scheme(QScheme(bits=8), 8, "per_column")
    with pytest.raises(ValueError, match="softmax_granularity"):
        QuantConfig.from_preset("W8A8", quantize_attention=True, softmax_granularity="per_column")


def test_cross_attention_with_mask_matches_the_default_processor():
    torch.manual_seed(0)
    attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4).eval()
    x, context = torch.randn(3, 5, 8), torch.randn(3, 7, 6)
    mask = torch.zeros(3, 1, 7)
    mask[:, :, -2:] = -1e4
    with torch.no_grad():
        reference = attn(x, encoder_hidden_states=context, attention_mask=mask)
        install_attention_quantizers(attn, QScheme.off(), 8)
        out = attn(x, encoder_hidden_states=context, attention_mask=mask)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_calibrated_8_bit_is_close_and_4_bit_is_worse(tiny_unet, granularity):
    calibration, test = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference = tiny_unet(test, T).sample
    errors = {}
    for bits in (8, 4):
        quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=bits), softmax_bits=bits,
                                               granularity=granularity)
        _calibrate(quantized, calibration)
        with torch.no_grad():
            errors[bits] = (quantized(test, T).sample - reference).pow(2).mean().item()
    assert errors[8] < 1e-3 * reference.pow(2).mean().item()
    assert errors[8] < errors[4]


def test_softmax_quantizer_is_unsigned_with_zero_point_zero(tiny_unet):
    quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=8, symmetric=True), softmax_bits=6)
    _calibrate(quantized, torch.randn(4, 1, 8, 8))
    attn = quantized.mid_block.attentions[0]
    quantizer = attn.softmax_quantizer
    assert quantizer.scheme.bits == 6 and not quantizer.scheme.symmetric
    assert quantizer.zero_point.item() == 0 and quantizer.scheme.qmin == 0
    probs = torch.rand(2, 3, 4, 4).softmax(dim=-1)
    out = quantizer(probs)
    assert (out >= 0).all()
    assert torch.allclose(out / quantizer.scale, torch.round(out / quantizer.scale), atol=1e-4)  # on the grid
    assert attn.q_quantizer.scheme.symmetric  # q, k, v keep the activation scheme


def test_softmax_above_8_bits_stays_in_floating_point():
    assert not softmax_scheme(QScheme(bits=8), 16).enabled
    assert not softmax_scheme(QScheme.off(), 8).enabled
    assert softmax_scheme(QScheme(bits=4, range_method="minmax"), 8) == QScheme(bits=8, range_method="minmax")


def test_quantizers_are_registered_on_the_attention_module(tiny_unet):
    quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=8))
    state = quantized.state_dict()
    found = activation_quantizers(quantized)
    for name in adapter_for(quantized).attention_modules(quantized):
        for quantizer in QUANTIZER_NAMES:
            assert f"{name}.{quantizer}.scale" in state and f"{name}.{quantizer}.zero_point" in state
            assert f"{name}.{quantizer}" in found
    _calibrate(quantized, torch.randn(4, 1, 8, 8))
    assert all(bool(q.initialized) for q in activation_quantizers(quantized).values())
    reloaded = _with_attention_quantizers(tiny_unet, QScheme(bits=8))
    reloaded.load_state_dict(quantized.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(x, T[:2]).sample, quantized(x, T[:2]).sample)


def test_installing_twice_keeps_calibrated_quantizers(tiny_unet):
    quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=8))
    _calibrate(quantized, torch.randn(4, 1, 8, 8))
    attn = quantized.mid_block.attentions[0]
    quantizer = attn.q_quantizer
    install_attention_quantizers(attn, QScheme(bits=8), 8)
    assert attn.q_quantizer is quantizer


def test_apply_attention_quantization_follows_the_config(tiny_unet):
    adapter = adapter_for(tiny_unet)
    off = [QuantConfig.from_preset("W8A8"), QuantConfig.from_preset("W4A16", quantize_attention=True)]
    for config in off:
        model = copy.deepcopy(tiny_unet)
        assert apply_attention_quantization(model, adapter, config) == []
        processors = [m.processor for m in model.modules() if isinstance(m, Attention)]
        assert not any(isinstance(p, QuantAttnProcessor) for p in processors)
    for granularity, expected in (("per_tensor", "per_tensor"), ("per_row", "per_token")):
        model = copy.deepcopy(tiny_unet)
        config = QuantConfig.from_preset("W8A8", quantize_attention=True, softmax_granularity=granularity)
        names = apply_attention_quantization(model, adapter, config)
        assert names == adapter.attention_modules(model)
        assert all(model.get_submodule(n).softmax_quantizer.scheme.granularity == expected for n in names)
        assert all(model.get_submodule(n).q_quantizer.scheme == config.activations for n in names)


def test_processor_without_quantizers_says_how_to_install_them():
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(QuantAttnProcessor())
    with pytest.raises(RuntimeError, match="install_attention_quantizers"):
        attn(torch.randn(1, 3, 8))


SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.mark.parametrize("method", ["naive", "qdiffusion"])
def test_per_row_softmax_round_trips_bit_identically(tmp_path, tiny_unet, ddpm_scheduler, method):
    data = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)
    reconstruction = tadq.config.ReconstructionConfig(weight_iters=4, activation_iters=4, batch_size=4)
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, quantize_attention=True, method=method,
                                     softmax_granularity="per_row", reconstruction=reconstruction)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, calibration=data, progress=False)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    assert loaded.config == qmodel.config and loaded.config.softmax_granularity == "per_row"
    assert qmodel.state_dict().keys() == loaded.state_dict().keys()
    saved, reloaded = activation_quantizers(qmodel.model), activation_quantizers(loaded.model)
    assert saved.keys() == reloaded.keys()
    for name, quantizer in saved.items():  # every activation range, the attention operands' included
        assert quantizer.scheme == reloaded[name].scheme, name
        for key, value in quantizer.state_dict().items():
            assert torch.equal(value, reloaded[name].state_dict()[key]), f"{name}.{key}"
    for name in adapter_for(loaded.model).attention_modules(loaded.model):
        assert loaded.model.get_submodule(name).softmax_quantizer.scheme.granularity == "per_token"
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        assert torch.equal(qmodel(x, t), loaded(x, t))
    runs = [api.sample(m, scheduler, SAMPLER, num_samples=2, seed=5, progress=False).images for m in (qmodel, loaded)]
    assert torch.equal(runs[0], runs[1])


def test_int8_backend_runs_per_row_softmax_as_the_fake_model(tiny_unet, ddpm_scheduler):
    """The integer backends keep the attention matmuls as fake-quant float32 products (``ATTENTION_NOTE``), so a
    per-row P needs no kernel and nothing to refuse: the converted model's attention modules keep the same
    quantizers, and whole samples agree as the backend's own test requires (median PSNR ≥ 40 dB, integer layers
    move values by float rounding and rare code flips)."""
    from tests.backends.machine import int8_reason

    from tadq.backends import to_backend
    from tadq.metrics.image import psnr_per_sample

    if int8_reason() is not None:
        pytest.skip(f"int8 CPU backend: {int8_reason()}")
    # 4-bit weights: every CPU the int8 backend runs on sums them exactly (8-bit ones need VNNI/AMX)
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, quantize_attention=True, softmax_granularity="per_row")
    fake = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    integer = to_backend(fake, "int8")
    names = adapter_for(integer.model).attention_modules(integer.model)
    assert names and all(name in integer.layers["float"] for name in names)
    assert all(integer.model.get_submodule(n).softmax_quantizer.scheme.granularity == "per_token" for n in names)
    images = [api.sample(m, ddpm_scheduler, SAMPLER, num_samples=6, seed=5, progress=False).images
              for m in (integer, fake)]
    assert psnr_per_sample(images[0], images[1]).median() >= 40.0


def _drop_key(payload, key: str):
    """``payload`` without ``key`` at any depth (a config JSON as written before the key existed)."""
    if isinstance(payload, dict):
        return {k: _drop_key(v, key) for k, v in payload.items() if k != key}
    if isinstance(payload, list):
        return [_drop_key(v, key) for v in payload]
    return payload


def _set_quant_config_version(payload, version: int):
    if isinstance(payload, dict):
        if payload.get("type") == "QuantConfig":
            payload = {**payload, "version": version}
        return {k: _set_quant_config_version(v, version) for k, v in payload.items()}
    if isinstance(payload, list):
        return [_set_quant_config_version(v, version) for v in payload]
    return payload


def test_an_artefact_saved_before_the_field_loads_per_tensor_and_a_mismatched_one_is_refused(
        tmp_path, tiny_unet, ddpm_scheduler):
    """A version-1 config (written before the field) means the per-tensor P it was calibrated with and loads
    bit-identically; a current-version config without the field decodes to the per-row default while its state
    holds a calibrated per-tensor P step: loading must say so instead of running another P grid."""
    import json

    from tadq.io import CONFIG_FILE
    from tadq.io.manifest import write_manifest

    data = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)
    config = QuantConfig.from_preset("W8A8", calibration=CALIB, quantize_attention=True,
                                     softmax_granularity="per_tensor")
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, calibration=data, progress=False)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    path = tmp_path / "q" / CONFIG_FILE
    written = json.loads(path.read_text())
    assert "softmax_granularity" in path.read_text()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    path.write_text(json.dumps(_set_quant_config_version(_drop_key(written, "softmax_granularity"), 1)))
    write_manifest(tmp_path / "q")  # a consistent old artefact, not a damaged one
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.config.softmax_granularity == "per_tensor"
    with torch.no_grad():
        assert torch.equal(loaded(x, t), qmodel(x, t))
    path.write_text(json.dumps(_drop_key(written, "softmax_granularity")))
    write_manifest(tmp_path / "q")
    with pytest.raises(ValueError, match="softmax_granularity"):
        tadq.load(tmp_path / "q")


@pytest.mark.parametrize("upcast_attention", [False, True])
def test_float16_scores_that_overflow_before_the_scale_stay_finite(upcast_attention):
    """Q·Kᵀ was formed in float16 and scaled by 1/√d after: inputs whose unscaled product passes float16's range
    (SD 2.x sets upcast_attention for this) gave inf scores and a NaN sample where the default processor (SDPA,
    which scales first) stays finite. The scores are now computed in float32 for a float16 model."""
    torch.manual_seed(0)
    attn = Attention(query_dim=8, heads=2, dim_head=4, upcast_attention=upcast_attention).eval()
    x = torch.randn(2, 5, 8) * 200
    with torch.no_grad():
        reference = attn(x)  # float32, the default processor
        query, key = attn.to_q(x).unflatten(-1, (2, 4)), attn.to_k(x).unflatten(-1, (2, 4))
        assert (query.transpose(1, 2) @ key.permute(0, 2, 3, 1)).abs().max() > torch.finfo(torch.float16).max
        attn.half()
        install_attention_quantizers(attn, QScheme.off(), 8)
        out = attn(x.half())
    assert torch.isfinite(out).all()
    # float16 rounding of the projections, P and the output: a few units of its epsilon on the output's scale
    bound = 16 * torch.finfo(torch.float16).eps * float(reference.abs().max())
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=bound)
