"""A transformer feed-forward's GELU inside its int8 linear (``OneDNNGELU``): same function as fake-quant's
``proj`` then ``F.gelu``, within the derived bound of ``bounds.gelu_bound``, eager and compiled, for weights with
and without the asymmetric offset (post-op inside the kernel vs GELU after the offset correction), and converted
only where the fusion cannot change what a model or its hooks see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.activations import GELU
from diffusers.models.attention import FeedForward
from tests.backends.bounds import GELU_FORMS, gelu_bound, linear_bound
from tests.backends.machine import needs_compiled, needs_compiled_w8, needs_int8_cpu, needs_int8_w8
from tests.backends.test_compiled import _compiled
from tests.backends.test_layers import ACTIVATIONS, WEIGHTS, _data, _set_input_range
from torch import nn

from tadq.backends.convert import convert_layers
from tadq.backends.cpu_int8 import OneDNNGELU, OneDNNLinear, cpu_int8_layer, gelu_tanh_by_exp
from tadq.quant import QuantLinear

pytestmark = needs_int8_cpu


def _quantized_gelu(weights: str, approximate: str, module: type[GELU] = GELU) -> tuple[GELU, torch.Tensor]:
    """A diffusers GELU (40 → 24) whose ``proj`` is fake-quant, with an input range some inputs clamp at."""
    torch.manual_seed(0)
    gelu = module(40, 24, approximate=approximate)
    gelu.proj = QuantLinear.from_module(gelu.proj, WEIGHTS[weights], ACTIVATIONS["a8"])
    x = _data((2, 7, 40), 4) * 3  # outputs spread over GELU's curved part and both tails
    _set_input_range(gelu.proj.input_quantizer, x)
    return gelu.eval(), x


def _check(gelu: GELU, x: torch.Tensor, got: torch.Tensor) -> None:
    proj = gelu.proj
    with torch.no_grad():
        linear = proj(x).double()
    expected = F.gelu(linear, approximate=gelu.approximate)
    bound = gelu_bound(linear, linear_bound(x, proj.input_quantizer, proj.weight_quantizer, proj.weight, proj.bias))
    excess = (got.double() - expected).abs() - bound
    assert got.shape == expected.shape
    assert excess.max() <= 0, f"worst error exceeds the derived bound by {excess.max():.3g}"


def _weights(names: list[str]) -> list:
    return [pytest.param(name, marks=needs_int8_w8) if name.startswith("w8") else name for name in names]


def test_the_exp_form_is_torchs_tanh_gelu():
    """Over a dense sweep and both tails (no overflow to NaN: e^w → ∞ gives −0, as torch's gives)."""
    y = torch.cat([torch.linspace(-40, 40, 400_001), torch.tensor([-1e30, -88.0, 0.0, 88.0, 1e30])])
    expected = F.gelu(y, approximate="tanh")
    got = gelu_tanh_by_exp(y)
    assert torch.isfinite(got).all()
    assert ((got.double() - expected.double()).abs() <= GELU_FORMS * y.double().abs()).all()


def _onednn_gelu(y: torch.Tensor, approximate: str) -> torch.Tensor:
    """oneDNN's GELU post-op on the values ``y`` themselves: a linear of one zero weight per output, so its float32
    output before the post-op is exactly the bias, ``y``."""
    n = y.numel()
    packed = torch.ops.onednn.qlinear_prepack(torch.zeros(n, 1, dtype=torch.int8), None)
    return torch.ops.onednn.qlinear_pointwise.default(
        torch.zeros(1, 1, dtype=torch.uint8), 1.0, 0, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64), y,
        1.0, 0, torch.float32, "gelu", [], approximate)[0]


@pytest.mark.parametrize("form", ["onednn-none", "onednn-tanh", "torch-none", "torch-tanh", "exp-tanh"])
def test_every_gelu_form_is_within_the_bounds_error(form):
    """The premise of ``gelu_bound``: each GELU an integer layer applies is within ``GELU_FORMS``·|y| of the exact
    GELU, the tests' reference. The erf forms come closest (6.4u at y ≈ ±2.98, bounds.py), hence the dense sweep
    around there."""
    where, approximate = form.split("-")
    y = torch.cat([torch.linspace(-8, 8, 400_001), torch.linspace(2.9, 3.1, 200_001),
                   torch.linspace(-3.1, -2.9, 200_001)])
    apply = {"onednn": _onednn_gelu, "torch": lambda v, a: F.gelu(v, approximate=a),
             "exp": lambda v, _: gelu_tanh_by_exp(v)}[where]
    got = apply(y, approximate).double()
    expected = F.gelu(y.double(), approximate=approximate)
    assert ((got - expected).abs() <= GELU_FORMS * y.double().abs()).all()


