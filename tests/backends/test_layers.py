"""Every quantized layer kind: integer forward == fake-quant forward within the derived bound (bounds.py).

The int8 CPU kernels (oneDNN) and the int8-cuda kernels (torch._int_mm, run here on CPU, where the op exists) are
checked against the same fake-quant layers, for asymmetric 8-bit weights (offset correction), 4-bit weights (no
offset), symmetric weights, 8- and 4-bit activations, inputs beyond the calibrated range (clamping), and per-step
(TFMQ finite-set) activation ranges.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.backends.bounds import conv_bound, linear_bound
from tests.backends.machine import needs_int8_cpu, needs_int8_w8
from torch import nn

from tadq.backends import int8_cpu_missing
from tadq.backends.activations import activation_codes, activation_grid
from tadq.backends.convert import convert_layers
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d
from tadq.backends.cuda_int8 import IntMMConv2d, IntMMLinear, IntMMSplitConv2d
from tadq.quant import QScheme, QuantConv2d, QuantLinear
from tadq.quant.split import SplitQuantConv2d
from tadq.tfmq.fsc import StepQuantizer, StepState

WEIGHTS = {
    "w8-asym": QScheme(bits=8, granularity="per_channel", range_method="minmax"),
    "w4-asym": QScheme(bits=4, granularity="per_channel", range_method="minmax"),
    "w8-sym": QScheme(bits=8, symmetric=True, granularity="per_channel", range_method="minmax"),
}
ACTIVATIONS = {"a8": QScheme(bits=8), "a4": QScheme(bits=4), "a8-sym": QScheme(bits=8, symmetric=True)}
CPU = {"conv": OneDNNConv2d, "linear": OneDNNLinear, "split": OneDNNSplitConv2d}
INT_MM = {"conv": IntMMConv2d, "linear": IntMMLinear, "split": IntMMSplitConv2d}
CONVS = [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1), dict(kernel_size=1),
         dict(kernel_size=3, padding=2, dilation=2)]  # dilated: the offset's window sum must follow the kernel's taps


def _set_input_range(quantizer, x: torch.Tensor) -> None:
    """A range narrower than the data, so some inputs clamp (the integer path must clamp identically)."""
    quantizer.set_range(x.min().reshape(1) * 0.8, x.max().reshape(1) * 0.8)


def _data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2 + 0.5  # off-centre: a non-trivial zero point


def _conv(weights: QScheme, activations: QScheme, geometry: dict) -> tuple[QuantConv2d, torch.Tensor]:
    layer = QuantConv2d.from_module(nn.Conv2d(24, 16, **geometry), weights, activations)
    x = _data((3, 24, 9, 9), 1)
    _set_input_range(layer.input_quantizer, x)
    return layer, x


def _split(weights: QScheme, activations: QScheme) -> tuple[SplitQuantConv2d, torch.Tensor]:
    layer = SplitQuantConv2d.from_module(nn.Conv2d(24, 16, 3, padding=1), 10, weights, activations)
    x = torch.cat([_data((3, 10, 8, 8), 2), _data((3, 14, 8, 8), 3) * 0.1], dim=1)  # two very different ranges
    _set_input_range(layer.input_quantizer_deep, x[:, :10])
    _set_input_range(layer.input_quantizer_skip, x[:, 10:])
    return layer, x


def _linear(weights: QScheme, activations: QScheme) -> tuple[QuantLinear, torch.Tensor]:
    layer = QuantLinear.from_module(nn.Linear(40, 24), weights, activations)
    x = _data((2, 7, 40), 4)  # a 3-D input: rows of any leading shape
    _set_input_range(layer.input_quantizer, x)
    return layer, x


def _bound(kind: str, layer, x: torch.Tensor) -> torch.Tensor:
    if kind == "linear":
        return linear_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias)
    if kind == "conv":
        return conv_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias, layer)
    views = layer.quantized_weights()
    deep = conv_bound(x[:, :10], layer.input_quantizer_deep, *views["weight_deep"], layer.bias, layer, extra=1)
    skip = conv_bound(x[:, 10:], layer.input_quantizer_skip, *views["weight_skip"], None, layer, extra=1)
    return deep + skip


def _check(kind: str, layer, x: torch.Tensor, integer_class, device: str = "cpu") -> None:
    """The integer layer (run on ``device``) against the fake-quant layer on the CPU, within the derived bound."""
    with torch.no_grad():
        expected = layer(x).double()
        got = integer_class(layer, "layer").to(device)(x.to(device)).cpu().double()
    bound = _bound(kind, layer, x)
    assert got.shape == expected.shape
    excess = (got - expected).abs() - bound
    assert excess.max() <= 0, f"{kind}: worst error exceeds the derived bound by {excess.max():.3g}"


def _layers(weights: QScheme, activations: QScheme):
    for geometry in CONVS:
        yield "conv", *_conv(weights, activations, geometry)
    yield "split", *_split(weights, activations)
    yield "linear", *_linear(weights, activations)


@needs_int8_cpu
@pytest.mark.parametrize("activations", list(ACTIVATIONS))
@pytest.mark.parametrize("weights", [pytest.param(name, marks=needs_int8_w8) if WEIGHTS[name].bits == 8 else name
                                     for name in WEIGHTS])
def test_onednn_layers_match_fake_quant(weights, activations):
    for kind, layer, x in _layers(WEIGHTS[weights], ACTIVATIONS[activations]):
        _check(kind, layer, x, CPU[kind])


@pytest.mark.parametrize("activations", ["a8", "a4"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.usefixtures("int_mm_on_cpu")
def test_int_mm_layers_match_fake_quant(weights, activations):
    """The int8-cuda arithmetic (exact int32 zero-point algebra, im2col) checked on CPU."""
    for kind, layer, x in _layers(WEIGHTS[weights], ACTIVATIONS[activations]):
        _check(kind, layer, x, INT_MM[kind])


def test_activation_codes_are_the_fake_quant_codes():
    """Bit-identical codes, including inputs exactly half a step between two codes (round half to even)."""
    quantizer = QuantLinear.from_module(nn.Linear(4, 4), WEIGHTS["w8-asym"], ACTIVATIONS["a8"]).input_quantizer
    quantizer.set_range(torch.tensor([-3.0]), torch.tensor([5.0]))
    scale, zero = float(quantizer.scale), float(quantizer.zero_point)
    x = torch.cat([(torch.arange(-400, 400) + 0.5) * scale, torch.randn(10_000) * 3])
    codes = activation_codes(x, activation_grid(quantizer))
    fake = torch.fake_quantize_per_tensor_affine(x, scale, int(zero), 0, 255)
    assert torch.equal((codes - zero) * scale, fake)


@pytest.mark.parametrize("integer_class", [pytest.param(OneDNNConv2d, marks=needs_int8_w8), IntMMConv2d])
@pytest.mark.usefixtures("int_mm_on_cpu")
def test_per_step_activation_ranges(integer_class):
    """A TFMQ StepQuantizer: each step's (Δ, z) is used by the integer layer, as by the fake-quant one."""
    layer, x = _conv(WEIGHTS["w8-asym"], ACTIVATIONS["a8"], CONVS[0])
    state = StepState(3)
    scales = torch.tensor([0.01, 0.03, 0.08])
    layer.input_quantizer = StepQuantizer(layer.input_quantizer, scales, torch.tensor([40.0, 128.0, 200.0]), state)
    integer = integer_class(layer, "layer")
    outputs = []
    for step in range(3):
        with state.at(step), torch.no_grad():
            expected, got = layer(x).double(), integer(x).double()
            bound = conv_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias, layer)
        assert ((got - expected).abs() <= bound).all()
        outputs.append(got)
    assert not torch.equal(outputs[0], outputs[1])  # the step really changes the grid
    with pytest.raises(RuntimeError, match="sampler step"):
        integer(x)


