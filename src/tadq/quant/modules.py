"""Fake-quantized drop-in layers: ``QuantConv2d`` and ``QuantLinear``.

Each keeps the original ``weight``/``bias`` parameters and adds a per-output-channel ``weight_quantizer`` and a
per-tensor ``input_quantizer`` (the layer's input activation, as in Q-Diffusion, methods.md §1 B1.1). The weight
range is set at construction, from the weight itself; the input range needs calibration data.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer
from tadq.quant.ranges import estimate_range

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayer", "quantize_module", "QUANT_LAYER_TYPES"]


class QuantLayer:
    """Shared behaviour of the fake-quant layers (a mixin over ``nn.Conv2d`` / ``nn.Linear``)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer

    def _init_quantizers(self, weight_scheme: QScheme, activation_scheme: QScheme) -> None:
        self.weight_quantizer = Quantizer(weight_scheme, num_channels=self.weight.shape[0], kind="weight")
        self.input_quantizer = Quantizer(activation_scheme, kind="activation")
        self.init_weight_range()

    def init_weight_range(self) -> None:
        """Set the weight quantizer's range from the current weight (explicit; never done by a forward)."""
        if self.weight_quantizer.enabled:
            low, high = estimate_range(self.weight.detach(), self.weight_quantizer.scheme)
            self.weight_quantizer.set_range(low, high)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    @classmethod
    def from_module(cls, module: nn.Conv2d, weight_scheme: QScheme, activation_scheme: QScheme) -> QuantConv2d:
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device=module.weight.device, dtype=module.weight.dtype,
        )
        layer.weight, layer.bias = module.weight, module.bias
        layer._init_quantizers(weight_scheme, activation_scheme)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    @classmethod
    def from_module(cls, module: nn.Linear, weight_scheme: QScheme, activation_scheme: QScheme) -> QuantLinear:
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    device=module.weight.device, dtype=module.weight.dtype)
        layer.weight, layer.bias = module.weight, module.bias
        layer._init_quantizers(weight_scheme, activation_scheme)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANT_LAYER_TYPES: dict[type[nn.Module], type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantize_module(module: nn.Module, weight_scheme: QScheme, activation_scheme: QScheme) -> nn.Module:
    """The fake-quant replacement of a supported layer (exact type match, so subclasses are not guessed at)."""
    target = QUANT_LAYER_TYPES.get(type(module))
    if target is None:
        supported = ", ".join(t.__name__ for t in QUANT_LAYER_TYPES)
        raise TypeError(f"cannot quantize {type(module).__name__}; supported layers: {supported}")
    return target.from_module(module, weight_scheme, activation_scheme)
