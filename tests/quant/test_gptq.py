"""GPTQ rounding: what the column-by-column compensation must and must not do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.dtype_probe import DtypeRecorder

from tadq.quant.gptq import HessianAccumulator, gptq_round, matmul_columns


def _per_row_grid(weight: torch.Tensor, bits: int = 4):
    """A symmetric per-row grid over ``weight.flatten(1)`` and the column quantizer using it."""
    rows = weight.flatten(1)
    scale = rows.abs().amax(1) / (2 ** (bits - 1) - 1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def quantize_column(column: torch.Tensor, index: int) -> torch.Tensor:
        del index
        return torch.clamp(torch.round(column / scale), qmin, qmax) * scale

    def nearest(w: torch.Tensor) -> torch.Tensor:
        flat = w.flatten(1)
        return (torch.clamp(torch.round(flat / scale[:, None]), qmin, qmax) * scale[:, None]).reshape(w.shape)

    return scale, quantize_column, nearest


def test_uncorrelated_inputs_give_nearest_rounding():
    """With a diagonal Hessian no column's error can be compensated by another: GPTQ is nearest rounding."""
    torch.manual_seed(0)
    weight = torch.randn(16, 24)
    _, quantize_column, nearest = _per_row_grid(weight)
    hessian = torch.diag(torch.rand(24) + 0.5)
    for act_order in (False, True):
        assert torch.equal(gptq_round(weight, hessian, quantize_column, act_order=act_order), nearest(weight))


def test_result_lies_on_the_grid_and_beats_nearest_on_correlated_inputs():
    torch.manual_seed(1)
    weight = torch.randn(32, 48)
    mixing = torch.randn(48, 48) / 48 ** 0.5 + torch.eye(48)
    inputs = torch.randn(4096, 48) @ mixing  # correlated inputs: the case compensation exists for
    accumulator = HessianAccumulator(48)
    accumulator.add(inputs)
    scale, quantize_column, nearest = _per_row_grid(weight)
    for act_order in (False, True):
        rounded = gptq_round(weight, accumulator.hessian(), quantize_column, act_order=act_order)
        codes = rounded / scale[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8  # on the 4-bit grid
        error = ((weight - rounded) @ inputs.T).pow(2).mean()
        baseline = ((weight - nearest(weight)) @ inputs.T).pow(2).mean()
        assert error < 0.8 * baseline, (act_order, float(error), float(baseline))


def test_block_size_does_not_change_the_result():
    torch.manual_seed(2)
    weight = torch.randn(8, 40)
    inputs = torch.randn(512, 40) @ (torch.randn(40, 40) / 7 + torch.eye(40))
    hessian = inputs.T @ inputs / 512
    _, quantize_column, _ = _per_row_grid(weight)
    small = gptq_round(weight, hessian, quantize_column, block_size=7)
    large = gptq_round(weight, hessian, quantize_column, block_size=128)
    assert torch.equal(small, large)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_columns_reproduce_the_convolution(padding_mode):
    """The im2col columns are ordered as ``weight.flatten(1)``: W·columns is the convolution (no bias)."""
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1, stride=2, padding_mode=padding_mode, bias=False)
    x = torch.randn(2, 5, 9, 9)
    columns = matmul_columns(conv, x)  # (B·L, C·k·k)
    with torch.no_grad():
        expected = conv(x)  # (B, 7, 5, 5)
    product = (columns @ conv.weight.flatten(1).T).reshape(2, -1, 7).permute(0, 2, 1).reshape(expected.shape)
    assert torch.allclose(product, expected, atol=1e-5)


def test_linear_columns_flatten_leading_dimensions():
    linear = torch.nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    assert torch.equal(matmul_columns(linear, x), x.reshape(10, 6))
    with pytest.raises(TypeError, match="Conv2d and Linear"):
        matmul_columns(torch.nn.GroupNorm(1, 6), x)


def test_hessian_refuses_a_layer_no_input_reached():
    with pytest.raises(RuntimeError, match="no inputs"):
        HessianAccumulator(4).hessian()


def test_dead_inputs_keep_nearest_rounding_of_their_column():
    """A column whose input is always zero gets no compensation and none flows out of it."""
    torch.manual_seed(4)
    weight = torch.randn(6, 10)
    inputs = torch.randn(256, 10)
    inputs[:, 3] = 0
    hessian = inputs.T @ inputs / 256
    _, quantize_column, nearest = _per_row_grid(weight)
    rounded = gptq_round(weight, hessian, quantize_column)
    assert torch.isfinite(rounded).all()
    assert torch.equal(rounded[:, 3], nearest(weight)[:, 3])  # H decouples it: no error flows in or out
    assert F.mse_loss(rounded @ inputs.T, weight @ inputs.T) <= F.mse_loss(nearest(weight) @ inputs.T,
                                                                           weight @ inputs.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hessian_of_half_precision_inputs_is_their_float32_hessian(dtype):
    """Half-precision inputs are widened before the product: a float16 Σ x² overflowed to inf (1024 rows of 16:
    262144 > 65504) and a bfloat16 one kept 8 bits. Widening is exact, so the result equals float32's."""
    torch.manual_seed(5)
    inputs = (torch.randn(1024, 6) + 16).to(dtype)
    half, wide = HessianAccumulator(6), HessianAccumulator(6)
    half.add(inputs)
    wide.add(inputs.float())
    assert torch.isfinite(half.hessian()).all()
    assert torch.equal(half.hessian(), wide.hessian())


def test_a_device_without_float64_runs_hessians_and_gptq_in_float32(monkeypatch):
    """On MPS (no float64) the Hessian sum and GPTQ's solve made float64 tensors and raised. They follow
    ``wide_dtype`` (float32 there): with it switched to float32 no float64 tensor is made, and the results stay
    within float32 rounding of the float64 ones (accumulation length × ε for the Hessian; the compensated columns
    within columns × ε × cond(H) of the weight's scale, here where no column lies that close to a rounding tie)."""
    torch.manual_seed(6)
    inputs, weight = torch.randn(96, 12) @ torch.randn(12, 12) * 0.3, torch.randn(8, 12)
    _, quantize_column, _ = _per_row_grid(weight)

    def run():
        accumulator = HessianAccumulator(12)
        for batch in inputs.split(32):
            accumulator.add(batch)
        hessian = accumulator.hessian()
        return hessian, gptq_round(weight, hessian, quantize_column, compensated=True, block_size=4)

    hessian64, compensated64 = run()
    monkeypatch.setattr("tadq.quant.gptq.wide_dtype", lambda device: torch.float32)
    with DtypeRecorder() as recorder:
        hessian32, compensated32 = run()
    assert not recorder.float64_ops() and hessian32.dtype == torch.float32
    eps = torch.finfo(torch.float32).eps
    bound = inputs.shape[0] * eps * (inputs.abs().T @ inputs.abs()) / inputs.shape[0]
    assert torch.all((hessian32.double() - hessian64).abs() <= bound)
    damped = hessian64 + 0.01 * torch.diagonal(hessian64).mean() * torch.eye(12, dtype=torch.float64)
    tolerance = 12 * eps * float(torch.linalg.cond(damped)) * float(weight.abs().max())
    assert torch.allclose(compensated32, compensated64, rtol=0.0, atol=tolerance)
