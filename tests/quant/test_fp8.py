"""FP8 activations (``QScheme.format``): the E4M3 grid times a static per-tensor scale, its ranges, its presets, and
that integer schemes serialize exactly as before the field existed."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from tadq.calibration.reconstruction import _quantizer_schemes
from tadq.config import QuantConfig, config_from_dict, config_to_dict
from tadq.quant import PRESETS, QScheme, Quantizer, preset
from tadq.quant.attention import softmax_scheme
from tadq.quant.fake_quant import fp8_fake_quantize
from tadq.quant.quantizer import state_grid
from tadq.quant.ranges import estimate_range

E4M3 = QScheme(bits=8, symmetric=True, format="fp8_e4m3", range_method="minmax")
# the fields QScheme had before ``format``: what an integer scheme's JSON holds, unchanged
FIELDS_BEFORE_FORMAT = ["bits", "symmetric", "granularity", "range_method", "percentile", "mse_p", "mse_grid",
                        "group_size", "smoothing", "rotation", "lowrank_rank"]


def _finite_e4m3() -> torch.Tensor:
    """Every finite E4M3 value, as float32 (the 256 bit patterns read as the format, NaNs dropped)."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    return values[torch.isfinite(values)].unique()


def _quantizer(scheme: QScheme, x: torch.Tensor) -> Quantizer:
    quantizer = Quantizer(scheme)
    quantizer.set_range(*estimate_range(x, scheme))
    return quantizer


def test_representable_values_times_the_scale_are_kept_exactly():
    grid = _finite_e4m3()
    assert grid.max().item() == E4M3.fp8_max == torch.finfo(torch.float8_e4m3fn).max
    scale = torch.tensor(0.37)  # not a power of two: x/s is not exact in float32, the cast still finds the point
    x = grid * scale
    assert torch.equal(fp8_fake_quantize(x, scale, torch.float8_e4m3fn, E4M3.fp8_max), x)


def test_values_are_rounded_to_the_nearest_point_of_the_grid_times_the_scale():
    grid = _finite_e4m3()
    scale = torch.tensor(2.0**-3)  # a power of two: q/s is exact, so membership is exact
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 40 * scale
    codes = fp8_fake_quantize(x, scale, torch.float8_e4m3fn, E4M3.fp8_max) / scale
    assert torch.isin(codes, grid).all()
    nearest = (x[:, None] / scale - grid[None, :]).abs().min(dim=1).values
    assert torch.equal((x / scale - codes).abs(), nearest)  # no other grid point is closer
    assert torch.equal(codes, (x / scale).to(torch.float8_e4m3fn).float())  # torch's own cast, in range


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_out_of_range_values_saturate_at_the_largest_finite_value(fmt):
    scheme = dataclasses.replace(E4M3, format=fmt)
    scale = torch.tensor(0.5)
    top = scheme.fp8_max * scale
    x = torch.tensor([-float("inf"), -1e30, -1.01 * top, 1.01 * top, 1e30, float("inf")])
    out = fp8_fake_quantize(x, scale, scheme.fp8_dtype, scheme.fp8_max)
    assert torch.equal(out, torch.sign(x) * top)
    if fmt == "fp8_e5m2":  # where torch's cast alone does not saturate (it keeps E5M2's infinities)
        assert torch.isinf((x / scale).to(scheme.fp8_dtype).float()).any()


