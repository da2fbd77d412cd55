"""Layer kinds and values the shipped models lack: grouped/depthwise convs, every padding an ``nn.Conv2d`` takes,
degenerate weight and activation ranges, inputs of new shapes, and non-finite ranges.

The int8 layers must agree with their fake-quant twins within the bound derived from the accumulation
(``tests/backends/bounds.py``: (K + 10)·u·(M + |b|) per output element); here it is computed on the input padded the
way ``nn.Conv2d`` pads it, with the conv's groups, so one formula covers every geometry.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.backends.bounds import U, centred_activation, linear_bound, magnitude_weight
from tests.backends.machine import needs_compiled_w8, needs_int8_cpu, needs_int8_w8
from tests.conftest import build_tiny_unet
from torch import nn

from tadq import api
from tadq.backends import to_backend
from tadq.backends.compiled import frozen, prime_grids
from tadq.backends.convert import convert_layers
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d, cpu_int8_layer
from tadq.backends.cuda_int8 import IntMMConv2d, IntMMLinear, IntMMSplitConv2d
from tadq.config import CalibrationConfig, QuantConfig
from tadq.metrics.image import psnr_per_sample
from tadq.quant import QScheme, QuantConv2d, QuantLinear, ranges
from tadq.quant.gptq import matmul_columns
from tadq.quant.qscheme import preset
from tadq.quant.ranges import QUANTILE_MAX, estimate_range, percentile_range
from tadq.quant.split import SplitQuantConv2d
from tadq.sampling import SamplerConfig
from tadq.tfmq.fsc import StepQuantizer, StepState

# torch notes that its own padding="same" with an even kernel copies the input (the fake-quant forward): expected
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths:UserWarning")

PRESETS = ["W8A8", "W8A8-WSYM", "W4A8"]
GEOMETRIES = {
    "groups2": dict(kernel_size=3, padding=1, groups=2),
    "depthwise": dict(kernel_size=3, padding=1, groups=8),
    "depthwise-stride2-nobias": dict(kernel_size=3, padding=1, groups=8, stride=2, bias=False),
    "grouped-1x1": dict(kernel_size=1, groups=4),
    "dilated": dict(kernel_size=3, padding=2, dilation=2),
    "stride2": dict(kernel_size=3, padding=1, stride=2),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular-grouped": dict(kernel_size=3, padding=(1, 2), groups=2, padding_mode="circular"),
    "replicate": dict(kernel_size=3, padding=1, padding_mode="replicate"),
    "same-odd": dict(kernel_size=3, padding="same"),
    "same-even": dict(kernel_size=4, padding="same"),  # one more row/column on the bottom/right
    "same-dilated-nonsquare": dict(kernel_size=(2, 3), padding="same", dilation=(3, 1)),
    "same-reflect": dict(kernel_size=(4, 2), padding="same", padding_mode="reflect"),
    "valid": dict(kernel_size=3, padding="valid"),
    "1x3": dict(kernel_size=(1, 3), padding=(0, 1)),
    "3x1-stride(2,1)": dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
    "no-bias": dict(kernel_size=3, padding=1, bias=False),
    "1x1": dict(kernel_size=1),
}


def _preset_param(name: str):
    """8-bit weight codes need VNNI/AMX here (``needs_int8_w8``); 4-bit ones run on every int8 CPU."""
    return pytest.param(name, marks=needs_int8_w8) if preset(name)[0].bits == 8 else name


def _data(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2 + 0.5  # off-centre: a non-trivial zero point


def _conv_layer(preset_name: str, geometry: dict, calibration: torch.Tensor, seed: int = 0,
                channels: tuple[int, int] = (8, 8), weight=None) -> QuantConv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(*channels, **geometry)
    if weight is not None:
        with torch.no_grad():
            weight(conv.weight)
    weights, activations = preset(preset_name)
    layer = QuantConv2d.from_module(conv, weights, activations)
    # a range narrower than the data (when it has one), so some inputs clamp: the integer path must clamp alike
    layer.input_quantizer.set_range(calibration.min().reshape(1) * 0.8, calibration.max().reshape(1) * 0.8)
    return layer


def _padded(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``nn.Conv2d`` pads it (zeros, reflect, replicate, circular; 'same' even kernels too)."""
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)