@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("weights", _weights(["w8-asym", "w8-sym", "w4-asym"]))
def test_a_fused_gelu_matches_fake_quant_then_gelu(weights, approximate):
    """Symmetric codes take oneDNN's post-op; asymmetric 8-bit adds the offset first, then torch's GELU."""
    gelu, x = _quantized_gelu(weights, approximate)
    integer = OneDNNGELU(gelu, "ff.net.0")
    assert integer.proj.post_op == (("none", "") if weights == "w8-asym" else ("gelu", approximate))
    with torch.no_grad():
        got = integer(x)
    _check(gelu, x, got)


@needs_compiled
@pytest.mark.parametrize("weights", [pytest.param("w8-asym", marks=needs_compiled_w8),
                                     pytest.param("w8-sym", marks=needs_compiled_w8), "w4-asym"])
def test_a_compiled_fused_gelu_matches_fake_quant_then_gelu(weights):
    """Compiled: the post-op inside the oneDNN extern kernel, or (offset) the exp form fused by Inductor."""
    gelu, x = _quantized_gelu(weights, "tanh")
    _check(gelu, x, _compiled(OneDNNGELU(gelu, "ff.net.0"))(x))


def _feed_forward(weights: str = "w4-asym") -> FeedForward:
    torch.manual_seed(0)
    ff = FeedForward(40, mult=2, activation_fn="gelu-approximate").eval()
    x = _data((2, 5, 40), 3)
    for path in ("net.0.proj", "net.2"):
        parent, _, child = path.rpartition(".")
        layer = QuantLinear.from_module(ff.get_submodule(path), WEIGHTS[weights], ACTIVATIONS["a8"])
        setattr(ff.get_submodule(parent), child, layer)
    with torch.no_grad():  # each layer's input range from what it sees
        hidden = ff.net[0].proj.input_quantizer, ff.net[2].input_quantizer
        _set_input_range(hidden[0], x)
        _set_input_range(hidden[1], F.gelu(ff.net[0].proj(x), approximate="tanh"))
    return ff


def test_a_feed_forward_converts_its_gelu_whole_and_records_each_layer():
    ff = _feed_forward()
    x = _data((2, 5, 40), 3)
    calls = []
    ff.net[0].register_forward_hook(lambda module, args, output: calls.append(output))
    with torch.no_grad():
        expected = ff(x)
    record = convert_layers(ff, cpu_int8_layer, "int8")
    assert isinstance(ff.net[0], OneDNNGELU) and ff.net[0].proj.gelu == "tanh"
    assert record["integer"] == {"net.0.proj": "OneDNNLinear", "net.2": "OneDNNLinear"}
    with torch.no_grad():
        got = ff(x)
    assert len(calls) == 2 and torch.equal(calls[1], ff.net[0](x))  # the GELU module's own hook is kept
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 0.05 * scale  # end to end; per layer: the tests above


def test_a_hooked_proj_or_a_gelu_subclass_is_not_fused():
    """A hook on ``proj`` would see GELU'd outputs, a subclass may compute something else: both convert per layer."""

    class SquaredGELU(GELU):
        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) ** 2

    hooked = _feed_forward()
    seen = []
    hooked.net[0].proj.register_forward_hook(lambda module, args, output: seen.append(output))
    other, _ = _quantized_gelu("w4-asym", "tanh", SquaredGELU)
    model = nn.ModuleDict({"hooked": hooked, "other": nn.Sequential(other)})
    x = _data((2, 5, 40), 3)
    with torch.no_grad():
        linear = hooked.net[0].proj(x)
    record = convert_layers(model, cpu_int8_layer, "int8")
    assert type(hooked.net[0]) is GELU and type(model["other"][0]) is SquaredGELU
    assert isinstance(hooked.net[0].proj, OneDNNLinear) and hooked.net[0].proj.gelu is None
    assert set(record["integer"]) == {"hooked.net.0.proj", "hooked.net.2", "other.0.proj"}
    with torch.no_grad():
        hooked(x)
    assert torch.allclose(seen[-1], linear, rtol=0, atol=0.05 * float(linear.abs().max()))  # the linear, no GELU
