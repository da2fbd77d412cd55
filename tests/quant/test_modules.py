import io

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


def _unbatched_cases():
    """(name, layer built from a fresh float layer, batched input) for every fake-quant layer kind."""
    from tadq.quant.split import SplitQuantConv2d
    from tadq.quant.transformed import quantize_layer

    weights, activations = preset("W8A8")
    conv = nn.Conv2d(12, 8, 3, padding=1)
    yield "conv", QuantConv2d.from_module(conv, weights, activations), (2, 12, 5, 5)
    yield "split", SplitQuantConv2d.from_module(conv, 8, weights, activations), (2, 12, 5, 5)
    for granularity in ("per_token", "per_group"):
        dynamic = QScheme(bits=8, granularity=granularity, group_size=4)
        yield f"conv-{granularity}", QuantConv2d.from_module(conv, weights, dynamic), (2, 12, 5, 5)
    for field in ("smoothing", "rotation"):
        transform = QScheme(bits=8, **({field: True} if field == "smoothing" else {field: "hadamard"}))
        yield f"conv-{field}", quantize_layer(conv, weights, transform), (2, 12, 5, 5)
        yield f"linear-{field}", quantize_layer(nn.Linear(12, 8), weights, transform), (2, 12)
    yield "linear", QuantLinear.from_module(nn.Linear(12, 8), weights, activations), (2, 12)


@pytest.mark.parametrize("name", [name for name, *_ in _unbatched_cases()])
def test_unbatched_input_runs_as_the_float_layer_runs_it(name):
    """nn.Conv2d takes a (C, H, W) input as a batch of one; the split conv cut it at H instead of the channels and
    the dynamic, smoothed and rotated convs grouped or scaled dim 1 (H), so the result differed or raised."""
    layer, shape = next((layer, shape) for case, layer, shape in _unbatched_cases() if case == name)
    torch.manual_seed(0)
    x = torch.randn(shape)
    _calibrated(layer, x)
    with torch.no_grad():
        batched, unbatched = layer(x[:1])[0], layer(x[0])
    assert unbatched.shape == batched.shape
    assert torch.equal(unbatched, batched)


def _symmetric_linear(bits: int, range_method: str = "mse") -> QuantLinear:
    torch.manual_seed(0)
    weights = QScheme(bits=bits, symmetric=True, granularity="per_channel", range_method=range_method)
    return _calibrated(QuantLinear.from_module(nn.Linear(16, 8), weights, QScheme(bits=8)), torch.randn(4, 16))


def test_a_state_saved_on_another_grid_is_refused_by_load_state_dict():
    """A symmetric 8-bit state has z = 0 like a symmetric 4-bit one, so it loaded silently into the 4-bit layer and
    clipped every weight to 7/127 of its range; the state now records each quantizer's grid (kept by torch.save)."""
    buffer = io.BytesIO()
    torch.save(_symmetric_linear(8).state_dict(), buffer)
    buffer.seek(0)
    four_bit = _symmetric_linear(4)
    with pytest.raises(ValueError, match=r"weight_quantizer is int4-sym-per_channel, .* int8-sym-per_channel"):
        four_bit.load_state_dict(torch.load(buffer))
    # the same grid loads, whatever range method chose its ranges
    four_bit.load_state_dict(_symmetric_linear(4, range_method="minmax").state_dict())


def test_a_rotated_layer_state_is_refused_by_a_plain_layer():
    """A Hadamard-rotated layer stores W·Hᵀ under the same keys and shapes as a plain layer (the rotation has no
    buffer), so its state loaded into a plain layer and every output was wrong without a word."""
    from tadq.quant.transformed import quantize_layer

    weights, activations = preset("W8A8")
    linear, x = nn.Linear(16, 8), torch.randn(4, 16)
    rotated = _calibrated(quantize_layer(linear, weights, QScheme(bits=8, rotation="hadamard")), x)
    plain = _calibrated(QuantLinear.from_module(linear, weights, activations), x)
    with pytest.raises(ValueError, match=r"input_quantizer is int8-asym-per_tensor, .* int8-asym-per_tensor-hadamard"):
        plain.load_state_dict(rotated.state_dict())