def _conv_bound(layer: nn.Conv2d, x: torch.Tensor, quantizer=None, weight_view=None, bias=None, extra: int = 0
                ) -> torch.Tensor:
    """bounds.conv_bound for any padding and groups: K = the weight's per-output reduction (C_in/groups·kh·kw);
    padding first is exact on the codes (they copy values, and padded zeros have code z, a = 0). The input quantizer
    and (weight quantizer, weight) default to the layer's own (a split conv passes each half's, and ``extra`` for
    its one more float add)."""
    if quantizer is None:
        quantizer, weight_view, bias = layer.input_quantizer, (layer.weight_quantizer, layer.weight), layer.bias
    a, scale = centred_activation(_padded(layer, x), quantizer)
    magnitude = magnitude_weight(*weight_view)
    m = F.conv2d(a.abs(), magnitude, None, layer.stride, 0, layer.dilation, layer.groups) * scale
    b = 0.0 if bias is None else bias.double().abs().reshape(1, -1, 1, 1)
    return (weight_view[1][0].numel() + 10 + extra) * U * (m + b)


def _assert_conv_agrees(layer: QuantConv2d, integer: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, got = layer(x).double(), integer(x).double()
    assert got.shape == expected.shape
    excess = (got - expected).abs() - _conv_bound(layer, x)
    assert excess.max() <= 0, f"worst error exceeds the derived bound by {excess.max():.3g}"


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param(name) for name in PRESETS])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_conv_geometries_match_fake_quant(preset_name, geometry):
    """Grouped and depthwise convs (one window-sum channel per group for the W8A8 offset), every padding mode and
    'same'/'valid' padding (the float input padded first where oneDNN's symmetric zero padding cannot): before,
    groups and padding modes were refused and string padding crashed inside oneDNN's prepack."""
    x = _data((2, 8, 9, 9), 1)
    layer = _conv_layer(preset_name, GEOMETRIES[geometry], x)
    integer = OneDNNConv2d(layer, "block.conv")
    _assert_conv_agrees(layer, integer, x)
    _assert_conv_agrees(layer, integer, _data((5, 8, 6, 11), 2))  # a batch and size never seen in calibration


@pytest.mark.usefixtures("int_mm_on_cpu")
@pytest.mark.parametrize("preset_name", PRESETS)
@pytest.mark.parametrize("geometry", [name for name, spec in GEOMETRIES.items() if spec.get("groups", 1) == 1])
def test_int8_cuda_im2col_convs_take_every_padding(preset_name, geometry):
    """int8-cuda's im2col conv (checked on CPU through ``torch._int_mm``): ``padding='same'`` converted and then
    failed in the first forward ("too many values to unpack": the string became the padding tuple), and the
    reflect/replicate/circular modes were refused; the centred codes are now padded as ``nn.Conv2d`` pads."""
    x = _data((2, 8, 9, 9), 1)
    layer = _conv_layer(preset_name, GEOMETRIES[geometry], x)
    _assert_conv_agrees(layer, IntMMConv2d(layer, "block.conv"), x)


