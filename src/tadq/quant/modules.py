"""Fake-quantized drop-in layers: ``QuantConv2d`` and ``QuantLinear``.

Each keeps the original ``weight``/``bias`` parameters and adds a per-output-channel ``weight_quantizer`` and a
per-tensor ``input_quantizer`` (the layer's input activation, as in docs/methods/qdiffusion.md). The weight
range is set at construction, from the weight itself; the input range needs calibration data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer
from tadq.quant.ranges import estimate_range

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayer", "quantize_module", "QUANT_LAYER_TYPES", "carry_forward_hooks"]

FORWARD_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                      "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


def carry_forward_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new``, the replacement of ``old`` in a model, the hook dicts of ``old`` (shared, so hooks and their
    handles keep working): forward hooks a user or tadq (TFMQ feature caches) registered on a layer must survive
    its swap for a quantized or integer layer, as they survive on every module that is not swapped."""
    for attribute in FORWARD_HOOK_DICTS:
        setattr(new, attribute, getattr(old, attribute))


class QuantLayer:
    """Shared behaviour of the fake-quant layers (a mixin over ``nn.Conv2d`` / ``nn.Linear``)."""

    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer
    input_channel_dim: int = -1  # the input dimension the layer reduces over (dynamic activation groups run along it)

    def _init_quantizers(self, weight_scheme: QScheme, activation_scheme: QScheme, init_weight_range: bool) -> None:
        self.weight_quantizer = Quantizer(weight_scheme, num_channels=self.weight.shape[0], kind="weight",
                                          row_size=self.weight[0].numel())
        self.input_quantizer = Quantizer(activation_scheme, kind="activation", channel_dim=self.input_channel_dim)
        if init_weight_range:
            self.init_weight_range()

    def init_weight_range(self) -> None:
        """Set the weight quantizer's range from the current weight (explicit; never done by a forward)."""
        if self.weight_quantizer.enabled:
            low, high = estimate_range(self.weight.detach(), self.weight_quantizer.scheme)
            self.weight_quantizer.set_range(low, high)

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def quantized_weights(self) -> dict[str, tuple[Quantizer, Tensor]]:
        """Every weight tensor this layer fake-quantizes, with its quantizer, keyed by parameter name.

        Saving and reconstruction walk this hook instead of assuming one ``weight``, so a layer with several
        quantized weights (or several quantizers over views of one weight) declares them here. A tensor may be a
        view of a parameter; loading writes the dequantized values through it.
        """
        return {"weight": (self.weight_quantizer, self.weight)}

    @torch.no_grad()
    def snap_weights_to_grid(self) -> None:
        """Replace each quantized weight by its fake-quant value Δ·(q − z), the values its artefact stores (a
        no-op on weights already on their grid, as loaded ones are)."""
        for quantizer, tensor in self.quantized_weights().values():
            if quantizer.enabled and bool(quantizer.initialized):
                tensor.copy_(quantizer(tensor))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        """``nn.Module``'s ``.to``/``.half()``/``.bfloat16()``, with the weights put on their grid first when the
        floating dtype changes: casting the FP weights kept beside the quantizers and quantizing them again in the
        lower precision moved codes across rounding boundaries, so ``qmodel.to(torch.bfloat16)`` sampled other
        bytes than the same model saved and loaded in bfloat16 (or sampled with ``dtype=``)."""
        probe = self.weight.new_empty(0)
        if fn(probe).dtype != probe.dtype:
            self.snap_weights_to_grid()
        return super()._apply(fn, recurse)


class QuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weight and input."""

    input_channel_dim = 1

    @classmethod
    def from_module(
        cls, module: nn.Conv2d, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
    ) -> QuantConv2d:
        """Wrap ``module`` (weights shared); ``init_weight_range=False`` skips the range search (loading sets it)."""
        layer = cls(  # on the meta device: the weights are the module's, and no random init draws from torch's RNG
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device="meta", dtype=module.weight.dtype,
        )
        layer.weight, layer.bias = module.weight, module.bias
        layer._init_quantizers(weight_scheme, activation_scheme, init_weight_range)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C, H, W) input, as nn.Conv2d takes it (channels are dim 1 below)
            return self.forward(x.unsqueeze(0)).squeeze(0)
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantLinear(QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weight and input."""

    @classmethod
    def from_module(
        cls, module: nn.Linear, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
    ) -> QuantLinear:
        """Wrap ``module`` (weights shared); ``init_weight_range=False`` skips the range search (loading sets it)."""
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None,
                    device="meta", dtype=module.weight.dtype)  # as QuantConv2d: no draw from torch's RNG
        layer.weight, layer.bias = module.weight, module.bias
        layer._init_quantizers(weight_scheme, activation_scheme, init_weight_range)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QUANT_LAYER_TYPES: dict[type[nn.Module], type[QuantLayer]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantize_module(
    module: nn.Module, weight_scheme: QScheme, activation_scheme: QScheme, *, init_weight_range: bool = True,
) -> nn.Module:
    """The fake-quant replacement of a supported layer (exact type match, so subclasses are not guessed at).

    ``init_weight_range=False`` leaves the weight quantizer unset, for callers that load saved ranges next.
    """
    target = QUANT_LAYER_TYPES.get(type(module))
    if target is None:
        supported = ", ".join(t.__name__ for t in QUANT_LAYER_TYPES)
        raise TypeError(f"cannot quantize {type(module).__name__}; supported layers: {supported}")
    return target.from_module(module, weight_scheme, activation_scheme, init_weight_range=init_weight_range)
