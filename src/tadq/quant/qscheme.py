"""Quantization schemes: how one tensor is mapped to integers, and the WxAy presets built from them.

Notation (docs/methods/notation.md): a b-bit uniform affine fake-quantizer with step Δ and integer zero point z is
``Q(x) = Δ·(clamp(round(x/Δ) + z, qmin, qmax) − z)``; asymmetric uses [0, 2^b − 1], symmetric z = 0 and
[−2^{b−1}, 2^{b−1} − 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["QScheme", "PRESETS", "preset", "RangeMethod", "Granularity"]

RangeMethod = Literal["minmax", "percentile", "mse"]
Granularity = Literal["per_tensor", "per_channel"]
MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class QScheme:
    """How one tensor (a weight or a layer's input activation) is fake-quantized.

    Args:
        bits: integer bit-width, 2..8, or ``None`` for "off" (the tensor stays in floating point).
        symmetric: zero point fixed at 0 (signed grid) instead of a fitted zero point (unsigned grid).
        granularity: one (Δ, z) per tensor, or one per output channel (dim 0; weights only).
        range_method: how the clipping range is chosen: ``minmax`` (observed extremes), ``percentile``
            (clip the tails), or ``mse`` (shrink the min/max range to minimise the Lp error; Q-Diffusion's
            ``scale_method='mse'``, docs/methods/qdiffusion.md#ranges).
        percentile: tail cut for ``percentile`` (99.99: keep all but the most extreme 0.01 %).
        mse_p: exponent of the Lp error for ``mse`` (2.4: Q-Diffusion / BRECQ).
        mse_grid: number of shrink factors tried for ``mse``, 1 − 0.01·i for i < grid (80: Q-Diffusion).
    """

    bits: int | None = 8
    symmetric: bool = False
    granularity: Granularity = "per_tensor"
    range_method: RangeMethod = "mse"
    percentile: float = 99.99
    mse_p: float = 2.4
    mse_grid: int = 80

    def __post_init__(self) -> None:
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} or None (off), got {self.bits!r}")
        if self.granularity not in ("per_tensor", "per_channel"):
            raise ValueError(f"granularity must be 'per_tensor' or 'per_channel', got {self.granularity!r}")
        if self.range_method not in ("minmax", "percentile", "mse"):
            raise ValueError(f"range_method must be 'minmax', 'percentile' or 'mse', got {self.range_method!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not 1 <= self.mse_grid <= 100:
            raise ValueError(f"mse_grid must be in 1..100 (shrink factors 1 - 0.01 i), got {self.mse_grid}")
        if self.mse_p <= 0:
            raise ValueError(f"mse_p must be > 0, got {self.mse_p}")

    @classmethod
    def off(cls) -> QScheme:
        """A scheme that leaves the tensor in floating point."""
        return cls(bits=None)

    @property
    def enabled(self) -> bool:
        return self.bits is not None

    @property
    def qmin(self) -> int:
        if self.bits is None:
            raise ValueError("an 'off' scheme has no integer grid")
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.bits is None:
            raise ValueError("an 'off' scheme has no integer grid")
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        if self.bits is None:
            return "off"
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}-{self.granularity}-{self.range_method}"


def _weights(bits: int) -> QScheme:
    return QScheme(bits=bits, symmetric=False, granularity="per_channel", range_method="mse")


def _activations(bits: int | None) -> QScheme:
    return QScheme(bits=bits, symmetric=False, granularity="per_tensor", range_method="mse")


PRESETS: dict[str, tuple[QScheme, QScheme]] = {
    "W8A8": (_weights(8), _activations(8)),
    "W4A8": (_weights(4), _activations(8)),
    "W4A4": (_weights(4), _activations(4)),
    "W4A16": (_weights(4), _activations(None)),
    "W8A16": (_weights(8), _activations(None)),
}


def preset(name: str) -> tuple[QScheme, QScheme]:
    """(weight scheme, activation scheme) of a named preset; ``W4A16`` means weight-only (activations in FP)."""
    key = name.upper()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[key]
