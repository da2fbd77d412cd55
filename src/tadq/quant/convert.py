"""Swap a model's layers for fake-quant layers, chosen by adapter roles and name patterns (never positions)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fnmatch import fnmatchcase

from torch import nn

from tadq.adapters.base import LayerInfo
from tadq.quant.modules import carry_forward_hooks
from tadq.quant.qscheme import QScheme
from tadq.quant.transformed import quantize_layer

__all__ = ["LayerPlan", "plan_layers", "convert_layers", "check_roles_present"]


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one layer: quantized with these schemes, or kept in floating point (and why)."""

    name: str
    role: str
    weights: QScheme
    activations: QScheme
    quantized: bool
    reason: str = ""
    split: int | None = None  # channels of the deep part when the input is split (shortcut splitting)

    def to_json(self) -> dict:
        return {
            "role": self.role, "quantized": self.quantized, "reason": self.reason,
            "weights": self.weights.describe() if self.quantized else "fp",
            "activations": self.activations.describe() if self.quantized else "fp",
            **({"split_deep_channels": self.split} if self.split is not None else {}),
        }


def plan_layers(
    layers: list[LayerInfo], weights: QScheme, activations: QScheme,
    exclude: tuple[str, ...] = (), keep_fp_roles: tuple[str, ...] = (),
    layer_bits: tuple[tuple[str, int, int | None], ...] = (),
) -> list[LayerPlan]:
    """Decide per layer; exclusion by role or fnmatch pattern is recorded in ``reason``.

    ``layer_bits`` (``QuantConfig.layer_bits``): (name, weight bits, activation bits) of layers that get the
    given schemes with other bits (mixed precision); activation bits ``None`` keep ``activations``.

    Raises:
        ValueError: an ``exclude`` pattern matches no layer (a typo would otherwise silently quantize everything),
            or a ``layer_bits`` name is not a quantized layer (its bits would otherwise silently not apply).
    """
    unmatched = [p for p in exclude if not any(fnmatchcase(info.name, p) for info in layers)]
    if unmatched:
        examples = ", ".join(info.name for info in layers[:4])
        raise ValueError(f"exclude patterns {unmatched} match no quantizable layer (names look like: {examples}, ...)")
    overrides = {name: (weight_bits, activation_bits) for name, weight_bits, activation_bits in layer_bits}
    plans = []
    for info in layers:
        reason = ""
        if info.role in keep_fp_roles:
            reason = f"role {info.role} kept in FP"
        elif any(fnmatchcase(info.name, pattern) for pattern in exclude):
            reason = "excluded by pattern"
        layer_weights, layer_activations = weights, activations
        if not reason and info.name in overrides:
            weight_bits, activation_bits = overrides.pop(info.name)
            layer_weights = replace(weights, bits=weight_bits)
            if activation_bits is not None:
                layer_activations = replace(activations, bits=activation_bits)
        plans.append(LayerPlan(info.name, info.role, layer_weights, layer_activations, quantized=not reason,
                               reason=reason))
    if overrides:
        quantized = [plan.name for plan in plans if plan.quantized]
        raise ValueError(f"layer_bits names {sorted(overrides)}, which are not quantized layers of this model "
                         f"(kept in FP or absent; quantized layers look like: {', '.join(quantized[:4])}, ...)")
    return plans


def check_roles_present(layers: list[LayerInfo], roles: tuple[str, ...], what: str = "keep_fp_roles") -> None:
    """Refuse ``roles`` (asked for by name, e.g. ``--keep-fp-role``) that no quantizable layer has: keeping an
    absent role in floating point keeps nothing, and the model was quantized whole without a word. Not applied to
    ``FP_LAYER_PRESETS`` keys, which name a convention across model families."""
    present = {info.role for info in layers}
    missing = [role for role in roles if role not in present]
    if missing:
        raise ValueError(f"{what} {missing}: no quantizable layer of this model has that role, so nothing would be "
                         f"kept in floating point; its roles are {sorted(present)} (or --exclude layer names)")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def convert_layers(model: nn.Module, plans: list[LayerPlan], *, init_weight_range: bool = True) -> nn.Module:
    """Replace every planned-quantized layer in place (weights are shared, not copied); returns ``model``.

    ``init_weight_range=False`` skips the weight-range search, which loading a saved artefact overwrites anyway.
    Forward hooks registered on a layer move to its replacement (they were dropped without a word).
    """
    for plan in plans:
        if plan.quantized:
            module = model.get_submodule(plan.name)
            layer = quantize_layer(module, plan.weights, plan.activations, init_weight_range=init_weight_range)
            carry_forward_hooks(module, layer)
            _set_submodule(model, plan.name, layer)
    return model
