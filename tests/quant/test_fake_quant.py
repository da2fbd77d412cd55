import pytest
import torch

from tadq.quant import QScheme, Quantizer, estimate_range, fake_quantize, scale_and_zero_point


def _quantizer(bits: int, symmetric: bool = False) -> Quantizer:
    q = Quantizer(QScheme(bits=bits, symmetric=symmetric, range_method="minmax"))
    q.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    return q


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_twice_is_idempotent(bits, symmetric):
    q = _quantizer(bits, symmetric)
    x = torch.randn(1000) * 2
    once = q(x)
    assert torch.equal(q(once), once)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_within_half_step_inside_range(bits):
    q = _quantizer(bits)
    x = torch.rand(5000) * 3 - 1  # inside [-1, 2]
    assert (q(x) - x).abs().max() <= q.scale / 2 + 1e-6


def test_lower_bits_give_larger_error():
    x = torch.randn(20000)
    errors = []
    for bits in (8, 6, 4, 3, 2):
        scheme = QScheme(bits=bits, range_method="minmax")
        scale, zp = scale_and_zero_point(*estimate_range(x, scheme), bits, False)
        errors.append((fake_quantize(x, scale, zp, scheme.qmin, scheme.qmax) - x).pow(2).mean().item())
    assert errors == sorted(errors)
    assert errors[0] < errors[-1] / 100


def test_zero_is_exactly_representable():
    q = _quantizer(4)
    assert q(torch.zeros(3)).abs().max() == 0


def test_straight_through_gradient():
    q = _quantizer(4)
    x = torch.linspace(-0.9, 1.9, 50, requires_grad=True)
    q(x).sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_outputs_lie_on_the_integer_grid():
    q = _quantizer(4)
    codes = q(torch.randn(1000) * 3) / q.scale + q.zero_point
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= 0 and codes.max() <= 15


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fused_inference_path_equals_the_composed_ops(granularity, bits):
    x = torch.randn(16, 3, 5, 5) * 3
    q = Quantizer(QScheme(bits=bits, granularity=granularity, range_method="minmax"), num_channels=16)
    q.set_range(*estimate_range(x, q.scheme))
    fused = q(x)  # no gradient needed: torch's fused kernel
    composed = q(x.clone().requires_grad_(True)).detach()  # gradient path: the composed straight-through ops
    assert torch.equal(fused, composed)


def _near_half_steps(scale: torch.Tensor, count: int = 400) -> torch.Tensor:
    """(k + ½)·Δ for k in [-count, count) per row of ``scale``: products × 1/Δ land within float rounding of a half
    step, where round-half-even, × 1/Δ against ÷ Δ and any reordering pick different codes."""
    return (torch.arange(-count, count) + 0.5) * scale.reshape(-1, 1)


def test_kernel_fake_quantize_is_bit_identical_to_torchs_fused_kernels():
    """``kernel_fake_quantize`` (what a compiled graph runs instead of the fused ops) gives the fused kernels'
    bits, per tensor and per channel, on inputs at half steps and beyond the clamp; the division form
    (``fake_quantize``) is not bit-identical on the same inputs, so the inputs do probe the rounding."""
    from tadq.quant.fake_quant import kernel_fake_quantize

    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.0371, 0.013, 0.37, 1e-3])
    zero_point = torch.tensor([131, 0, 255, 7], dtype=torch.int32)
    rows = torch.cat([_near_half_steps(scale), torch.randn(4, 3000, generator=generator) * 3], dim=1)
    per_channel = torch.fake_quantize_per_channel_affine(rows, scale, zero_point, 0, 0, 255)
    got = kernel_fake_quantize(rows, scale[:, None], zero_point[:, None], 0, 255)
    assert torch.equal(got, per_channel)
    divided = fake_quantize(rows, scale[:, None], zero_point[:, None].float(), 0, 255)
    assert not torch.equal(divided, per_channel)
    for row in range(4):
        fused = torch.fake_quantize_per_tensor_affine(rows[row], scale[row], zero_point[row], 0, 255)
        assert torch.equal(kernel_fake_quantize(rows[row], scale[row], zero_point[row], 0, 255), fused)
        signed = torch.fake_quantize_per_tensor_affine(rows[row], scale[row], zero_point[row] - 128, -128, 127)
        assert torch.equal(kernel_fake_quantize(rows[row], scale[row], zero_point[row] - 128, -128, 127), signed)
