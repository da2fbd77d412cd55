"""The ``int8-cuda`` backend: linears and convolutions as ``torch._int_mm`` int8 GEMMs (convs through im2col).

Written device-agnostically (nothing here names a device), so the arithmetic is tested on CPU, where
``torch._int_mm`` also exists, and on a GPU by tests/backends/test_cuda.py; the backend itself refuses to start
without CUDA. Measured on an H200 (docs/backends.md): it agrees with fake-quant (45 dB at W8A8) but is slower than
bf16 on the shipped models, which are launch-bound there; the int8 GEMM alone is 2× faster than the bf16 op.

Arithmetic: activation codes are moved to int8 (a = q − 128, z' = z − 128); with int8 weight codes B and offset o
(``tadq.backends.weights``) the exact integer dot product is

    Σ_k (q_k − z)(C_k − z_c) = Σ a·B − o_c·Σ a − z'·Σ B + K·z'·o_c      (all int32)

and the float output is one rounding of ``Δx·Δw_c·(that) + bias``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.backends.activations import (
    ActivationGrid,
    GridCache,
    activation_codes,
    check_activation_quantizer,
    check_conv_input,
    check_linear_input,
)
from tadq.backends.weights import WeightCodes, float_bias, weight_codes
from tadq.quant.modules import QuantConv2d, QuantLinear
from tadq.quant.quantizer import Quantizer
from tadq.quant.split import SplitQuantConv2d

__all__ = ["IntMMKernel", "IntMMLinear", "IntMMConv2d", "IntMMSplitConv2d", "int_mm_layer"]

MIN_ROWS, ALIGN = 17, 8  # CUDA _int_mm needs more than 16 rows and K, N multiples of 8
MAX_EXACT_INT32 = 2**31


def _ceil(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class IntMMKernel(nn.Module):
    """``(rows of int8 activation codes) @ Bᵀ`` with the zero-point algebra above, padded to _int_mm's shapes."""

    def __init__(self, codes: WeightCodes, bias: Tensor | None, name: str) -> None:
        super().__init__()
        matrix = codes.codes.reshape(codes.codes.shape[0], -1)  # (N, K) int8
        n, k = matrix.shape
        if k * 255 * 255 >= MAX_EXACT_INT32:
            raise ValueError(f"{name}: K={k} could overflow the int32 accumulator")
        self.name, self.k, self.n = name, k, n
        padded = matrix.new_zeros(_ceil(n, ALIGN), _ceil(k, ALIGN))
        padded[:n, :k] = matrix
        # (N', K') row-major, handed to _int_mm as its transpose: a column-major (K', N') operand, the "TN" layout
        # of cuBLASLt's int8 GEMM. A row-major (K', N') operand ("NN") was refused on an H200 for some shapes
        # (CUBLAS_STATUS_NOT_SUPPORTED at N=128, M=17, K=32 and at N=32, K=16).
        self.register_buffer("weight", padded.contiguous())
        self.register_buffer("weight_sum", matrix.sum(dim=1, dtype=torch.int32))  # Σ_k B per output
        self.register_buffer("offset", codes.offset.to(torch.int32))
        self.register_buffer("w_scale", codes.scale)
        self.register_buffer("bias", bias)

    def forward(self, rows: Tensor, zero_point: float | Tensor, x_scale: float | Tensor) -> Tensor:
        """rows: (M, K) int8 activation codes a = q − 128; zero_point: z' = z − 128 (a number, or a 0-dim tensor for
        a per-step grid); returns (M, N) float32."""
        m = rows.shape[0]
        a = F.pad(rows, (0, self.weight.shape[1] - self.k, 0, max(MIN_ROWS - m, 0)))
        acc = torch._int_mm(a, self.weight.t())[:m, : self.n]  # Σ a·B, int32
        z = zero_point.to(torch.int32) if isinstance(zero_point, Tensor) else int(zero_point)
        row_sum = rows.sum(dim=1, keepdim=True, dtype=torch.int32)
        acc = acc - self.offset * row_sum - z * self.weight_sum + self.k * z * self.offset
        y = acc.float() * (x_scale * self.w_scale)
        return y if self.bias is None else y.add_(self.bias)


def _signed_codes(x: Tensor, grid: ActivationGrid) -> tuple[Tensor, float | Tensor]:
    """int8 activation codes a = q − 128 in float32 holding integers, and z − 128.

    The grid comes from the layer's ``GridCache``: a fixed range is a pair of Python numbers read once, so a forward
    makes no device→host read and no host→device copy. Reading the range per call (``float()`` of a GPU tensor, then
    a copy back) synchronised the GPU several times per layer: on an H200 that made a digits-model layer 0.35–1.4 ms
    against 0.02–0.09 ms for its bf16 op (docs/backends.md)."""
    return activation_codes(x, grid) - 128, grid.zero_point - 128