def test_weight_only_layers_are_refused_by_name():
    layer = QuantConv2d.from_module(nn.Conv2d(4, 4, 3), WEIGHTS["w4-asym"], QScheme.off())
    with pytest.raises(ValueError, match="down.conv.*not quantized"):
        OneDNNConv2d(layer, "down.conv") if int8_cpu_missing() is None else IntMMConv2d(layer, "down.conv")


def test_uncalibrated_input_is_refused():
    layer = QuantLinear.from_module(nn.Linear(4, 4), WEIGHTS["w8-asym"], dataclasses.replace(ACTIVATIONS["a8"]))
    with pytest.raises(ValueError, match="no range"):
        IntMMLinear(layer, "proj")


@pytest.mark.parametrize("kind", ["conv", "split", "linear"])
def test_int_mm_layers_trace_to_one_graph_from_the_first_call(kind):
    """The activation range is read when the layer is built, so ``torch.compile`` traces a fresh layer without a
    graph break: a host read of a GPU tensor in the forward broke the graph at every layer (and synchronised the
    GPU) in the first H200 run (docs/backends.md)."""
    _, layer, x = next(item for item in _layers(WEIGHTS["w8-asym"], ACTIVATIONS["a8"]) if item[0] == kind)
    integer = INT_MM[kind](layer, "layer")
    with torch.no_grad():
        explanation = torch._dynamo.explain(integer)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def _replaced_input_range(layer: QuantLinear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Another quantizer's state, a quarter of ``layer``'s input range, whose tensors were written as often as
    ``layer``'s (one ``set_range``: the same version counters)."""
    other = QuantLinear.from_module(nn.Linear(40, 24), WEIGHTS["w8-asym"], ACTIVATIONS["a8"]).input_quantizer
    other.set_range(x.min().reshape(1) * 0.25, x.max().reshape(1) * 0.25)
    assert other.scale._version == layer.input_quantizer.scale._version
    return other.state_dict()


@pytest.mark.usefixtures("int_mm_on_cpu")
def test_an_input_range_replaced_by_another_tensor_is_read_again():
    """``load_state_dict(assign=True)`` puts new tensors in the quantizer; the grid memo, keyed on version counters
    alone, served the old range when the new tensors' counters read the same."""
    layer, x = _linear(WEIGHTS["w8-asym"], ACTIVATIONS["a8"])
    integer = IntMMLinear(layer, "layer")
    with torch.no_grad():
        before = integer(x)
        layer.input_quantizer.load_state_dict(_replaced_input_range(layer, x), assign=True)
        after, fresh = integer(x), IntMMLinear(layer, "layer")(x)
    assert not torch.equal(before, fresh)  # the replaced range really changes the output
    assert torch.equal(after, fresh)


@pytest.mark.usefixtures("int_mm_on_cpu")
def test_an_input_range_of_inference_tensors_is_read_at_every_call():
    """A state loaded under ``torch.inference_mode`` holds inference tensors, which keep no version counter: the
    grid memo asked for it and every forward raised."""
    layer, x = _linear(WEIGHTS["w8-asym"], ACTIVATIONS["a8"])
    integer = IntMMLinear(layer, "layer")
    replaced = _replaced_input_range(layer, x)
    with torch.inference_mode():
        state = {name: value.clone() for name, value in replaced.items()}
        layer.input_quantizer.load_state_dict(state, assign=True)
        assert layer.input_quantizer.scale.is_inference()
        got, fresh = integer(x), IntMMLinear(layer, "layer")(x)
    assert torch.equal(got, fresh)


@pytest.mark.usefixtures("int_mm_on_cpu")
def test_an_integer_layer_takes_the_mode_of_the_layer_it_replaces():
    """A converted eval-mode model stays in eval mode (each integer layer was built in training mode)."""
    layer, _ = _linear(WEIGHTS["w8-asym"], ACTIVATIONS["a8"])
    model = nn.Sequential(layer).eval()
    convert_layers(model, lambda module, name: IntMMLinear(module, name) if module is layer else None, "int8-cuda")
    assert isinstance(model[0], IntMMLinear)
    assert not [name for name, module in model.named_modules() if module.training]
