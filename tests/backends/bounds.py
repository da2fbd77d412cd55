"""The tolerance an integer layer must meet against its fake-quant twin, derived from float32 rounding.

Both compute Y = Δx·Δw_c·Σ_k a_k·(C_ck − z_c) + b (a = activation codes − z_x). The integer path sums exactly in
int32, so all of its error is float rounding after the sum. The fake-quant path rounds x̂ = Δx·a and Ŵ = Δw·(C − z)
(relative u = 2⁻²⁴ each), each product (u) and a K-term float32 sum (γ_K = K·u/(1 − K·u) times Σ|terms|,
Higham, Accuracy and Stability, §3.1). With M = Δx·Δw_c·Σ_k |a_k|·(|B_ck| + |o_c|) ≥ Σ|terms| (B = C − s and o = z − s,
the int8 weight and its offset, so |C − z| ≤ |B| + |o|):

    fake:    |Y_fake − Y| ≤ (γ_K + 3u)·M + u·|b|            (input, weight, product roundings; bias add)
    integer: |Y_int − Y|  ≤ 6u·M + 2u·|b|                    (int32 → float, Δx·Δw product, scale multiply,
                                                              offset correction multiply and add, bias add)

so |Y_int − Y_fake| ≤ (K + 10)·u·(M + |b|) for K·u ≪ 1 (a split conv adds one more float add: K + 11). The
bound is computed per output element from the actual codes, in float64.

A fused feed-forward GELU (``OneDNNGELU``) returns G_int(Y_int) with its own GELU implementation (oneDNN's
post-op; after a weight offset torch's F.gelu eagerly or the exp form under compile), and the tests compare it
with the exact G of the fake-quant linear's output, in float64. GELU is Lipschitz with constant max|G'| = 1.129
(both forms, at y ≈ 1.41), so with e the largest relative error of an implementation, |G_int(y) − G(y)| ≤ e·|y|:

    |G_int(Y_int) − G(Y_fake)| ≤ e·|Y_int| + 1.13·|Y_int − Y_fake| ≤ 1.13·B + e·(|Y_fake| + B)

(B: the linear bound above). The tanh forms are within 4u·|y| by a rounding count: torch's 0.5·y·(1 + tanh v)
carries the 1-ulp error of its tanh (≤ 2u absolute, the cancellation at 1 + tanh v for y < 0), the rounding of the
sum (≤ 2u·(1 + tanh v)/2 after the halving) and of two products (≤ 2u·|G| ≤ 2u·|y|); the exp form y / (1 + e^w)
the same count. The erf form is not: torch's 0.5·y·(1 + erf(y/√2)) reaches 6.4u·|y| (at y ≈ 2.98, every float32
with 2⁻⁶ ≤ |y| < 2⁶ checked; tanh 2.0u, exp form 2.1u), and oneDNN's erf post-op is bit-identical to it. So
e = 8u (``GELU_FORMS``) covers every form, checked by ``test_every_gelu_form_is_within_the_bounds_error``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tadq.backends.activations import activation_codes, activation_grid
from tadq.backends.weights import weight_codes
from tadq.quant.quantizer import Quantizer

U = 2.0**-24  # unit roundoff of float32
GELU_LIPSCHITZ = 1.13  # max |dG/dy| of GELU, erf and tanh forms (1.1290 at y ≈ 1.414)
GELU_FORMS = 8 * U  # every GELU implementation is within 8u·|y| of the exact GELU (measured ≤ 6.4u; module docstring)


def centred_activation(x: Tensor, quantizer: Quantizer) -> tuple[Tensor, float]:
    """(a = codes − z as float64, Δx) for ``x`` on the quantizer's current grid."""
    grid = activation_grid(quantizer)
    return (activation_codes(x, grid) - grid.zero_point).double(), float(grid.scale)


def magnitude_weight(quantizer: Quantizer, weight: Tensor) -> Tensor:
    """Δw_c·(|B| + |o_c|) in float64, same shape as the weight."""
    codes = weight_codes(quantizer, weight, "test")
    shape = (-1, *([1] * (weight.dim() - 1)))
    return (codes.codes.double().abs() + codes.offset.double().abs().reshape(shape)) * codes.scale.double().reshape(
        shape)


def conv_bound(x: Tensor, act: Quantizer, wq: Quantizer, weight: Tensor, bias: Tensor | None, conv, extra: int = 0
               ) -> Tensor:
    """Per-element |Y_int − Y_fake| bound of one conv (see the module docstring)."""
    a, scale = centred_activation(x, act)
    k = weight[0].numel()
    m = F.conv2d(a.abs(), magnitude_weight(wq, weight), None, conv.stride, conv.padding, conv.dilation) * scale
    b = 0.0 if bias is None else bias.double().abs().reshape(1, -1, 1, 1)
    return (k + 10 + extra) * U * (m + b)


def linear_bound(x: Tensor, act: Quantizer, wq: Quantizer, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Per-element |Y_int − Y_fake| bound of one linear layer."""
    a, scale = centred_activation(x, act)
    m = a.abs() @ magnitude_weight(wq, weight).T * scale
    b = 0.0 if bias is None else bias.double().abs()
    return (weight.shape[1] + 10) * U * (m + b)


def gelu_bound(fake_linear: Tensor, bound: Tensor) -> Tensor:
    """Per-element |G_int(Y_int) − G(Y_fake)| bound of a fused GELU linear, from the linear's own bound."""
    return GELU_LIPSCHITZ * bound + GELU_FORMS * (fake_linear.abs() + bound)