def test_int8_cuda_refuses_grouped_convs_by_name():
    """The im2col GEMM has no groups: refused naming the layer and the backends that run it."""
    x = _data((2, 8, 9, 9), 1)
    layer = _conv_layer("W4A8", GEOMETRIES["depthwise"], x)
    with pytest.raises(ValueError, match="block.conv: int8-cuda.*groups=8.*int8-compiled"):
        IntMMConv2d(layer, "block.conv")


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param(name) for name in PRESETS])
@pytest.mark.parametrize("geometry", ["same-even", "reflect", "valid", "3x1-stride(2,1)"])
def test_split_convs_with_unusual_padding(preset_name, geometry):
    """A shortcut-split conv pads each half's float input the way the whole conv pads (reflect copies within a
    channel, so per half is the same), each on its own grid."""
    weights, activations = preset(preset_name)
    torch.manual_seed(0)
    layer = SplitQuantConv2d.from_module(nn.Conv2d(12, 6, **GEOMETRIES[geometry]), 5, weights, activations)
    x = torch.cat([_data((2, 5, 8, 7), 13), _data((2, 7, 8, 7), 14) * 0.1], dim=1)
    layer.input_quantizer_deep.set_range(x[:, :5].min().reshape(1) * 0.8, x[:, :5].max().reshape(1) * 0.8)
    layer.input_quantizer_skip.set_range(x[:, 5:].min().reshape(1) * 0.8, x[:, 5:].max().reshape(1) * 0.8)
    with torch.no_grad():
        expected, got = layer(x).double(), OneDNNSplitConv2d(layer, "up.conv")(x).double()
    views = layer.quantized_weights()
    bound = (_conv_bound(layer, x[:, :5], layer.input_quantizer_deep, views["weight_deep"], layer.bias, extra=1)
             + _conv_bound(layer, x[:, 5:], layer.input_quantizer_skip, views["weight_skip"], None, extra=1))
    assert got.shape == expected.shape and ((got - expected).abs() <= bound).all()


@needs_int8_w8
def test_per_step_ranges_on_a_grouped_circular_conv():
    """TFMQ per-step grids run through qconv_pointwise.tensor with the conv's groups and the pre-padding."""
    x = _data((2, 8, 6, 6), 15)
    layer = _conv_layer("W8A8", GEOMETRIES["circular-grouped"], x)
    state = StepState(2)
    layer.input_quantizer = StepQuantizer(layer.input_quantizer, torch.tensor([0.01, 0.05]),
                                          torch.tensor([40.0, 128.0]), state)
    integer = OneDNNConv2d(layer, "conv")
    for step in range(2):
        with state.at(step):
            _assert_conv_agrees(layer, integer, x)


@needs_int8_cpu
def test_an_unbatched_conv_input_runs_as_nn_conv2d_runs_it():
    x = _data((1, 8, 7, 7), 3)
    layer = _conv_layer("W4A8", GEOMETRIES["depthwise"], x)
    integer = OneDNNConv2d(layer, "conv")
    with torch.no_grad():
        assert torch.equal(integer(x[0]), integer(x)[0])
        assert integer(x[0]).shape == layer(x[0]).shape == (8, 7, 7)


@pytest.mark.usefixtures("int_mm_on_cpu")
@pytest.mark.parametrize("integer_class", [pytest.param(OneDNNSplitConv2d, marks=needs_int8_cpu), IntMMSplitConv2d])
def test_an_unbatched_input_of_a_split_conv_runs_as_nn_conv2d_runs_it(integer_class):
    """The split integer convs cut an unbatched (C, H, W) input at H instead of the channels (and then refused
    the slice as a wrong shape); they now run it as a batch of one, as the fake-quant split conv does."""
    x = _data((1, 12, 7, 7), 3)
    weights, activations = preset("W4A8")
    layer = SplitQuantConv2d.from_module(nn.Conv2d(12, 8, 3, padding=1), 8, weights, activations)
    for quantizer, half in ((layer.input_quantizer_deep, x[:, :8]), (layer.input_quantizer_skip, x[:, 8:])):
        quantizer.set_range(half.min().reshape(1), half.max().reshape(1))
    integer = integer_class(layer, "up.conv")
    with torch.no_grad():
        assert torch.equal(integer(x[0]), integer(x)[0])


def _w4a8_linear_of_width_16() -> QuantLinear:
    """A W4A8 linear taking 16 features, its input range set to [-1, 1] (the width refusals' layer)."""
    weights, activations = preset("W4A8")
    linear = QuantLinear.from_module(nn.Linear(16, 4), weights, activations)
    linear.input_quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    return linear


