import pytest
import torch
from torch import nn

from tadq.quant import QScheme, QuantConv2d, QuantLinear, preset, quantize_module


def _calibrated(layer, x):
    from tadq.calibration import Calibrate

    with Calibrate(layer):
        layer(x)
    return layer


def test_quant_conv_matches_float_conv_at_8_bits():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    layer = _calibrated(QuantConv2d.from_module(conv, *preset("W8A8")), x)
    ref = conv(x)
    rel = (layer(x) - ref).norm() / ref.norm()
    assert rel < 0.02
    low_bits = _calibrated(QuantConv2d.from_module(conv, *preset("W4A4")), x)
    assert (low_bits(x) - ref).norm() / ref.norm() > rel


def test_weights_are_shared_not_copied():
    linear = nn.Linear(4, 3)
    layer = QuantLinear.from_module(linear, *preset("W8A8"))
    assert layer.weight is linear.weight and layer.bias is linear.bias


def test_uncalibrated_activation_quantizer_raises():
    layer = QuantLinear.from_module(nn.Linear(4, 3), *preset("W8A8"))
    with pytest.raises(RuntimeError, match="calibrate"):
        layer(torch.randn(2, 4))


def test_weight_only_needs_no_calibration():
    linear = nn.Linear(4, 3)
    layer = QuantLinear.from_module(linear, *preset("W4A16"))
    x = torch.randn(2, 4)
    assert torch.allclose(layer(x), nn.functional.linear(x, layer.quantized_weight(), linear.bias))


def test_plain_forward_does_not_change_state():
    layer = _calibrated(QuantConv2d.from_module(nn.Conv2d(2, 2, 1), *preset("W4A8")), torch.randn(1, 2, 4, 4))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(3, 2, 4, 4) * 100)
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unsupported_layer_raises():
    with pytest.raises(TypeError, match="Conv2d"):
        quantize_module(nn.Conv1d(2, 2, 1), QScheme(), QScheme())


@pytest.mark.parametrize("grad", [False, True])
def test_all_zero_channel_stays_zero_when_cast_to_float16(grad):
    """A fake-quant model cast to float16 (``.half()``, ``tadq.sample(dtype=torch.float16)``): the Δ = 1e-8 of an
    all-zero output channel, and of an input that was all zero at calibration, flush to 0 in float16. A forward
    with gradients (the composed ops) divided by that 0 and made the channel, then every output, NaN; the fused
    no-grad kernel zeroed whatever the channel held. Both must quantize on the float32 grid: zeros stay exactly
    zero, everything else finite."""
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[1] = 0.0
    layer = _calibrated(QuantConv2d.from_module(conv, *preset("W8A8")), torch.zeros(2, 3, 6, 6))
    assert float(layer.weight_quantizer.scale[1]) < torch.finfo(torch.float16).tiny  # flushes in float16
    half = layer.to(torch.float16).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        weight = half.quantized_weight()
        zeros, out = half(torch.zeros(1, 3, 6, 6, dtype=torch.float16)), half(torch.rand(1, 3, 6, 6).half() * 1e-6)
    assert weight.dtype == out.dtype == torch.float16
    assert torch.isfinite(weight).all() and torch.equal(weight[1], torch.zeros_like(weight[1]))
    assert torch.equal(zeros, torch.zeros_like(zeros))
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    # an input within the calibrated range [0, 255·1e-8] keeps its codes: not all flushed to 0
    assert bool((out != 0).any())
