"""Every field of a registered config checked against its type hint, before the class's own checks.

Configs arrive from hand-written JSON recipes and ``--set PATH=VALUE`` as much as from Python, and range checks
alone let the wrong kinds through: ``x < 0`` is False for NaN, ``"yes"`` is truthy, ``2.5`` passed ``n < 1`` and
failed deep inside quantization, a string ``exclude`` was split into characters. ``check_config_fields`` refuses
those with a ``ValueError`` naming ``Class.field``, and normalises what JSON cannot distinguish: an int given for a
float field becomes a float (so equal configs write equal JSON and equal cache keys), a list for a tuple a tuple.
Type hints this module cannot resolve, ``Any`` and ``Literal`` choices (each class names its accepted values
itself) are left to the class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import sys
import types
import typing
from typing import Any

__all__ = ["check_config_fields"]


def _resolved_hints(cls: type) -> dict[str, Any]:
    """Field name → evaluated type hint, each in the module of the class that declared it; unresolvable ones
    (names imported only for type checking) are skipped."""
    hints: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        owner = next((k for k in cls.__mro__ if field.name in k.__dict__.get("__annotations__", {})), cls)
        annotation = owner.__dict__["__annotations__"][field.name]
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, vars(sys.modules[owner.__module__]))  # noqa: S307 (own source)
            except Exception:  # a name only imported under TYPE_CHECKING: the class checks the field itself
                continue
        hints[field.name] = annotation
    return hints


_hints = functools.cache(_resolved_hints)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against ``hint`` (converted where JSON blurs the kinds); ``ValueError`` naming ``where``."""
    if hint is Any or hint is object:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where} must be {_describe(hint)}, got {value!r:.80}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False, got {value!r:.80}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{where} must be an int, got {value!r:.80}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r:.80}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r:.80}")
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):  # "conv_in" is no tuple
            raise ValueError(f"{where} must be a list, got {value!r:.80}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0], f"{where}[{index}]") for index, item in enumerate(value))
        if args and len(value) != len(args):
            raise ValueError(f"{where} must hold {len(args)} items, got {value!r:.80}")
        return tuple(value) if not args else tuple(
            _coerce(item, arg, f"{where}[{index}]") for index, (item, arg) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r:.80}")
        return value
    if isinstance(hint, type):
        if not isinstance(value, hint):
            kind = "a config object" if dataclasses.is_dataclass(hint) else "an instance"
            raise ValueError(f"{where} must be {kind} of {hint.__name__}, got {value!r:.80}")
        return value
    return value  # another construct (a Callable, a TypeVar): the class's own business


def check_config_fields(config: Any) -> None:
    """Check every field of the dataclass ``config`` against its type hint, in place (a frozen dataclass's fields
    are replaced by their normalised values); ``ValueError`` naming ``Class.field`` on the first mismatch."""
    cls = type(config)
    for name, hint in _hints(cls).items():
        value = getattr(config, name)
        normalised = _coerce(value, hint, f"{cls.__name__}.{name}")
        if normalised is not value:
            object.__setattr__(config, name, normalised)