@needs_int8_cpu
def test_inputs_of_the_wrong_width_are_refused_by_name():
    """A channel mismatch failed inside oneDNN ("could not create a primitive descriptor"), a feature mismatch in a
    reshape; both now name the layer and the shape it takes."""
    x = _data((1, 8, 5, 5), 4)
    conv = OneDNNConv2d(_conv_layer("W4A8", GEOMETRIES["groups2"], x), "down.conv")
    with pytest.raises(ValueError, match=r"^down\.conv: expects a \(batch, 8, height, width\) input, got .*6, 5, 5"):
        conv(x[:, :6])
    linear = _w4a8_linear_of_width_16()
    integer = OneDNNLinear(linear, "attn.to_q")
    with pytest.raises(ValueError, match=r"^attn\.to_q: expects inputs of 16 features.*\(2, 32\)"):
        integer(torch.randn(2, 32))


@pytest.mark.usefixtures("int_mm_on_cpu")
def test_int8_cuda_layers_take_and_refuse_inputs_as_the_int8_layers_do():
    """int8-cuda's layers (on CPU through ``torch._int_mm``): an unbatched conv input failed to unpack its shape, a
    wrong width failed inside the GEMM without the layer's name, and a bf16 or float64 input, which the fake-quant
    layer refuses, ran silently on codes computed in that dtype; they now behave as the int8 layers."""
    x = _data((1, 8, 7, 7), 3)
    conv = IntMMConv2d(_conv_layer("W4A8", GEOMETRIES["stride2"], x), "down.conv")
    with torch.no_grad():
        assert torch.equal(conv(x[0]), conv(x)[0])
    with pytest.raises(ValueError, match=r"^down\.conv: expects a \(batch, 8, height, width\) input, got .*6, 7, 7"):
        conv(x[:, :6])
    linear = _w4a8_linear_of_width_16()
    integer = IntMMLinear(linear, "attn.to_q")
    with pytest.raises(ValueError, match=r"^attn\.to_q: expects inputs of 16 features.*\(2, 32\)"):
        integer(torch.randn(2, 32))
    for dtype in (torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=rf"^down\.conv: integer layers take float32 inputs.*{dtype}"):
            conv(x.to(dtype))
        with pytest.raises(TypeError, match=rf"^attn\.to_q: integer layers take float32 inputs.*{dtype}"):
            integer(torch.randn(2, 16, dtype=dtype))


def _zero_and_constant_channels(weight: torch.Tensor) -> None:
    weight[0] = 0.0  # all-zero output channel: zero range
    weight[1] = 0.3  # all equal: the range is widened to [0, 0.3]
    weight[2] = -0.2


WEIGHT_VALUES = {
    "zero-and-constant-channels": _zero_and_constant_channels,
    "large-1e4": lambda w: w.mul_(1e4),
    "denormal": lambda w: w.mul_(1e-39),
    "tiny-1e-7": lambda w: w.mul_(1e-7),
}


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param(name) for name in PRESETS])
@pytest.mark.parametrize("values", list(WEIGHT_VALUES))
def test_degenerate_weight_ranges(preset_name, values):
    """Zero, constant, huge and denormal weights: finite positive steps (never a division by zero), and the
    integer conv agrees with the fake-quant one."""
    x = _data((2, 8, 9, 9), 5)
    layer = _conv_layer(preset_name, GEOMETRIES["same-odd"], x, weight=WEIGHT_VALUES[values])
    scale = layer.weight_quantizer.scale
    assert torch.isfinite(scale).all() and (scale > 0).all()
    _assert_conv_agrees(layer, OneDNNConv2d(layer, "conv"), x)


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param(name) for name in PRESETS])
@pytest.mark.parametrize("calibration", ["zeros", "constant", "negative-constant"])
def test_degenerate_activation_ranges(preset_name, calibration):
    """Calibration data with no spread (all zero, one constant): the range, widened to include 0, gives a finite
    positive Δ; inputs outside it at inference clamp alike in both paths."""
    value = {"zeros": 0.0, "constant": 2.0, "negative-constant": -0.5}[calibration]
    seen = torch.full((2, 8, 9, 9), value)
    torch.manual_seed(0)
    weights, activations = preset(preset_name)
    layer = QuantConv2d.from_module(nn.Conv2d(8, 4, 3, padding=1, groups=2), weights, activations)
    layer.input_quantizer.set_range(*estimate_range(seen, layer.input_quantizer.scheme))  # calibration's estimator
    scale = layer.input_quantizer.scale
    assert torch.isfinite(scale).all() and (scale > 0).all()
    _assert_conv_agrees(layer, OneDNNConv2d(layer, "conv"), _data((3, 8, 5, 5), 6))


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param(name) for name in PRESETS])
def test_linear_without_bias_on_new_shapes(preset_name):
    weights, activations = preset(preset_name)
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(16, 8, bias=False), weights, activations)
    seen = _data((3, 5, 16), 7)
    layer.input_quantizer.set_range(seen.min().reshape(1) * 0.8, seen.max().reshape(1) * 0.8)
    integer = OneDNNLinear(layer, "proj")
    for x in (seen, _data((16,), 8), _data((2, 3, 4, 16), 9), _data((0, 16), 10)):
        with torch.no_grad():
            expected, got = layer(x).double(), integer(x).double()
        assert got.shape == expected.shape
        bound = linear_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, None)
        assert ((got - expected).abs() <= bound).all()


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_non_finite_weights_are_refused_when_the_range_is_set(bad):
    """An inf weight gave Δ = inf (every fake-quant weight of its channel 0 or NaN), a NaN one Δ = NaN; both were
    stored silently and failed later far away (torch's zero_point check, the int8 grid check)."""
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[2, 1, 0, 0] = float(bad)
    weights, activations = preset("W8A8")
    with pytest.raises(ValueError, match=r"^weight range .* of channel 2 of 4 has no finite 8-bit step"):
        QuantConv2d.from_module(conv, weights, activations)


