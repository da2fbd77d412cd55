"""Argument checks at the public entry points, so a wrong type is a ``TypeError`` naming the argument.

Without them a swapped argument surfaced deep inside as ``AttributeError: 'str' object has no attribute
'config'``, which says nothing about which argument was wrong.
"""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["expect", "expect_int", "expect_scheduler"]


def expect(value: Any, types: type | tuple[type, ...], name: str, where: str) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``types`` (bool is not accepted as an int)."""
    kinds = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        wanted = " or ".join(k.__name__ for k in kinds)
        raise TypeError(f"{where}: {name} must be a {wanted}, got {type(value).__name__} ({value!r:.60})")


def expect_int(value: Any, name: str, where: str) -> int:
    """``value`` as a Python ``int``: any integral number (a numpy integer from ``np.random`` or an array index is a
    common seed or count) but not a bool, a float or a tensor; ``TypeError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: {name} must be a int, got {type(value).__name__} ({value!r:.60})")
    return int(value)


def expect_scheduler(value: Any, where: str) -> None:
    """A diffusers scheduler (anything with a ``config`` mapping)."""
    config = getattr(value, "config", None)
    if not hasattr(config, "keys"):
        raise TypeError(f"{where}: scheduler must be a diffusers scheduler (the model's training scheduler, with a "
                        f".config), got {type(value).__name__}")
