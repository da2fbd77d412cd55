"""Quantization schemes: how one tensor is mapped to integers, and the WxAy presets built from them.

Notation (docs/methods/notation.md): a b-bit uniform affine fake-quantizer with step Δ and integer zero point z is
``Q(x) = Δ·(clamp(round(x/Δ) + z, qmin, qmax) − z)``; asymmetric uses [0, 2^b − 1], symmetric z = 0 and
[−2^{b−1}, 2^{b−1} − 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["QScheme", "PRESETS", "preset", "preset_key", "RangeMethod", "Granularity"]

RangeMethod = Literal["minmax", "percentile", "mse"]
Granularity = Literal["per_tensor", "per_channel", "per_token", "per_group"]
Rotation = Literal["none", "hadamard"]
MIN_BITS, MAX_BITS = 2, 8
DYNAMIC_GRANULARITIES = ("per_token", "per_group")
"""Granularities whose (Δ, z) are computed from each tensor at run time (activations only, min/max)."""


@dataclass(frozen=True)
class QScheme:
    """How one tensor (a weight or a layer's input activation) is fake-quantized.

    Args:
        bits: integer bit-width, 2..8, or ``None`` for "off" (the tensor stays in floating point).
        symmetric: zero point fixed at 0 (signed grid) instead of a fitted zero point (unsigned grid).
        granularity: one (Δ, z) per tensor (static); one per output channel (dim 0; weights only); or, for
            activations, dynamic (computed from the tensor itself at run time, min/max): ``per_token`` (one per
            token of a linear input, one per pixel of a conv input) or ``per_group`` (one per ``group_size``
            consecutive channels of a token/pixel: groups along the reduction dimension). What an integer kernel
            can run of each is in ``tadq.quant.granularity.kernel_status``.
        range_method: how the clipping range is chosen: ``minmax`` (observed extremes), ``percentile``
            (clip the tails), or ``mse`` (shrink the min/max range to minimise the Lp error; Q-Diffusion's
            ``scale_method='mse'``, docs/methods/qdiffusion.md#ranges).
        percentile: tail cut for ``percentile`` (99.99: keep all but the most extreme 0.01 %).
        mse_p: exponent of the Lp error for ``mse`` (2.4: Q-Diffusion / BRECQ).
        mse_grid: number of shrink factors tried for ``mse``, 1 − 0.01·i for i < grid (80: Q-Diffusion).
        group_size: channels per group of ``per_group`` (64: SVDQuant); a last, shorter group takes the rest.
        smoothing: (activation scheme) divide the layer input by a per-channel factor folded into the weight
            (SmoothQuant/SVDQuant migration, strength searched per layer by ``SVDQuantMethod``).
        rotation: (activation scheme) ``hadamard``: rotate the layer input over its channels by a (block)
            Hadamard matrix H, folded into the weight as W·Hᵀ; the activation side is applied online.
        lowrank_rank: (weight scheme) rank of a floating-point low-rank branch split off the weight before it is
            quantized (SVDQuant); 0 = none. Capped per layer at half of min(out, in·kh·kw).

    The last four fields are structural: loading rebuilds the layers they describe, so they live in the schemes
    the artefact records. Their defaults leave every existing layer as it was.
    """

    bits: int | None = 8
    symmetric: bool = False
    granularity: Granularity = "per_tensor"
    range_method: RangeMethod = "mse"
    percentile: float = 99.99
    mse_p: float = 2.4
    mse_grid: int = 80
    group_size: int = 64
    smoothing: bool = False
    rotation: Rotation = "none"
    lowrank_rank: int = 0

    def __post_init__(self) -> None:
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} or None (off), got {self.bits!r}")
        if self.granularity not in ("per_tensor", "per_channel", *DYNAMIC_GRANULARITIES):
            raise ValueError("granularity must be 'per_tensor', 'per_channel', 'per_token' or 'per_group', got "
                             f"{self.granularity!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        if self.rotation not in ("none", "hadamard"):
            raise ValueError(f"rotation must be 'none' or 'hadamard', got {self.rotation!r}")
        if isinstance(self.lowrank_rank, bool) or not isinstance(self.lowrank_rank, int) or self.lowrank_rank < 0:
            raise ValueError(f"lowrank_rank must be an integer >= 0, got {self.lowrank_rank!r}")
        if not isinstance(self.smoothing, bool):
            raise ValueError(f"smoothing must be true or false, got {self.smoothing!r}")
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
    def dynamic(self) -> bool:
        """Whether (Δ, z) come from each tensor at run time (``per_token`` / ``per_group``) instead of calibration."""
        return self.granularity in DYNAMIC_GRANULARITIES

    @property
    def transforms(self) -> bool:
        """Whether this scheme asks for a layer-input transform or a low-rank branch (a transformed layer)."""
        return self.smoothing or self.rotation != "none" or self.lowrank_rank > 0

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
        if self.dynamic:  # min/max of each token or group at run time: the range method does not apply
            size = f"{self.group_size}" if self.granularity == "per_group" else ""
            text = f"int{self.bits}-{kind}-{self.granularity}{size}-dynamic"
        else:
            text = f"int{self.bits}-{kind}-{self.granularity}-{self.range_method}"
        extras = [name for name, on in (("smooth", self.smoothing), (self.rotation, self.rotation != "none"),
                                        (f"lowrank{self.lowrank_rank}", self.lowrank_rank > 0)) if on]
        return "+".join([text, *extras])


def _weights(bits: int, symmetric: bool = False) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, granularity="per_channel", range_method="mse")


def _activations(bits: int | None) -> QScheme:
    return QScheme(bits=bits, symmetric=False, granularity="per_tensor", range_method="mse")


PRESETS: dict[str, tuple[QScheme, QScheme]] = {
    "W8A8": (_weights(8), _activations(8)),
    "W4A8": (_weights(4), _activations(8)),
    "W4A4": (_weights(4), _activations(4)),
    "W4A16": (_weights(4), _activations(None)),
    "W8A16": (_weights(8), _activations(None)),
    # symmetric 8-bit weights: C − z fits int8, so integer kernels need no weight-offset correction (faster int8
    # execution at a measured quality cost, docs/backends.md#symmetric-8-bit-weights-w8a8-wsym)
    "W8A8-WSYM": (_weights(8, symmetric=True), _activations(8)),
}


def preset_key(name: str) -> str:
    """The key of a preset name in ``PRESETS``: case and surrounding blanks ignored, as the comma lists of ``tadq run``
    / ``tadq bench`` and recipe files read them (``--preset " w4a8"`` was refused by ``tadq quantize`` alone)."""
    if not isinstance(name, str):
        raise TypeError(f"a preset name is a string such as 'W4A8', got {type(name).__name__} {name!r}")
    key = name.strip().upper()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return key


def preset(name: str) -> tuple[QScheme, QScheme]:
    """(weight scheme, activation scheme) of a named preset; ``W4A16`` means weight-only (activations in FP),
    ``-WSYM`` symmetric weights (activations keep their asymmetric grid)."""
    return PRESETS[preset_key(name)]
