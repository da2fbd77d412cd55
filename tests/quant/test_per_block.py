"""Block-wise weights (``per_block``): one (Δ, z) per block of consecutive weights of each output row."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tadq.calibration.reconstruction import _column_quantizer, _column_quantizers
from tadq.config import QuantConfig
from tadq.quant import QScheme, Quantizer
from tadq.quant.fake_quant import fake_quantize, grid_step
from tadq.quant.modules import QuantConv2d, QuantLinear
from tadq.quant.qscheme import preset, preset_key
from tadq.quant.quantizer import state_grid
from tadq.quant.ranges import estimate_range


def _blocked(bits=4, size=5, method="minmax", symmetric=False) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, granularity="per_block", group_size=size, range_method=method)


def _calibrated(weight: torch.Tensor, scheme: QScheme) -> Quantizer:
    quantizer = Quantizer(scheme, num_channels=weight.shape[0], kind="weight", row_size=weight[0].numel())
    quantizer.set_range(*estimate_range(weight, scheme))
    return quantizer


def _reference(weight: torch.Tensor, scheme: QScheme) -> torch.Tensor:
    """Each block of each row quantized alone, as a one-tensor quantizer with that block's own range would."""
    rows = weight.reshape(weight.shape[0], -1)
    out = torch.empty_like(rows)
    tensor_scheme = dataclasses.replace(scheme, granularity="per_tensor")
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], scheme.group_size):
            block = rows[r, start:start + scheme.group_size]
            scale, zero_point = grid_step(*estimate_range(block, tensor_scheme), tensor_scheme)
            out[r, start:start + scheme.group_size] = fake_quantize(block, scale, zero_point, scheme.qmin,
                                                                    scheme.qmax)
    return out.reshape(weight.shape)


@pytest.mark.parametrize("shape, size", [((6, 5, 3, 3), 3), ((6, 5, 3, 3), 7), ((4, 100), 32), ((4, 96), 32)])
@pytest.mark.parametrize("method", ["minmax", "mse", "percentile"])
def test_each_block_is_quantized_on_its_own_range(shape, size, method):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    scheme = _blocked(size=size, method=method)
    quantizer = _calibrated(weight, scheme)
    blocks = -(-weight[0].numel() // size)
    assert quantizer.scale.shape == (shape[0], blocks)
    expected = _reference(weight, scheme)
    assert torch.equal(quantizer(weight), expected)  # the fused kernel
    with torch.enable_grad():
        composed = quantizer(weight.clone().requires_grad_(True))  # the composed ops a gradient needs
    assert torch.equal(composed.detach(), expected)


def test_a_block_of_a_whole_row_is_the_per_channel_grid():
    weight = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    channel = QScheme(bits=4, granularity="per_channel")
    blocked = _calibrated(weight, _blocked(size=36, method="mse"))
    per_channel = Quantizer(channel, num_channels=8, kind="weight")
    per_channel.set_range(*estimate_range(weight, channel))
    assert torch.equal(blocked.scale.reshape(-1), per_channel.scale)
    assert torch.equal(blocked(weight), per_channel(weight))


def test_finer_blocks_reach_a_smaller_error_than_one_step_per_channel():
    weight = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(2))
    channel = QScheme(bits=4, granularity="per_channel")
    per_channel = Quantizer(channel, num_channels=16, kind="weight")
    per_channel.set_range(*estimate_range(weight, channel))
    baseline = (per_channel(weight) - weight).pow(2).mean()
    blocked = _calibrated(weight, _blocked(size=9, method="mse"))
    assert (blocked(weight) - weight).pow(2).mean() < baseline


def test_learned_rounding_receives_the_block_steps_broadcast_to_the_weight():
    weight = torch.randn(3, 10)
    quantizer = _calibrated(weight, _blocked(size=4))
    expanded = quantizer._broadcast(quantizer.scale, weight)
    assert expanded.shape == weight.shape
    assert torch.equal(expanded[:, 0:4], quantizer.scale[:, :1].expand(3, 4))
    assert torch.equal(expanded[:, 8:10], quantizer.scale[:, 2:3].expand(3, 2))  # the shorter last block


