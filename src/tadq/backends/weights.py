"""Integer weight codes of a fake-quant layer, in the form int8 kernels take them.

A fake-quant weight is ``Ŵ = Δ_c·(C − z_c)`` with codes C on the scheme's grid. Integer kernels multiply signed
int8 weights and have no weight zero point (oneDNN ignores one; ``torch._int_mm`` has none), so the codes are
shifted to ``B = C − s_c`` with ``B`` in [−128, 127] and the leftover offset ``o_c = z_c − s_c`` is kept:

    Σ_k a_k (C_ck − z_c) = Σ_k a_k B_ck − o_c Σ_k a_k          (a = activation codes − their zero point)

When ``C − z`` itself fits in int8 (every ≤ 7-bit grid, symmetric 8-bit grids) s = z and o = 0: no correction.
Otherwise (asymmetric 8-bit, C ∈ [0, 255]) s = 128 and the kernel output is corrected with o_c times the sum of
``a`` over each output's inputs, computed exactly in integers (by the kernel itself: see the backends).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadq.quant.fake_quant import quantize_to_int
from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer

__all__ = ["WeightCodes", "float_bias", "weight_code_peak", "weight_codes"]

INT8_MIN, INT8_MAX = -128, 127


def float_bias(module: nn.Module) -> Tensor | None:
    """A layer's bias as the float32 copy every integer backend adds to its float32 output (``None`` without one):
    a copy, so the integer layer never shares storage with the fake-quant model's parameter."""
    return None if module.bias is None else module.bias.detach().float().clone()


@dataclass(frozen=True)
class WeightCodes:
    """Signed int8 weight codes ``B`` (same shape as the weight), Δ per output channel, offset o per channel.

    ``has_offset`` is false when every o_c is 0 (no correction term at run time).
    """

    codes: Tensor  # int8, (C_out, ...)
    scale: Tensor  # float32, (C_out,)
    offset: Tensor  # float32 holding integers, (C_out,)

    @property
    def has_offset(self) -> bool:
        return bool(self.offset.any())


@torch.no_grad()
def weight_codes(quantizer: Quantizer, weight: Tensor, name: str) -> WeightCodes:
    """The integer form of ``quantizer(weight)``; raises if the quantizer is unusable for integer execution.

    The codes are read back from the quantizer's own output, so learned rounding (AdaRound, once finished) and
    loaded artefacts (weights already on the grid) give exactly the values the fake-quant model multiplies.
    """
    scheme = quantizer.scheme
    if not quantizer.enabled:
        raise ValueError(f"{name}: its weight is not quantized, so no integer kernel applies; keep it in the "
                         "'fake' backend or exclude the layer from quantization")
    if scheme.granularity == "per_block":
        raise ValueError(f"{name}: its weight has one step per block of {scheme.group_size} weights "
                         f"({scheme.describe()}), which needs a group-wise kernel (partial sums rescaled per block); "
                         "tadq's integer backends run per-channel and per-tensor weights only: sample it with the "
                         "'fake' backend, or quantize with per-channel weights")
    if scheme.granularity != "per_channel" and quantizer.scale.numel() != 1:
        raise ValueError(f"{name}: unexpected weight quantizer layout {scheme.describe()}")
    if not bool(quantizer.initialized):
        raise ValueError(f"{name}: its weight quantizer has no range; quantize or load the model first")
    if quantizer.bypass:
        raise ValueError(f"{name}: its weight quantizer is bypassed; convert outside quantizers_bypassed()")
    quantized = quantizer(weight.detach().float())
    scale = quantizer._broadcast(quantizer.scale, weight)
    zero_point = quantizer._broadcast(quantizer.zero_point, weight)
    codes = quantize_to_int(quantized, scale, zero_point, scheme.qmin, scheme.qmax)
    if not torch.equal((codes - zero_point) * scale, quantized):
        raise ValueError(f"{name}: the weight quantizer returned values off its Δ·(integer − z) grid")
    channels = weight.shape[0]
    scale_c = quantizer.scale.float().expand(channels) if quantizer.scale.numel() == 1 else quantizer.scale.float()
    zero_c = quantizer.zero_point.float().expand(channels).clone() if quantizer.zero_point.numel() == 1 \
        else quantizer.zero_point.float().clone()
    centred = codes - zero_point
    if centred.min() >= INT8_MIN and centred.max() <= INT8_MAX:
        shift = zero_c
    else:
        shift = torch.full_like(zero_c, float(-INT8_MIN))  # asymmetric 8-bit codes [0, 255] → [−128, 127]
        if codes.min() - shift.min() < INT8_MIN or codes.max() - shift.max() > INT8_MAX:
            raise ValueError(f"{name}: weight codes in [{int(codes.min())}, {int(codes.max())}] do not fit int8")
    shifted = codes - shift.reshape(-1, *([1] * (weight.dim() - 1)))
    offset = (zero_c - shift).contiguous()
    return WeightCodes(shifted.to(torch.int8).contiguous(), scale_c.contiguous().clone(), offset)


def weight_code_peak(scheme: QScheme) -> int:
    """The largest |B| the kernels can meet for weights on ``scheme``, known before any weight is seen.

    Symmetric: C itself; asymmetric: C − z spans ±(qmax − qmin), or, beyond int8, the shifted codes C − 128.
    """
    peak = max(-scheme.qmin, scheme.qmax) if scheme.symmetric else scheme.qmax - scheme.qmin
    return peak if peak <= INT8_MAX else -INT8_MIN