class IntMMLinear(nn.Module):
    """Integer replacement of a ``QuantLinear`` through ``torch._int_mm``."""

    def __init__(self, layer: QuantLinear, name: str) -> None:
        super().__init__()
        check_activation_quantizer(layer.input_quantizer, name)
        bias = float_bias(layer)
        self.kernel = IntMMKernel(weight_codes(layer.weight_quantizer, layer.weight, name), bias, name)
        self.input_quantizer = layer.input_quantizer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.grid = GridCache()
        self.grid.fill(self.input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.kernel.name, self.in_features)
        grid = self.grid(self.input_quantizer)
        a, z = _signed_codes(x, grid)
        y = self.kernel(a.reshape(-1, a.shape[-1]).to(torch.int8), z, grid.scale)
        return y.reshape(*x.shape[:-1], self.out_features)


class _Im2ColConv(nn.Module):
    """A conv as im2col + ``IntMMKernel``; padding holds the zero point so padded taps contribute exactly 0."""

    def __init__(self, codes: WeightCodes, bias: Tensor | None, conv: nn.Conv2d, name: str) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ValueError(f"{name}: int8-cuda's im2col GEMM supports groups=1 only, got groups={conv.groups} (the "
                             "int8 and int8-compiled CPU backends run grouped and depthwise convs)")
        self.kernel = IntMMKernel(codes, bias, name)
        self.name, self.in_channels = name, codes.codes.shape[1]  # a split half: its own channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        # (left, right, top, bottom) as nn.Conv2d pads, numeric or 'same'/'valid'; padding the codes copies values
        # as padding the float input would (quantization is elementwise), and a padded 0 has code z
        self.padding = tuple(conv._reversed_padding_repeated_twice)
        self.pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        self.grid = GridCache()

    def forward(self, x: Tensor, quantizer: Quantizer) -> Tensor:
        check_conv_input(x, self.name, self.in_channels)
        grid = self.grid(quantizer)
        a, z = _signed_codes(x, grid)
        a = F.pad(a - z, self.padding, mode=self.pad_mode) + z  # in the centred domain (0 = the zero point)
        batch, _, height, width = a.shape
        kh, kw = self.kernel_size
        h_out = (height - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (width - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = F.unfold(a, self.kernel_size, self.dilation, 0, self.stride)  # (B, K, L), K in (C, kh, kw) order
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(torch.int8)
        y = self.kernel(rows, z, grid.scale)  # (B·L, N)
        return y.reshape(batch, h_out, w_out, -1).permute(0, 3, 1, 2)  # NCHW view of channels-last data


class IntMMConv2d(nn.Module):
    """Integer replacement of a ``QuantConv2d`` through im2col + ``torch._int_mm``."""

    def __init__(self, layer: QuantConv2d, name: str) -> None:
        super().__init__()
        check_activation_quantizer(layer.input_quantizer, name)
        bias = float_bias(layer)
        self.conv = _Im2ColConv(weight_codes(layer.weight_quantizer, layer.weight, name), bias, layer, name)
        self.input_quantizer = layer.input_quantizer
        self.conv.grid.fill(self.input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input, as nn.Conv2d takes it
            return self.conv(x.unsqueeze(0), self.input_quantizer).squeeze(0)
        return self.conv(x, self.input_quantizer)


class IntMMSplitConv2d(nn.Module):
    """Integer shortcut-split conv: one im2col GEMM per half (each with its own Δx), summed in float32."""

    def __init__(self, layer: SplitQuantConv2d, name: str) -> None:
        super().__init__()
        self.split = layer.split
        views = layer.quantized_weights()
        bias = float_bias(layer)
        for part in ("deep", "skip"):
            check_activation_quantizer(getattr(layer, f"input_quantizer_{part}"), f"{name} ({part} half)")
        self.deep = _Im2ColConv(weight_codes(*views["weight_deep"], f"{name} (deep)"), bias, layer, f"{name} (deep)")
        self.skip = _Im2ColConv(weight_codes(*views["weight_skip"], f"{name} (skip)"), None, layer, f"{name} (skip)")
        self.input_quantizer_deep = layer.input_quantizer_deep
        self.input_quantizer_skip = layer.input_quantizer_skip
        self.deep.grid.fill(self.input_quantizer_deep)
        self.skip.grid.fill(self.input_quantizer_skip)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C_in, H, W) input, as nn.Conv2d takes it: x[:, :C1] would cut H
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = self.deep(x[:, : self.split], self.input_quantizer_deep)
        return y + self.skip(x[:, self.split:], self.input_quantizer_skip)


def int_mm_layer(module: nn.Module, name: str) -> nn.Module | None:
    """The ``_int_mm`` replacement of a fake-quant layer, or ``None`` for a module this backend leaves alone."""
    kind = type(module)
    if kind is QuantConv2d:
        return IntMMConv2d(module, name)
    if kind is SplitQuantConv2d:
        return IntMMSplitConv2d(module, name)
    if kind is QuantLinear:
        return IntMMLinear(module, name)
    return None