def test_a_tensor_of_another_shape_is_refused():
    quantizer = _calibrated(torch.randn(3, 10), _blocked(size=4))
    with pytest.raises(ValueError, match="3 rows × 10 weights cannot quantize a tensor of shape"):
        quantizer(torch.randn(3, 12))


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "activation", "row_size": 8}, "per_block is a weight granularity"),
    ({"kind": "weight"}, "needs row_size"),
    ({"kind": "weight", "row_size": 0}, "needs row_size"),
])
def test_quantizers_per_block_needs_a_weight_and_its_row_size(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Quantizer(_blocked(), num_channels=4, **kwargs)


def test_layers_size_their_blocks_from_their_own_rows():
    conv = QuantConv2d.from_module(torch.nn.Conv2d(5, 4, 3), _blocked(size=4), QScheme(bits=8))
    linear = QuantLinear.from_module(torch.nn.Linear(10, 3), _blocked(size=4), QScheme(bits=8))
    assert conv.weight_quantizer.scale.shape == (4, 12)  # 45 weights per row: 11 blocks of 4 and one of 1
    assert linear.weight_quantizer.scale.shape == (3, 3)


def test_gptq_rounds_each_column_on_its_blocks_step():
    layer = QuantLinear.from_module(torch.nn.Linear(10, 3), _blocked(size=4), QScheme(bits=8))
    quantizer = layer.weight_quantizer
    quantize_column = _column_quantizer(_column_quantizers(layer))
    weight = layer.weight.detach()
    for index in range(10):
        block = index // 4
        step, zero_point = quantizer.scale[:, block], quantizer.zero_point[:, block]
        expected = fake_quantize(weight[:, index], step, zero_point, quantizer.scheme.qmin, quantizer.scheme.qmax)
        assert torch.equal(quantize_column(weight[:, index], index), expected), index


@pytest.mark.parametrize("name, size, base", [("W4A8-G128", 128, "W4A8"), ("w4a8-fp8-g3", 3, "W4A8-FP8"),
                                              ("W8A8-WSYM-G64", 64, "W8A8-WSYM"), ("W4A16-G32", 32, "W4A16")])
def test_a_block_suffix_makes_the_presets_weights_block_wise(name, size, base):
    weights, activations = preset(name)
    base_weights, base_activations = preset(base)
    assert weights == dataclasses.replace(base_weights, granularity="per_block", group_size=size)
    assert activations == base_activations
    config = QuantConfig.from_preset(name)
    assert config.preset_name == config.label == preset_key(name) == name.upper()


@pytest.mark.parametrize("name", ["W4A8-G0", "W4A8-G", "W4A8-G01", "W9A8-G4", "W4A8-G1234567", "W32A32-G4"])
def test_malformed_block_suffixes_are_refused(name):
    with pytest.raises(ValueError, match="unknown preset|quantizes no weights"):
        preset_key(name)


def test_block_wise_activations_are_refused_by_the_config():
    with pytest.raises(ValueError, match="a weight granularity"):
        QuantConfig(weights=preset("W4A8")[0], activations=QScheme(bits=8, granularity="per_block"))


def test_the_grid_a_state_is_valid_for_names_the_block_size():
    assert state_grid(_blocked(size=16)) == "int4-asym-per_block-16"
    assert state_grid(_blocked(size=16)) != state_grid(_blocked(size=32))


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


def test_a_block_longer_than_the_row_costs_the_row_not_the_block_size():
    """One block per row when n exceeds the row (W4A8-G4096 on a row of 10): the fused kernel padded every row to
    n and the step broadcast (learned rounding, saving) repeated each step n times, so a forward built tensors
    n / row times the weight (a 320-wide linear at -G999999: 18 s and 5 GB per forward, 2.5 ms at -G64). Every
    path now works on the weight's own size, with the same values as a block of exactly one row."""
    weight = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    long, whole = _calibrated(weight, _blocked(size=4096)), _calibrated(weight, _blocked(size=10))
    assert torch.equal(long.scale, whole.scale)
    paths = {
        "fused kernel": lambda q: q(weight),
        "composed ops (a gradient)": lambda q: q(weight.clone().requires_grad_(True)).detach(),
        "step broadcast": lambda q: q._broadcast(q.scale, weight),
    }
    for name, run in paths.items():
        with torch.enable_grad(), _LargestTensor() as largest:
            result = run(long)
        assert largest.numel <= 2 * weight.numel(), name  # a shorter last block pads a row by less than itself
        assert torch.equal(result, run(whole)), name


def test_a_block_without_a_finite_step_is_named_by_its_row_and_weights():
    """A block whose span passes float32 was reported as "channel 8 of 9" (its index among rows × blocks) in a layer
    of 3 output channels: the refusal names the output row and the weights of its block."""
    weight = torch.randn(3, 10, generator=torch.Generator().manual_seed(4))
    weight[2, 8], weight[2, 9] = 3e38, -3e38
    quantizer = Quantizer(_blocked(size=4), num_channels=3, kind="weight", row_size=10)
    with pytest.raises(ValueError, match=r"^weight range \[-3e\+38, 3e\+38\] of the block of weights 8\.\.9 of output "
                                         r"row 2 of 3 has no finite 4-bit step"):
        quantizer.set_range(*estimate_range(weight, _blocked(size=4)))