def test_an_overflowing_activation_range_is_refused():
    """Finite ends whose span overflows float32 (high − low = inf) give no finite step either."""
    weights, activations = preset("W8A8")
    layer = QuantLinear.from_module(nn.Linear(4, 4), weights, activations)
    with pytest.raises(ValueError, match=r"^activation range \[-3e\+38, 3e\+38\] of the tensor has no finite"):
        layer.input_quantizer.set_range(torch.tensor([-3e38]), torch.tensor([3e38]))
    assert not bool(layer.input_quantizer.initialized)


def test_a_refused_layer_leaves_the_model_unconverted():
    """``to_backend(..., inplace=True)`` converts layer by layer; a refusal at the second layer left the first one
    already swapped for its int8 kernel, so the "fake-quant" model the caller kept was half integer."""
    weights, activations = preset("W4A8")
    first = QuantConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1), weights, activations)
    first.input_quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
    weight_only = QuantConv2d.from_module(nn.Conv2d(4, 4, 3, padding=1), weights, QScheme.off())
    model = nn.Sequential(first, weight_only)
    with pytest.raises(ValueError, match=r"^1: its input is not quantized"):
        convert_layers(model, cpu_int8_layer, "int8")
    assert model[0] is first and model[1] is weight_only


@pytest.mark.parametrize("geometry", ["same-even", "same-dilated-nonsquare", "valid", "same-reflect"])
def test_gptq_columns_follow_string_padding(geometry):
    """GPTQ's im2col columns times the weight give the conv's output for 'same'/'valid' padding (was refused).

    In float64 both sides sum the same exact products in another order: each is within γ_K·Σ|terms| of the exact
    sum (Higham §3.1), so they differ by at most 2·γ_K·Σ|terms|."""
    conv = nn.Conv2d(3, 5, bias=False, **GEOMETRIES[geometry]).double()
    x = _data((2, 3, 7, 6), 11).double()
    columns = matmul_columns(conv, x)
    weight = conv.weight.detach().flatten(1)
    with torch.no_grad():
        expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    got = columns @ weight.T
    k, unit = weight.shape[1], 2.0**-53
    bound = 2 * k * unit / (1 - k * unit) * (columns.abs() @ weight.abs().T)
    assert got.shape == expected.shape and ((got - expected).abs() <= bound).all()


class _Parallel(nn.Module):
    """Two integer convs on one input, so one compiled graph holds both and each output has its own bound."""

    def __init__(self, *convs: nn.Module) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(conv(x) for conv in self.convs)


