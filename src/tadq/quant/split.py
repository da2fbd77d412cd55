"""Q-Diffusion shortcut splitting: a decoder skip conv with separate quantizers for its two input halves.

In a decoder ResBlock the shortcut conv reads ``X = cat[h_deep, h_skip]`` (C1 deep channels, then the encoder's
skip features). The two halves have very different ranges (a bimodal histogram), so one per-tensor quantizer
wastes most of its grid on one of them. Splitting gives each half its own activation quantizer and its own
per-output-channel weight quantizer (docs/methods/qdiffusion.md#split-shortcuts):

    Y = conv(cat[Q_a1(X[:, :C1]), Q_a2(X[:, C1:])], cat[Q_w1(W[:, :C1]), Q_w2(W[:, C1:])])
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from tadq.quant.convert import LayerPlan
from tadq.quant.modules import QuantLayer, carry_forward_hooks
from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer, quantizers_bypassed
from tadq.quant.ranges import estimate_range

__all__ = ["SplitQuantConv2d", "apply_shortcut_split"]

logger = logging.getLogger(__name__)


class SplitQuantConv2d(QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input channels ``[:split]`` and ``[split:]`` are fake-quantized separately.

    It is a ``QuantLayer`` (it counts as one quantized layer), but it has two weight and two input quantizers
    instead of ``weight_quantizer`` / ``input_quantizer``; code that handles weights generically should go
    through ``quantized_weights()``.

    Attributes:
        split: C1, the number of leading (deep) input channels.
        weight_quantizer_deep: per-output-channel quantizer of ``W[:, :C1]``.
        weight_quantizer_skip: per-output-channel quantizer of ``W[:, C1:]``.
        input_quantizer_deep: per-tensor quantizer of ``X[:, :C1]``.
        input_quantizer_skip: per-tensor quantizer of ``X[:, C1:]``.
    """

    split: int
    weight_quantizer_deep: Quantizer
    weight_quantizer_skip: Quantizer
    input_quantizer_deep: Quantizer
    input_quantizer_skip: Quantizer

    @classmethod
    def from_module(
        cls, module: nn.Conv2d, split: int, weight_scheme: QScheme, activation_scheme: QScheme, *,
        init_weight_range: bool = True,
    ) -> SplitQuantConv2d:
        """Wrap ``module`` (an ``nn.Conv2d`` or a ``QuantConv2d``); its weight and bias are shared, not copied.

        Args:
            module: the shortcut conv; its own quantizers, if any, are dropped.
            split: C1, channels of the deep part, 0 < C1 < in_channels.
            weight_scheme: scheme of both weight halves (per output channel).
            activation_scheme: scheme of both input halves (per tensor).
            init_weight_range: set both weight ranges now; ``False`` when saved ranges are loaded next.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"shortcut splitting needs an nn.Conv2d, got {type(module).__name__}")
        if module.groups != 1:
            raise ValueError(f"shortcut splitting needs groups=1 (input channels are split), got {module.groups}")
        if not 0 < split < module.in_channels:
            raise ValueError(f"split must be in 1..{module.in_channels - 1} (the deep channels C1), got {split}")
        layer = cls(  # on the meta device, as QuantConv2d: the weights are the module's, no draw from torch's RNG
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
            padding=module.padding, dilation=module.dilation, groups=module.groups, bias=module.bias is not None,
            padding_mode=module.padding_mode, device="meta", dtype=module.weight.dtype,
        )
        layer.weight, layer.bias = module.weight, module.bias
        layer.split = split
        channels, taps = module.out_channels, module.weight[0, 0].numel()
        layer.weight_quantizer_deep = Quantizer(weight_scheme, num_channels=channels, kind="weight",
                                                row_size=split * taps)
        layer.weight_quantizer_skip = Quantizer(weight_scheme, num_channels=channels, kind="weight",
                                                row_size=(module.in_channels - split) * taps)
        layer.input_quantizer_deep = Quantizer(activation_scheme, kind="activation")
        layer.input_quantizer_skip = Quantizer(activation_scheme, kind="activation")
        if init_weight_range:
            layer.init_weight_range()
        return layer

    def quantized_weights(self) -> dict[str, tuple[Quantizer, Tensor]]:
        """Each weight quantizer with the view of the weight it quantizes (for reconstruction and save/load)."""
        return {
            "weight_deep": (self.weight_quantizer_deep, self.weight[:, : self.split]),  # (C_out, C1, kh, kw)
            "weight_skip": (self.weight_quantizer_skip, self.weight[:, self.split:]),  # (C_out, C_in − C1, kh, kw)
        }

    @torch.no_grad()
    def init_weight_range(self) -> None:
        """Set both weight ranges from the current weight halves (explicit; never done by a forward)."""
        for quantizer, weight in self.quantized_weights().values():
            if quantizer.enabled:
                quantizer.set_range(*estimate_range(weight.detach(), quantizer.scheme))

    def quantized_weight(self) -> Tensor:
        """The full fake-quant weight ``cat[Q_w1(W[:, :C1]), Q_w2(W[:, C1:])]`` (C_out, C_in, kh, kw)."""
        return torch.cat([quantizer(weight) for quantizer, weight in self.quantized_weights().values()], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # an unbatched (C_in, H, W) input, as nn.Conv2d takes it: x[:, :C1] would cut H
            return self.forward(x.unsqueeze(0)).squeeze(0)
        # x: (B, C_in, H, W) = cat[deep (B, C1, H, W), skip (B, C_in − C1, H, W)]
        x = torch.cat([self.input_quantizer_deep(x[:, : self.split]), self.input_quantizer_skip(x[:, self.split:])],
                      dim=1)
        return self._conv_forward(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split}"


def apply_shortcut_split(
    model: nn.Module, adapter, config, plans: list[LayerPlan], *, init_weight_range: bool = True,
) -> dict[str, int]:
    """Replace every quantized ``[deep | skip]`` shortcut conv with a ``SplitQuantConv2d`` (in place).

    A structural step (run after ``convert_layers``, before calibration): only layers the plan quantizes are
    split, with the plan's schemes; layers kept in FP stay as they are. Applying it twice changes nothing.

    Args:
        model: the converted model (the shortcut convs are already ``QuantConv2d``).
        adapter: its ``ModelAdapter`` (``concat_splits`` says where each input splits).
        config: the ``QuantConfig``; nothing happens unless ``config.split_shortcut``.
        plans: the layer plans of ``model``.
        init_weight_range: set the new weight ranges now; ``False`` when saved ranges are loaded next.

    Returns:
        ``{layer name: C1}`` of the split layers, for the quantization map.
    """
    if not config.split_shortcut:
        return {}
    quantized = {plan.name: plan for plan in plans if plan.quantized}
    with quantizers_bypassed(model):
        splits = adapter.concat_splits(model)
    applied: dict[str, int] = {}
    for name, split in splits.items():
        plan = quantized.get(name)
        if plan is None:
            logger.info("%s is kept in floating point; not split", name)
            continue
        module = model.get_submodule(name)
        if not (isinstance(module, SplitQuantConv2d) and module.split == split):
            layer = SplitQuantConv2d.from_module(module, split, plan.weights, plan.activations,
                                                 init_weight_range=init_weight_range)
            carry_forward_hooks(module, layer)
            model.set_submodule(name, layer)
        applied[name] = split
    return applied
