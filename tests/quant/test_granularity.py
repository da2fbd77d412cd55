"""Dynamic (per-token / per-group) fake quantization at the edges of its input's range and dtype."""

from __future__ import annotations

import pytest
import torch

from tadq.quant import QScheme
from tadq.quant.granularity import dynamic_fake_quantize


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["per_token", "per_group"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_half_precision_input_is_quantized_as_in_float32(dtype, granularity, symmetric):
    """A float16 model sampled with dynamic activations: an all-zero token, a tiny one (its step below float16's
    smallest subnormal) and a wide one (max − min beyond float16's range) stay finite, and every token gets the
    codes float32 gives (cast back to the input dtype), as the static quantizers' fused kernels do."""
    torch.manual_seed(0)
    scheme = QScheme(bits=8, symmetric=symmetric, granularity=granularity, group_size=4)
    x = torch.randn(6, 16)
    x[0] = 0.0  # all-zero token (padding, a dead channel group)
    x[1] *= 1e-6  # Δ ≈ 1e-8: flushed to 0 in float16
    x[2] = torch.linspace(-60000.0, 60000.0, 16)  # finite in float16, but its span is not
    x = x.to(dtype)
    quantized = dynamic_fake_quantize(x, scheme, -1)
    assert quantized.dtype == dtype
    assert torch.isfinite(quantized).all()
    assert torch.equal(quantized[0], x[0])  # zero is on every grid
    assert torch.equal(quantized, dynamic_fake_quantize(x.float(), scheme, -1).to(dtype))


def test_half_precision_input_gets_the_float32_gradient():
    """Reconstruction differentiates through the quantizer: a bfloat16 input gets float32's gradient, cast."""
    scheme = QScheme(bits=4, granularity="per_token")
    x = torch.randn(3, 8).to(torch.bfloat16)
    half, full = x.clone().requires_grad_(True), x.float().requires_grad_(True)
    dynamic_fake_quantize(half, scheme, -1).sum().backward()
    dynamic_fake_quantize(full, scheme, -1).sum().backward()
    assert half.grad.dtype == torch.bfloat16 and torch.equal(half.grad, full.grad.to(torch.bfloat16))