@needs_compiled_w8
def test_compiled_grouped_and_padded_convs_match_fake_quant():
    """int8-compiled traces the same kernels: the float input's pre-padding and the per-group window sums of the
    W8A8 offset compile, and agree with the fake-quant layers within the derived bound."""
    x = _data((2, 8, 9, 9), 12)
    layers = [_conv_layer("W8A8", GEOMETRIES[name], x, seed=index)
              for index, name in enumerate(("circular-grouped", "same-reflect"))]
    model = _Parallel(*(OneDNNConv2d(layer, f"conv{index}") for index, layer in enumerate(layers))).eval()
    prime_grids(model)
    with torch.no_grad(), frozen():
        outputs = torch.compile(model)(x)
    for layer, got in zip(layers, outputs, strict=True):
        with torch.no_grad():
            expected = layer(x).double()
        assert ((got.double() - expected).abs() <= _conv_bound(layer, x)).all()


SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


def _unusual_unet() -> nn.Module:
    """diffusers' tiny UNet with its convs swapped for unusual ones of the same shapes."""
    unet = build_tiny_unet()
    torch.manual_seed(1)
    unet.conv_in = nn.Conv2d(1, 4, (4, 2), padding="same", padding_mode="reflect")
    unet.down_blocks[0].resnets[0].conv1 = nn.Conv2d(4, 4, 3, padding=1, groups=2, padding_mode="circular")
    unet.down_blocks[1].resnets[0].conv2 = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
    return unet.eval()


UNUSUAL = ("conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.1.resnets.0.conv2")


@needs_int8_cpu
@pytest.mark.parametrize("preset_name", [_preset_param("W8A8"), "W4A8"])
def test_a_unet_with_unusual_convs_runs_them_in_integers(ddpm_scheduler, preset_name):
    """End to end: every unusual conv is converted (reported as an integer layer) and the integer samples agree
    with the fake-quant ones (median PSNR ≥ 40 dB, as tests/backends/test_model.py measures agreement)."""
    fake = api.quantize(_unusual_unet(), ddpm_scheduler, QuantConfig.from_preset(preset_name, calibration=CALIB),
                        progress=False)
    integer = to_backend(fake, "int8")
    assert set(UNUSUAL) <= set(integer.layers["integer"])

    def images(model):
        return api.sample(model, ddpm_scheduler, SAMPLER, num_samples=6, seed=5, progress=False).images

    assert psnr_per_sample(images(integer), images(fake)).median() >= 40.0


def test_percentile_ranges_of_more_than_2_24_values():
    """A long calibration keeps 16384 activation samples per forward; past 2^24 of them torch.quantile raised
    "input tensor is too large" when the range was finally estimated. Values 0..n−1 (reversed, so sorting does
    work): the p-th percentile is r = p/100·(n − 1), up to q's float32 rounding (u·r) and the result's (u·r)."""
    n = QUANTILE_MAX + 1
    low, high = percentile_range(torch.arange(n, dtype=torch.float32).flip(0), 99.0)
    for got, rank in ((low, 0.01 * (n - 1)), (high, 0.99 * (n - 1))):
        assert abs(float(got) - rank) <= 2 * U * rank


def test_long_percentile_rows_interpolate_as_torch_quantile(monkeypatch):
    """The long-row path (forced here by a low threshold) interpolates as torch.quantile does: exact ranks give
    the exact order statistics, and a row with a NaN gives NaN (which ``set_range`` then refuses)."""
    monkeypatch.setattr(ranges, "QUANTILE_MAX", 100)
    values = torch.randperm(1001, generator=torch.Generator().manual_seed(0)).float().reshape(1, -1) - 500
    q = torch.tensor([0.25, 0.5, 0.75])  # ranks 250, 500, 750: exact
    assert torch.equal(ranges._quantiles(values, q), torch.tensor([[-250.0], [0.0], [250.0]]))
    values[0, 3] = float("nan")
    assert ranges._quantiles(torch.cat([values, values.nan_to_num()]), q)[:, 0].isnan().all()