def test_minmax_scale_puts_the_largest_magnitude_on_the_largest_value():
    x = torch.tensor([-3.0, 0.1, 7.0])
    quantizer = _quantizer(E4M3, x)
    assert quantizer.scale.item() == pytest.approx(7.0 / 448, rel=torch.finfo(torch.float32).eps)
    assert quantizer.zero_point.item() == 0
    assert quantizer(x).abs().max().item() == pytest.approx(7.0, rel=torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_mse_and_percentile_ranges_are_no_worse_than_minmax_on_a_heavy_tail(method):
    """Student-t with 1.5 degrees of freedom: a few huge values that min/max spends the range on."""
    x = torch.distributions.StudentT(1.5).sample((20000,))
    scheme = dataclasses.replace(E4M3, range_method=method, percentile=99.9)

    def error(quantizer: Quantizer) -> float:
        return (x - quantizer(x)).abs().pow(scheme.mse_p).mean().item()

    minmax, searched = _quantizer(E4M3, x), _quantizer(scheme, x)
    assert searched.scale.item() < minmax.scale.item()  # the range was shrunk / clipped
    if method == "mse":  # what the search minimises: its result cannot lose to its first candidate (minmax)
        assert error(searched) <= error(minmax)


def test_the_search_is_the_integer_paths_own():
    """The MSE search tries the same shrink factors for both formats: its fp8 result is one of them."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    scheme = dataclasses.replace(E4M3, range_method="mse", mse_grid=5)
    low, high = estimate_range(x, scheme)
    amax = x.abs().max()
    shrinks = {round(1 - 0.01 * i, 6) for i in range(5)}
    assert round((torch.maximum(low.abs(), high.abs()) / amax).item(), 6) in shrinks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_quantized_in_float32_and_keep_their_dtype(dtype):
    x = torch.randn(256, generator=torch.Generator().manual_seed(2)) * 3
    quantizer = _quantizer(E4M3, x)
    half = x.to(dtype)
    out = quantizer(half)
    assert out.dtype == dtype
    assert torch.equal(out, quantizer(half.float()).to(dtype))


def test_gradients_pass_straight_through_the_cast_not_the_clamp():
    quantizer = _quantizer(E4M3, torch.tensor([-1.0, 1.0]))
    x = torch.tensor([0.3, -0.7, 5.0], requires_grad=True)
    quantizer(x).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 0.0]))


def test_scale_gradient_is_lsq_of_the_fp8_grid():
    """d/ds of s·fp8(clamp(x/s, −M, M)) with the cast passed straight through (LSQ, as the integer grid's
    round(x/Δ) − x/Δ): fp8(x/s) − x/s inside the range, ±M where x/s is clipped. The learned activation steps of
    reconstruction follow this gradient; derived here from the E4M3 grid without the function under test."""
    s = 0.01
    values = _finite_e4m3()
    # in range: between two neighbouring grid points (each rounds to the nearer one); clipped: beyond ±M
    inside = torch.tensor([0.30, -1.70, 101.0, -300.0, 440.0])  # none halfway between two points
    x = torch.cat([inside, torch.tensor([500.0, -1000.0])]) * s
    nearest = values[(inside[:, None] - values[None, :]).abs().argmin(1)]
    expected = torch.cat([nearest - inside, torch.tensor([448.0, -448.0])])
    scale = torch.tensor(s, requires_grad=True)
    weights = torch.arange(1.0, 8.0)  # distinct per element, so each term's sign and size count
    (fp8_fake_quantize(x, scale, torch.float8_e4m3fn, 448.0) * weights).sum().backward()
    # float32 x/s of values ≤ 1000 is off by ≤ 1000·2⁻²⁴ each; 7 terms weighted ≤ 7
    assert scale.grad.item() == pytest.approx(float((expected * weights).sum()), abs=7 * 7 * 1000 * 2**-24)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 4, "symmetric": True}, "bits must be 8"),
    ({"bits": None}, "bits must be 8"),
    ({"symmetric": False}, "own sign bit.*symmetric=True"),
    ({"symmetric": True, "granularity": "per_channel"}, "per_tensor.*fp8 weights"),
    ({"symmetric": True, "granularity": "per_token"}, "dynamic fp8"),
])
def test_settings_fp8_cannot_mean_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QScheme(**{"bits": 8, "format": "fp8_e4m3", **kwargs})


def test_an_unknown_format_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="format must be 'int' or one of.*fp8_e4m3"):
        QScheme(format="fp4")


def test_a_torch_without_the_dtype_is_told_which_torch_it_needs(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match=r"torch.float8_e4m3fn.*install torch >= 2\.1"):
        QScheme(bits=8, symmetric=True, format="fp8_e4m3")


def test_an_integer_scheme_operation_on_fp8_says_so():
    with pytest.raises(ValueError, match="no integer grid"):
        _ = E4M3.qmax


def test_fp8_weights_are_refused():
    with pytest.raises(ValueError, match="fp8 weights are not implemented"):
        Quantizer(E4M3, kind="weight")
    with pytest.raises(ValueError, match="fp8_e4m3 are not implemented"):
        QuantConfig(weights=E4M3, activations=E4M3)


def test_layer_bits_of_fp8_activations_must_be_8():
    with pytest.raises(ValueError, match="activation bits 8"):
        QuantConfig.from_preset("W4A8-FP8", layer_bits=(("conv_in", 8, 4),))
    assert QuantConfig.from_preset("W4A8-FP8", layer_bits=(("conv_in", 8, 8),)).layer_bits


def test_the_softmax_output_keeps_its_unsigned_integer_grid():
    scheme = softmax_scheme(preset("W8A8-FP8")[1], 8, "per_tensor")
    assert not scheme.fp8 and (scheme.qmin, scheme.qmax) == (0, 255)


@pytest.mark.parametrize("name", ["W4A8-FP8", "W8A8-FP8"])
def test_presets_and_labels_round_trip(name):
    config = QuantConfig.from_preset(name.lower())
    weights, activations = preset(name)
    assert (config.weights, config.activations) == (weights, activations)
    assert activations.format == "fp8_e4m3" and activations.describe() == "fp8_e4m3-per_tensor-mse"
    assert weights == PRESETS[name.split("-")[0]][0]  # the integer preset's weights
    assert config.label == config.preset_name == name
    assert QuantConfig.from_preset(config.label) == config
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    assert state_grid(activations) == "fp8_e4m3-sym-per_tensor"  # an int8 state is refused by this layer


def test_an_e5m2_label_differs_from_e4m3():
    e5m2 = dataclasses.replace(preset("W4A8-FP8")[1], format="fp8_e5m2")
    config = QuantConfig(weights=preset("W4A8")[0], activations=e5m2)
    assert config.label == "W4A8-FP8E5M2" and e5m2.fp8_max == torch.finfo(torch.float8_e5m2).max


@pytest.mark.parametrize("name", ["W8A8", "W4A8", "W4A4", "W4A16", "W8A16", "W8A8-WSYM"])
def test_integer_configs_serialize_as_before_the_format_field(name):
    """Artefacts, recipes and every cache key hash this JSON: a default-format scheme writes no ``format`` key,
    and a payload without one (every one written before) reads back as the integer format."""
    config = QuantConfig.from_preset(name)
    payload = config_to_dict(config)
    for scheme in (payload["data"]["weights"], payload["data"]["activations"]):
        assert list(scheme["data"]) == FIELDS_BEFORE_FORMAT and scheme["version"] == 1
    assert '"format"' not in json.dumps(payload)
    assert config.label == name
    read = config_from_dict(json.loads(json.dumps(payload)))
    assert read == config and read.activations.format == "int"


def test_a_reconstruction_checkpoint_key_of_an_integer_run_is_unchanged():
    """The checkpoint key held ``dataclasses.asdict`` of each scheme, which would have gained ``format``."""
    network = nn.Module()
    network.q = Quantizer(preset("W4A8")[1])
    assert list(_quantizer_schemes(network)["q"]) == ["kind", *FIELDS_BEFORE_FORMAT]
    network.q = Quantizer(preset("W4A8-FP8")[1])
    assert _quantizer_schemes(network)["q"]["format"] == "fp8_e4m3"


def test_the_kernel_status_of_fp8_activations_is_an_fp8_gemm_tadq_does_not_run():
    from tadq.quant.granularity import kernel_status

    status = kernel_status(preset("W4A8-FP8")[1], kernel_size=(3, 3))
    assert (status.runnable, status.in_tadq) == ("fp8-gemm", False) and "int8 only" in status.note
    assert kernel_status(preset("W4A8")[1]).in_tadq  # the integer grid's status is unchanged
