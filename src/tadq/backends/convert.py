"""Swap every fake-quant layer of a model for a backend's integer layer, and record what stays in float."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tadq.quant.attention import QuantAttnProcessor
from tadq.quant.modules import QuantLayer, carry_forward_hooks

__all__ = ["LayerFactory", "convert_layers"]

LayerFactory = Callable[[nn.Module, str], "nn.Module | None"]

ATTENTION_NOTE = ("attention matmuls q·kᵀ and P·v: fake-quant operands multiplied in float32 (no int8 batched "
                  "matmul with a float output on this backend; at the shipped model's 16-64 tokens the matmuls are "
                  "a small share of the time)")


def convert_layers(model: nn.Module, factory: LayerFactory, backend: str) -> dict[str, dict[str, str]]:
    """Replace in place every layer ``factory`` converts; returns {"integer": {name: kind}, "float": {name: why}}.

    Every replacement is built before the first one is swapped in, so a refused layer leaves ``model`` as it was
    (``to_backend(..., inplace=True)`` on a model with a layer the backend refuses keeps a usable fake-quant model).
    A factory may replace a module that holds fake-quant layers (a fused feed-forward GELU): its descendants are
    not visited again, and each fake-quant layer inside is recorded under its own name, as the replacement's
    module at the same path.

    Raises:
        ValueError: a fake-quant layer the backend does not know (it would otherwise stay simulated unnoticed), or
            one its factory refuses (the message names it).
    """
    integer: dict[str, str] = {}
    floating: dict[str, str] = {}
    replacements: list[tuple[str, nn.Module, nn.Module]] = []
    replaced: list[str] = []  # prefixes "name." of modules replaced whole
    for name, module in list(model.named_modules()):
        if not name or name.startswith(tuple(replaced)):
            continue
        replacement = factory(module, name)
        if replacement is None:
            if isinstance(module, QuantLayer):
                raise ValueError(f"{name} is a {type(module).__name__}, which the {backend!r} backend cannot run "
                                 "in integers; use the 'fake' backend for this model")
            if isinstance(getattr(module, "processor", None), QuantAttnProcessor):
                floating[name] = ATTENTION_NOTE
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                floating[name] = "kept in floating point by the quantization plan"
            continue
        replacements.append((name, module, replacement))
        replaced.append(f"{name}.")
    for name, module, replacement in replacements:
        carry_forward_hooks(module, replacement)
        replacement.train(module.training)  # an eval model stays one: a new module is built in training mode
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        inner = [path for path, layer in module.named_modules() if path and isinstance(layer, QuantLayer)]
        if isinstance(module, QuantLayer) or not inner:
            integer[name] = type(replacement).__name__
        for path in inner:
            integer[f"{name}.{path}"] = type(replacement.get_submodule(path)).__name__
    return {"integer": integer, "float": floating}
