"""Registries: model class → adapter, correction config type → correction class. No if-chains."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = [
    "register_adapter", "adapter_for", "registered_adapters", "register_correction", "correction_for",
    "registered_corrections",
]

T = TypeVar("T")
_ADAPTERS: dict[type[nn.Module], type] = {}
_CORRECTIONS: dict[type, type] = {}


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


def register_correction(config_type: type) -> Callable[[type[T]], type[T]]:
    """Class decorator: build the decorated ``Correction`` for configs of ``config_type`` (architecture.md §5).

    The config type is also registered with ``tadq.config.register_config_type`` so stacks save as JSON, and the
    correction class gets ``config_type`` as a class attribute.
    """
    from tadq.config import register_config_type  # tadq.config imports the adapters, which import this module

    register_config_type(config_type)

    def decorate(correction_class: type[T]) -> type[T]:
        known = _CORRECTIONS.get(config_type)
        if known is not None and known is not correction_class:
            raise ValueError(f"{config_type.__name__} is already handled by {known.__name__}")
        _CORRECTIONS[config_type] = correction_class
        correction_class.config_type = config_type  # type: ignore[attr-defined]
        return correction_class

    return decorate


def registered_corrections() -> dict[type, type]:
    """Config type → correction class for every registered correction (built-in ones included)."""
    import tadq.corrections  # noqa: F401  (registers the built-in corrections)

    return dict(_CORRECTIONS)


def correction_for(config: object):
    """A fresh (unfitted) correction for ``config``; raises ``TypeError`` listing the registered configs otherwise."""
    registry = registered_corrections()
    klass = registry.get(type(config))
    if klass is None:
        supported = ", ".join(sorted(k.__name__ for k in registry))
        raise TypeError(
            f"no tadq correction for {type(config).__name__}; registered: {supported}. "
            "Add one with @tadq.registry.register_correction(YourConfig)."
        )
    return klass(config)
