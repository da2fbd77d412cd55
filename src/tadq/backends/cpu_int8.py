"""The ``int8`` CPU backend: convolutions and linears as oneDNN u8·s8 → int32 kernels with a float32 output.

Kernel: ``torch.ops.onednn.qconv2d_pointwise`` (``qconv_pointwise`` for per-step grids) / ``qlinear_pointwise`` (the
ops PyTorch 2's x86 Inductor quantization lowers to) on weights prepacked once by ``qconv_prepack`` /
``qlinear_prepack``. With ``output_dtype=float32`` the kernel returns ``Δx·Δw_c·Σ a·B + bias`` from an exact int32
accumulation, so no output requantization is added to the arithmetic the fake-quant model simulates. oneDNN has no
weight zero point (a non-zero one is silently ignored, measured), so asymmetric 8-bit weights are corrected with an
exact sum of the activation codes (``tadq.backends.weights``): for a conv, the window sum comes out of the same
kernel as one more output channel of int8 ones (one per group of a grouped or depthwise conv). Every padding a
``nn.Conv2d`` takes runs: oneDNN's symmetric zero padding, or the float input padded first (``_padding``).
A transformer feed-forward's ``GELU`` (diffusers: a linear ``proj``, then GELU) runs as one module,
``OneDNNGELU``: the GELU is oneDNN's post-op of the int8 linear, applied to the float32 output in the same kernel
call, instead of a separate pass over the widest activation of the block (``fused_gelu``).
Why these ops and not the alternatives: docs/backends.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.backends import capability
from tadq.backends.activations import (
    SCRATCH,
    ActivationGrid,
    GridCache,
    activation_codes,
    check_activation_quantizer,
    check_conv_input,
    check_linear_input,
    traced_codes,
)
from tadq.backends.weights import WeightCodes, float_bias, weight_codes
from tadq.quant.modules import FORWARD_HOOK_DICTS, QuantConv2d, QuantLinear
from tadq.quant.quantizer import Quantizer
from tadq.quant.split import SplitQuantConv2d

__all__ = ["GELU_MODES", "OneDNNConv2d", "OneDNNGELU", "OneDNNLinear", "OneDNNSplitConv2d", "cpu_int8_layer",
           "fused_gelu", "gelu_tanh_by_exp"]

MAX_EXACT_FLOAT = 2**24  # every integer below this is exact in float32
GELU_MODES = ("none", "tanh")  # F.gelu's ``approximate`` values, which are also oneDNN's GELU post-op algorithms
TANH_GELU_SLOPE = 2 * (2 / torch.pi) ** 0.5  # 2·√(2/π): GELU_tanh(y) = y·σ(2·√(2/π)·(y + 0.044715·y³))
TANH_GELU_CUBIC = 0.044715


def gelu_tanh_by_exp(y: Tensor) -> Tensor:
    """``F.gelu(y, approximate="tanh")`` written as y / (1 + exp(−2·√(2/π)·(y + 0.044715·y³))), the same function.

    For ``torch.compile`` only: Inductor vectorises ``exp`` about twice as fast as ``tanh`` on x86, and the tanh
    GELU after a W8A8 feed-forward's first linear was the single largest generated kernel of the compiled DiT
    (benchmarks/qlinear_gelu.py: 5.6 against 9.5 ms per call with the next layer's quantization fused in, rows
    8192 × 512, one thread). It is not torch's rounding: within 3.3·u·|y| of torch's (u = 2⁻²⁴, measured over
    |y| ≤ 40), as oneDNN's post-op is (≤ 3.4·u·|y|); eagerly torch's own op is as fast, so eager keeps it.
    """
    return y / (1 + torch.exp((y + TANH_GELU_CUBIC * y * y * y) * -TANH_GELU_SLOPE))


def _check_weight_bound(codes: WeightCodes, name: str) -> None:
    """Refuse weight codes this machine's kernels would not sum exactly (``capability.int8_cpu_weight_bound``)."""
    bound = capability.int8_cpu_weight_bound()
    peak = int(codes.codes.to(torch.int16).abs().max()) if codes.codes.numel() else 0
    if peak > bound:
        raise ValueError(f"{name}: its int8 weight codes reach ±{peak}, but {capability.weight_bound_reason(bound)}")


