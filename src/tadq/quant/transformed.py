"""Quantized layers with an input transform and a low-rank FP branch (smoothing, Hadamard rotation, SVDQuant).

    x̃ = H·(x / s)            smoothing s (state buffer ``smooth``), then the block Hadamard H (rebuilt from shape)
    y = Q_w(R)·Q_a(x̃) + U·(D·x̃) + b,    W·diag(s)·Hᵀ = U·D + R

With the quantizers bypassed, y equals the original layer's output (up to float rounding). The weight parameter
holds W·diag(s)·Hᵀ − U·D (the quantized residual); ``smooth``, ``lowrank_down`` (D) and ``lowrank_up`` (U) are
float buffers, so the artefact stores them beside the residual's integer codes and loading rebuilds the same
layer from the schemes (which carry ``smoothing``, ``rotation`` and ``lowrank_rank``). These classes are distinct
from ``QuantConv2d`` / ``QuantLinear`` so that integer backends, which match exact types, refuse them instead of
silently dropping the branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.quant.lowrank import effective_rank
from tadq.quant.modules import QuantConv2d, QuantLayer, QuantLinear, quantize_module
from tadq.quant.qscheme import QScheme
from tadq.quant.rotation import fold_rotation, rotate_channels
from tadq.quant.smoothing import smooth_input

__all__ = ["TransformedQuantLayer", "TransformedQuantConv2d", "TransformedQuantLinear", "quantize_layer"]


class TransformedQuantLayer(QuantLayer):
    """Mixin: the input transform and low-rank branch shared by the conv and linear variants."""

    rotate: bool
    rank: int

    @classmethod
    def from_module(
        cls, module: nn.Module, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
    ) -> TransformedQuantLayer:
        """The plain layer's ``from_module`` (the next class in the MRO: ``QuantConv2d`` or ``QuantLinear``), then the
        transforms registered and the rotation folded before the weight range is searched, so that range is the one
        of the weight the layer quantizes (``init_weight_range=False`` skips the search: loading sets it)."""
        layer = super().from_module(module, weight_scheme, activation_scheme, init_weight_range=False)
        layer._init_transforms(weight_scheme, activation_scheme)
        if init_weight_range:
            layer.init_weight_range()
        return layer

    def _init_transforms(self, weight_scheme: QScheme, activation_scheme: QScheme) -> None:
        """Register the (identity) smoothing vector and (zero) branch, and fold the rotation into the weight.

        Folding always runs: on loading, the weight it produces is overwritten by the saved (already folded) one.
        """
        weight = self.weight
        channels = weight.shape[1]
        if activation_scheme.smoothing:
            self.register_buffer("smooth", torch.ones(channels, dtype=weight.dtype, device=weight.device))
        else:
            self.smooth = None
        self.rotate = activation_scheme.rotation == "hadamard"
        reduction = int(weight[0].numel())
        self.rank = effective_rank(weight.shape[0], reduction, weight_scheme.lowrank_rank)
        if self.rank:
            self.register_buffer("lowrank_down", weight.new_zeros(self.rank, *weight.shape[1:]))
            self.register_buffer("lowrank_up", weight.new_zeros(weight.shape[0], self.rank))
        if self.rotate:  # a new Parameter: the FP model's tensor is never changed in place
            self.weight = nn.Parameter(fold_rotation(weight.detach()), requires_grad=weight.requires_grad)

    def transform_input(self, x: Tensor) -> Tensor:
        """x̃ = H·(x / s): what the input quantizer and the low-rank branch see."""
        if self.smooth is not None:
            x = smooth_input(x, self.smooth, self.input_channel_dim)
        if self.rotate:
            x = rotate_channels(x, self.input_channel_dim)
        return x

    def input_transform_of_weight(self, weight: Tensor) -> Tensor:
        """W·diag(s)·Hᵀ for an original-basis weight (what the layer's weight and branch together represent)."""
        if self.smooth is not None:
            weight = weight * self.smooth.reshape(1, -1, *([1] * (weight.dim() - 2)))
        return fold_rotation(weight) if self.rotate else weight

    def lowrank_branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def effective_weight(self) -> Tensor:
        """The un-quantized weight the layer represents in the transformed basis: residual + U·D."""
        weight = self.weight
        if self.rank:
            weight = weight + (self.lowrank_up @ self.lowrank_down.reshape(self.rank, -1)).reshape(weight.shape)
        return weight

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        if self.smooth is not None:
            parts.append("smooth")
        if self.rotate:
            parts.append("hadamard")
        if self.rank:
            parts.append(f"lowrank={self.rank}")
        return ", ".join(parts)


class TransformedQuantConv2d(TransformedQuantLayer, QuantConv2d):
    """``QuantConv2d`` with smoothing / rotation of its input channels and a low-rank FP branch."""

    @classmethod
    def from_module(
        cls, module: nn.Conv2d, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
    ) -> TransformedQuantConv2d:
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"smoothing, rotation and low-rank branches need a dense zero-padded conv; this one has "
                             f"groups={module.groups}, padding_mode={module.padding_mode!r} (exclude it)")
        return super().from_module(module, weight_scheme, activation_scheme,
                                   init_weight_range=init_weight_range)

    def lowrank_branch(self, x: Tensor) -> Tensor:
        down = F.conv2d(x, self.lowrank_down, None, self.stride, self.padding, self.dilation)
        return F.conv2d(down, self.lowrank_up[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input: smoothing and rotation run along dim 1, the channels
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x = self.transform_input(x)
        y = self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return y + self.lowrank_branch(x) if self.rank else y


class TransformedQuantLinear(TransformedQuantLayer, QuantLinear):
    """``QuantLinear`` with smoothing / rotation of its input features and a low-rank FP branch."""

    def lowrank_branch(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lowrank_down), self.lowrank_up)

    def forward(self, x: Tensor) -> Tensor:
        x = self.transform_input(x)
        y = F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)
        return y + self.lowrank_branch(x) if self.rank else y


_TRANSFORMED: dict[type[nn.Module], type[TransformedQuantLayer]] = {
    nn.Conv2d: TransformedQuantConv2d, nn.Linear: TransformedQuantLinear,
}


def quantize_layer(
    module: nn.Module, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
) -> nn.Module:
    """``quantize_module``, or its transformed variant when the schemes ask for smoothing, rotation or a branch."""
    if (weight_scheme.transforms or activation_scheme.transforms) and type(module) in _TRANSFORMED:
        return _TRANSFORMED[type(module)].from_module(module, weight_scheme, activation_scheme,
                                                      init_weight_range=init_weight_range)
    return quantize_module(module, weight_scheme, activation_scheme, init_weight_range=init_weight_range)
