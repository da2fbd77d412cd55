"""Quantized attention matmuls (docs/methods/qdiffusion.md#attention): q, k, v and the softmax output P."""

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from tadq.calibration import Calibrate, activation_quantizers
from tadq.config import QuantConfig
from tadq.quant import QScheme
from tadq.quant.attention import (
    QUANTIZER_NAMES,
    QuantAttnProcessor,
    apply_attention_quantization,
    install_attention_quantizers,
    softmax_scheme,
)
from tadq.registry import adapter_for

T = torch.tensor([3, 250, 500, 999])


def _with_attention_quantizers(model, scheme: QScheme, softmax_bits: int = 8):
    quantized = copy.deepcopy(model)
    for name in adapter_for(quantized).attention_modules(quantized):
        install_attention_quantizers(quantized.get_submodule(name), scheme, softmax_bits)
    return quantized


def _calibrate(model, x: torch.Tensor) -> None:
    with torch.no_grad(), Calibrate(model):
        model(x, T)


def test_attention_modules_are_the_diffusers_attention_blocks(tiny_unet):
    names = adapter_for(tiny_unet).attention_modules(tiny_unet)
    assert names == ["down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1",
                     "mid_block.attentions.0"]
    assert all(isinstance(tiny_unet.get_submodule(n), Attention) for n in names)


def test_disabled_quantizers_reproduce_the_default_processor(tiny_unet):
    quantized = _with_attention_quantizers(tiny_unet, QScheme.off())
    assert all(isinstance(quantized.get_submodule(n).processor, QuantAttnProcessor)
               for n in adapter_for(quantized).attention_modules(quantized))
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference, out = tiny_unet(x, T).sample, quantized(x, T).sample
    assert isinstance(tiny_unet.mid_block.attentions[0].processor, AttnProcessor2_0)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


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


def test_calibrated_8_bit_is_close_and_4_bit_is_worse(tiny_unet):
    calibration, test = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        reference = tiny_unet(test, T).sample
    errors = {}
    for bits in (8, 4):
        quantized = _with_attention_quantizers(tiny_unet, QScheme(bits=bits), softmax_bits=bits)
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
    model = copy.deepcopy(tiny_unet)
    names = apply_attention_quantization(model, adapter, QuantConfig.from_preset("W8A8", quantize_attention=True))
    assert names == adapter.attention_modules(model)


def test_processor_without_quantizers_says_how_to_install_them():
    attn = Attention(query_dim=8, heads=2, dim_head=4)
    attn.set_processor(QuantAttnProcessor())
    with pytest.raises(RuntimeError, match="install_attention_quantizers"):
        attn(torch.randn(1, 3, 8))
