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