def _padding(conv: nn.Conv2d) -> tuple[list[int], tuple[int, ...] | None, str]:
    """(padding oneDNN applies, padding applied to the float input first or ``None``, that padding's mode).

    oneDNN pads symmetrically with the zero point. ``padding='same'`` with an even kernel (one more row/column on
    the bottom/right) and the reflect/replicate/circular modes are padded on the float input instead, as
    ``nn.Conv2d`` pads its (fake-quantized) input: quantization is elementwise and 0 has code z, so padding before
    quantizing gives the codes the fake-quant layer pads with.
    """
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return list(conv.padding), None, "constant"
    left, right, top, bottom = conv._reversed_padding_repeated_twice  # how nn.Conv2d pads: (W left, right, H ...)
    if conv.padding_mode == "zeros" and left == right and top == bottom:
        return [top, left], None, "constant"
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return [0, 0], (left, right, top, bottom), mode


def _with_window_channels(weight: Tensor, scale: Tensor, bias: Tensor | None, groups: int
                          ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Append one output channel of int8 ones (scale 1, bias 0) to each group's outputs.

    The kernel then returns Δx·Σ_window (codes − z) over that group's input channels beside its outputs, which the
    offset correction needs; grouped, each group's outputs and its window sum are contiguous in the output.
    """
    def per_group(t: Tensor, extra: Tensor) -> Tensor:
        return torch.cat([t.unflatten(0, (groups, -1)), extra.expand(groups, 1, *t.shape[1:])], dim=1).flatten(0, 1)

    weight = per_group(weight, torch.ones((1, 1, *weight.shape[1:]), dtype=torch.int8))
    scale = per_group(scale, scale.new_ones(1, 1))
    return weight.contiguous(), scale.contiguous(), None if bias is None else per_group(bias, bias.new_zeros(1, 1))


def _zero(grid: ActivationGrid) -> int | Tensor:
    """The zero point as the kernel takes it: an int, or an int32 tensor for a per-step grid."""
    return grid.zero_point.to(torch.int32) if isinstance(grid.zero_point, Tensor) else int(grid.zero_point)


class _Prepacked(nn.Module):
    """A layer holding an opaque oneDNN prepacked weight (``packed``), which torch cannot copy: ``copy.deepcopy``
    of an integer model failed deep inside torch ("Cannot access storage of OpaqueTensorImpl")."""

    name: str

    def __deepcopy__(self, memo: dict) -> None:
        raise TypeError(f"{self.name}: an int8 model holds prepacked oneDNN weights, which cannot be copied; copy "
                        "the fake-quant model and convert the copy (to_backend(copy.deepcopy(qmodel), backend))")


class _ConvKernel(_Prepacked):
    """One prepacked int8 conv; the input quantizer is passed per call (a split conv has one per half)."""

    def __init__(self, codes: WeightCodes, bias: Tensor | None, conv: nn.Conv2d, name: str) -> None:
        super().__init__()
        if codes.codes.shape[1] * conv.kernel_size[0] * conv.kernel_size[1] * 255 >= MAX_EXACT_FLOAT:
            raise ValueError(f"{name}: window sums could exceed 2^24 and lose exactness in float32")
        _check_weight_bound(codes, name)
        self.name = name
        self.in_channels, self.groups = codes.codes.shape[1] * conv.groups, conv.groups  # a split half: its own
        padding, self.pre_pad, self.pad_mode = _padding(conv)
        self.geometry = (list(conv.stride), padding, list(conv.dilation))
        stride, padding, dilation = self.geometry
        self.has_offset = codes.has_offset
        weight, scale = codes.codes, codes.scale
        if self.has_offset:  # one more int8-ones output channel per group: the kernel returns Δx·Σ_window (codes − z)
            weight, scale, bias = _with_window_channels(weight, scale, bias, self.groups)
        # not a buffer: an opaque oneDNN-layout tensor that state_dict/deepcopy must not touch
        self.packed = torch.ops.onednn.qconv_prepack(weight, scale, 1.0, 0, stride, padding, dilation, self.groups,
                                                     None)
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zero", torch.zeros(scale.numel(), dtype=torch.int64))
        self.register_buffer("bias", bias)
        offset_shape = (1, -1, 1, 1) if self.groups == 1 else (1, self.groups, -1, 1, 1)
        self.register_buffer("neg_offset_scale", (-codes.offset * codes.scale).reshape(offset_shape))
        self.packed_bytes = weight.numel()  # int8: one byte per weight
        self.grid = GridCache()

    def forward(self, x: Tensor, quantizer: Quantizer) -> Tensor:
        check_conv_input(x, self.name, self.in_channels)
        grid = self.grid(quantizer)
        if self.pre_pad is not None:  # padding the float input is exact: codes copy values, and 0 has code z
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        if torch.compiler.is_compiling():  # pure ops: Inductor fuses them into the op that produced x
            # channels-last, the layout oneDNN's int8 conv reads: left to Inductor, an upsample feeding a conv wrote
            # NCHW codes by scalar gathers and oneDNN reordered them (docs/backends.md, int8-compiled)
            codes = traced_codes(x, grid).contiguous(memory_format=torch.channels_last).to(torch.uint8)
        else:
            values = activation_codes(x, grid, SCRATCH.get("codes", x.shape, torch.float32, x.device, True))
            codes = SCRATCH.get("uint8", x.shape, torch.uint8, x.device, True).copy_(values)  # oneDNN's layout
        stride, padding, dilation = self.geometry
        # a per-step grid goes through qconv_pointwise.tensor, the N-d twin of qconv2d_pointwise (same kernel,
        # bit-identical outputs, measured): qconv2d_pointwise.tensor has no shape function, so torch.compile cannot
        # trace it; a fixed grid keeps qconv2d_pointwise.default, whose compiled lowering takes a dynamic batch
        # (qconv_pointwise.default's failed a stride check there)
        per_step = isinstance(grid.scale, Tensor)
        op = torch.ops.onednn.qconv_pointwise.tensor if per_step else torch.ops.onednn.qconv2d_pointwise.default
        y = op(codes, grid.scale, _zero(grid), self.packed, self.w_scale, self.w_zero, self.bias, stride, padding,
               dilation, self.groups, 1.0, 0, torch.float32, "none", [], "")
        if not self.has_offset:
            return y
        if self.groups != 1:  # each group's window-sum channel follows its outputs (_with_window_channels)
            per_group = y.unflatten(1, (self.groups, -1))
            return (per_group[:, :, :-1] + per_group[:, :, -1:] * self.neg_offset_scale).flatten(1, 2)
        # − o_c·Δw_c · Δx·Σ_window (codes − z): the last channel is the kernel's exact int32 window sum times Δx.
        # Compiled, Inductor fuses the multiply-add into the op that reads y; eagerly it runs in place on y's view (a
        # new tensor per call was slower than the old channel-sum + sum-pool, measured: docs/backends.md)
        main, window = y[:, :-1], y[:, -1:]  # constant indices: an int attribute could be traced as a symbol
        if torch.compiler.is_compiling():
            return main + window * self.neg_offset_scale
        return main.addcmul_(window, self.neg_offset_scale)


class OneDNNConv2d(nn.Module):
    """Integer replacement of a ``QuantConv2d`` (keeps its ``input_quantizer``, so FSC tables still find it)."""

    def __init__(self, layer: QuantConv2d, name: str) -> None:
        super().__init__()
        check_activation_quantizer(layer.input_quantizer, name)
        self.kernel = _ConvKernel(weight_codes(layer.weight_quantizer, layer.weight, name), float_bias(layer), layer,
                                  name)
        self.input_quantizer = layer.input_quantizer
        self.out_channels = layer.out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input, as nn.Conv2d takes it
            return self.kernel(x.unsqueeze(0), self.input_quantizer).squeeze(0)
        return self.kernel(x, self.input_quantizer)


class OneDNNSplitConv2d(nn.Module):
    """Integer shortcut-split conv: two int8 convs over the deep and skip halves (own Δx each), summed in fp32."""

    def __init__(self, layer: SplitQuantConv2d, name: str) -> None:
        super().__init__()
        self.split = layer.split
        for part in ("deep", "skip"):
            check_activation_quantizer(getattr(layer, f"input_quantizer_{part}"), f"{name} ({part} half)")
        views = layer.quantized_weights()
        quantizer_deep, weight_deep = views["weight_deep"]
        quantizer_skip, weight_skip = views["weight_skip"]
        self.deep = _ConvKernel(weight_codes(quantizer_deep, weight_deep, f"{name} (deep)"), float_bias(layer), layer,
                                f"{name} (deep)")
        self.skip = _ConvKernel(weight_codes(quantizer_skip, weight_skip, f"{name} (skip)"), None, layer,
                                f"{name} (skip)")
        self.input_quantizer_deep = layer.input_quantizer_deep
        self.input_quantizer_skip = layer.input_quantizer_skip

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C_in, H, W) input, as nn.Conv2d takes it: x[:, :C1] would cut H
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = self.deep(x[:, : self.split], self.input_quantizer_deep)
        return y.add_(self.skip(x[:, self.split:], self.input_quantizer_skip))


class OneDNNLinear(_Prepacked):
    """Integer replacement of a ``QuantLinear``: rows of any leading shape through one 2-D int8 GEMM.

    With ``gelu`` set (``"tanh"`` or ``"none"``, F.gelu's ``approximate``) it returns GELU of that output: the
    ``proj`` of a fused feed-forward GELU (``OneDNNGELU``). Without a weight offset the GELU is oneDNN's post-op,
    inside the kernel call; with one (asymmetric 8-bit weights) the offset must be added first and oneDNN takes no
    GELU after an added tensor ("unsupported unary post op gelu with binary post op add", measured), so the GELU
    follows the correction: torch's op eagerly, ``gelu_tanh_by_exp`` for the tanh form when compiled.
    """

    def __init__(self, layer: QuantLinear, name: str, gelu: str | None = None) -> None:
        super().__init__()
        check_activation_quantizer(layer.input_quantizer, name)
        if gelu is not None and gelu not in GELU_MODES:
            raise ValueError(f"{name}: GELU approximation {gelu!r} is not one of {GELU_MODES}")
        codes = weight_codes(layer.weight_quantizer, layer.weight, name)
        if layer.in_features * 255 >= MAX_EXACT_FLOAT:
            raise ValueError(f"{name}: row sums could exceed 2^24 and lose exactness in float32")
        _check_weight_bound(codes, name)
        self.name = name
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.packed = torch.ops.onednn.qlinear_prepack(codes.codes, None)  # opaque; not a buffer
        self.register_buffer("w_scale", codes.scale)
        self.register_buffer("w_zero", torch.zeros(codes.scale.numel(), dtype=torch.int64))
        self.register_buffer("bias", float_bias(layer))
        self.has_offset = codes.has_offset
        self.register_buffer("neg_offset_scale", -codes.offset * codes.scale)
        self.packed_bytes = codes.codes.numel()
        self.input_quantizer = layer.input_quantizer
        self.gelu = gelu
        self.post_op = ("gelu", gelu) if gelu is not None and not self.has_offset else ("none", "")
        self.grid = GridCache()

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.name, self.in_features)
        grid = self.grid(self.input_quantizer)
        shape = torch.Size((x.numel() // self.in_features, self.in_features))
        op = torch.ops.onednn.qlinear_pointwise
        op = op.tensor if isinstance(grid.scale, Tensor) else op.default
        compiling = torch.compiler.is_compiling()
        if compiling:
            rows = traced_codes(x.reshape(shape), grid)
            codes = rows.to(torch.uint8)
        else:
            rows = activation_codes(x.reshape(shape), grid,
                                    SCRATCH.get("codes", shape, torch.float32, x.device, False))
            codes = SCRATCH.get("uint8", shape, torch.uint8, x.device, False).copy_(rows)
        attr, algorithm = self.post_op
        y = op(codes, grid.scale, _zero(grid), self.packed, self.w_scale, self.w_zero, self.bias, 1.0, 0,
               torch.float32, attr, [], algorithm)
        if self.has_offset:
            centred = rows.sum(dim=1, keepdim=True) - self.in_features * grid.zero_point
            y.addcmul_(centred, self.neg_offset_scale * grid.scale)
            if self.gelu == "tanh" and compiling:
                y = gelu_tanh_by_exp(y)
            elif self.gelu is not None:
                y = F.gelu(y, approximate=self.gelu)
        return y.reshape(*x.shape[:-1], self.out_features)


class OneDNNGELU(nn.Module):
    """Integer replacement of diffusers' feed-forward ``GELU`` (``proj``, then GELU): one int8 linear whose output
    is GELU'd by the kernel (``OneDNNLinear(gelu=...)``), so the block's widest float tensor is written once.

    ``proj`` keeps its name, so per-layer tables, the conversion record and ``held_weight_bytes`` see the same layer.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.approximate = module.approximate
        self.proj = OneDNNLinear(module.proj, f"{name}.proj", gelu=module.approximate)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.proj(hidden_states)


def fused_gelu(module: nn.Module) -> bool:
    """Whether ``module`` is a diffusers ``GELU`` whose GELU can run inside its quantized ``proj``'s int8 kernel.

    Only diffusers' own class (a subclass may change ``forward``), with a fake-quant ``proj`` and a GELU form oneDNN
    has; not when ``proj`` carries hooks, which would see the GELU'd output instead of the linear's.
    """
    from diffusers.models.activations import GELU

    if type(module) is not GELU or type(module.proj) is not QuantLinear or module.approximate not in GELU_MODES:
        return False
    return not any(getattr(module.proj, hooks) for hooks in FORWARD_HOOK_DICTS)


def cpu_int8_layer(module: nn.Module, name: str) -> nn.Module | None:
    """The int8 CPU replacement of a fake-quant layer, or ``None`` for a module this backend leaves alone."""
    kind = type(module)
    if kind is QuantConv2d:
        return OneDNNConv2d(module, name)
    if kind is SplitQuantConv2d:
        return OneDNNSplitConv2d(module, name)
    if kind is QuantLinear:
        return OneDNNLinear(module, name)
    if fused_gelu(module):
        return OneDNNGELU(module, name)
    return None
