"""Registries: model class → adapter (and, later, correction config → correction). No if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["register_adapter", "adapter_for", "registered_adapters"]

T = TypeVar("T")
_ADAPTERS: dict[type[nn.Module], type] = {}


def register_adapter(model_class: type[nn.Module]) -> Callable[[type[T]], type[T]]:
    """Class decorator: use the decorated adapter for ``model_class`` (and its subclasses)."""

    def decorate(adapter_class: type[T]) -> type[T]:
        _ADAPTERS[model_class] = adapter_class
        return adapter_class

    return decorate


def registered_adapters() -> dict[type[nn.Module], type]:
    return dict(_ADAPTERS)


def adapter_for(model: nn.Module):
    """The adapter instance for ``model``; raises ``TypeError`` listing supported classes otherwise."""
    import tadq.adapters  # noqa: F401  (registers the built-in adapters)

    for klass in type(model).__mro__:
        if klass in _ADAPTERS:
            return _ADAPTERS[klass]()
    supported = ", ".join(sorted(k.__name__ for k in _ADAPTERS))
    raise TypeError(
        f"no tadq adapter for {type(model).__name__}; supported: {supported}. "
        "Add one with @tadq.registry.register_adapter(YourModelClass)."
    )
