"""Activation granularity: dynamic per-token / per-group fake quantization, and what a kernel could run of it.

A static per-tensor activation has one (Δ, z) fixed at calibration. The dynamic granularities compute (Δ, z) from
the tensor at run time, from the min/max of each token (a linear input's row, a conv input's pixel) or of each
group of ``g`` consecutive channels of a token. Groups run along the reduction dimension of the layer's matmul:
the input channels of a linear layer, and for a convolution the channel groups of one input pixel, which are
exactly the K-groups of its im2col matrix when K is ordered tap-major (kh, kw, c) as NHWC implicit-GEMM kernels do
(every im2col column reads that pixel's group with the same scale, so quantizing the feature map per
(pixel, channel group) *is* group quantization of the im2col input).

Whether a scale factors out of the integer dot product decides which kernel can run it (``kernel_status``): a
per-token scale of a linear / 1×1 conv input is constant along the reduction, so an int GEMM plus a per-row
rescale runs it; a 3×3 conv's reduction spans 9 pixels with 9 different per-pixel scales, so it needs a group-wise
kernel (partial sums per tap, each rescaled), as per-group does everywhere. tadq has no group-wise kernel: those
choices are simulation here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from tadq.quant.fake_quant import fake_quantize, scale_and_zero_point
from tadq.quant.qscheme import QScheme

__all__ = ["dynamic_fake_quantize", "group_count", "KernelStatus", "kernel_status", "granularity_overhead"]


def group_count(channels: int, scheme: QScheme) -> int:
    """Groups per token/pixel: 1 for ``per_token``, ⌈C / g⌉ for ``per_group``."""
    if scheme.granularity == "per_token":
        return 1
    return -(-channels // scheme.group_size)


def dynamic_fake_quantize(x: Tensor, scheme: QScheme, channel_dim: int) -> Tensor:
    """Fake-quantize ``x`` with one (Δ, z) per token (``per_token``) or per channel group (``per_group``).

    Args:
        x: a layer input; its channels are ``channel_dim`` (1 for a conv input (B, C, H, W), -1 for a linear one).
        scheme: a ``per_token`` or ``per_group`` scheme (bits, symmetry, group size).
        channel_dim: the dimension reduced by the layer (the groups' dimension).

    The range of each group is its min/max widened to include 0 (as every tadq range), so a shorter last group is
    padded with zeros without changing its (Δ, z). A float16/bfloat16 input is quantized in float32 and cast back,
    as the static quantizers' fused kernels do: in float16 the step of an all-zero or tiny group (Δ < 6e-8, the
    1e-8 floor included) flushed to 0 and ``x / Δ`` made the group NaN, a group spanning over 65504 overflowed,
    and ``x / Δ`` rounded in 8 or 11 bits picked neighbouring codes.
    """
    if not scheme.dynamic or scheme.bits is None:
        raise ValueError(f"dynamic_fake_quantize needs a per_token or per_group scheme, got {scheme.describe()}")
    if x.dtype in (torch.float16, torch.bfloat16):
        return dynamic_fake_quantize(x.float(), scheme, channel_dim).to(x.dtype)
    moved = x.movedim(channel_dim, -1)
    channels = moved.shape[-1]
    size = channels if scheme.granularity == "per_token" else min(scheme.group_size, channels)
    pad = (-channels) % size
    padded = F.pad(moved, (0, pad)) if pad else moved
    grouped = padded.reshape(*padded.shape[:-1], -1, size)
    low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    scale, zero_point = scale_and_zero_point(low, high, scheme.bits, scheme.symmetric)
    quantized = fake_quantize(grouped, scale, zero_point, scheme.qmin, scheme.qmax)
    quantized = quantized.reshape(padded.shape)[..., :channels]
    return quantized.movedim(-1, channel_dim)


@dataclass(frozen=True)
class KernelStatus:
    """Which integer kernel could run a layer's activation granularity.

    Args:
        runnable: ``"int-gemm"`` (a plain integer GEMM/conv, scales in the epilogue), ``"group-wise"`` (needs a
            kernel that rescales partial sums per K-group, e.g. Nunchaku's W4A4), ``"fp8-gemm"`` (fp8 activations:
            an FP8 GEMM on a GPU with fp8 units, e.g. H100), or ``"simulation"`` (no kernel form: only the
            fake-quant simulation measures it).
        in_tadq: whether a tadq backend runs it today (``tadq.backends``: per-tensor static int8 only).
        note: why, in words.
    """

    runnable: str
    in_tadq: bool
    note: str

    def to_json(self) -> dict[str, object]:
        return {"runnable": self.runnable, "in_tadq": self.in_tadq, "note": self.note}


def kernel_status(scheme: QScheme, *, kernel_size: tuple[int, int] = (1, 1), in_channels: int | None = None,
                  linear: bool = False) -> KernelStatus:
    """The runnable-kernel status of an activation scheme on one layer (a Linear, or a Conv2d of ``kernel_size``)."""
    pointwise = linear or tuple(kernel_size) == (1, 1)
    if not scheme.enabled:
        return KernelStatus("int-gemm", False, "activations in floating point (weight-only kernel)")
    if scheme.fp8:
        return KernelStatus("fp8-gemm", False, f"one static scale, {scheme.format} inputs: an FP8 GEMM/conv (a GPU "
                            "with fp8 units, e.g. H100), rescale in the epilogue; tadq's backends run int8 only")
    if scheme.granularity == "per_tensor":
        return KernelStatus("int-gemm", scheme.bits == 8,
                            "one static scale: integer GEMM/conv, rescale in the epilogue"
                            + ("" if scheme.bits == 8 else f"; tadq's backends run int8 only, not int{scheme.bits}"))
    if scheme.granularity == "per_token":
        if pointwise:
            return KernelStatus("int-gemm", False, "the per-token scale is constant along the reduction: integer "
                                                   "GEMM plus a per-row rescale (and a dynamic-quantize kernel)")
        return KernelStatus("group-wise", False, f"per-pixel scales differ across the {kernel_size[0]}×"
                            f"{kernel_size[1]} taps of one output: they do not factor out of the dot product; a "
                            "tap-major implicit GEMM with one rescaled partial sum per tap (g = C_in) could run it")
    if scheme.granularity == "per_group":
        aligned = in_channels is None or in_channels % scheme.group_size == 0 or in_channels <= scheme.group_size
        where = "channels" if pointwise else "channel groups of each tap (tap-major im2col)"
        runnable = "group-wise" if aligned else "simulation"
        note = f"one rescaled partial sum per K-group of {scheme.group_size} {where}"
        if not aligned:
            note += f"; {in_channels} channels are not a multiple of g, the last short group has no kernel layout"
        return KernelStatus(runnable, False, note)
    return KernelStatus("simulation", False, f"{scheme.granularity} activations are not supported by any kernel")


def granularity_overhead(scheme: QScheme, reduction: int, channels: int, out_features: int) -> dict[str, int]:
    """Floating-point operations a granularity adds per output position, beside the integer MACs.

    Args:
        reduction: K, the reduction length of one output (C_in·kh·kw).
        channels: C_in (one token's channels: what a dynamic scale is computed over).
        out_features: outputs per position (C_out).

    Returns ``{"scale_ops": …, "rescale_macs": …}``: the min/max reduction that computes dynamic scales (2 per
    input channel of the position's token; 0 for a static scale) and the FP multiply-adds that apply scales to the
    integer accumulators (1 per output for one scale per output, K/g per output for per-group, taps per output for
    per-pixel scales on a k×k conv).
    """
    if not scheme.enabled or scheme.granularity in ("per_tensor", "per_channel"):
        return {"scale_ops": 0, "rescale_macs": out_features}
    taps = max(1, reduction // max(channels, 1))
    scale_ops = 2 * channels
    if scheme.granularity == "per_token":
        return {"scale_ops": scale_ops, "rescale_macs": out_features * taps}
    return {"scale_ops": scale_ops, "rescale_macs": out_features * taps * group_count(channels, scheme)}

