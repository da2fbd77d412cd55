"""Quantization schemes: how one tensor is mapped to integers, and the WxAy presets built from them.

Notation (docs/methods/notation.md): a b-bit uniform affine fake-quantizer with step Δ and integer zero point z is
``Q(x) = Δ·(clamp(round(x/Δ) + z, qmin, qmax) − z)``; asymmetric uses [0, 2^b − 1], symmetric z = 0 and
[−2^{b−1}, 2^{b−1} − 1]. An fp8 activation format (``QScheme.format``) replaces the integer grid by an 8-bit float's:
``Q(x) = s·fp8(clamp(x/s, −M, M))`` with one static scale s per tensor and M the format's largest finite value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from tadq.names import BLOCK_SUFFIX, preset_key

__all__ = ["QScheme", "PRESETS", "BLOCK_SUFFIX", "preset", "preset_key", "RangeMethod", "Granularity", "NumberFormat",
           "FP8_FORMATS"]

RangeMethod = Literal["minmax", "percentile", "mse"]
Granularity = Literal["per_tensor", "per_channel", "per_block", "per_token", "per_group"]
Rotation = Literal["none", "hadamard"]
NumberFormat = Literal["int", "fp8_e4m3", "fp8_e5m2"]
FP8_FORMATS: dict[str, tuple[str, float]] = {"fp8_e4m3": ("float8_e4m3fn", 448.0),
                                             "fp8_e5m2": ("float8_e5m2", 57344.0)}
"""fp8 format → (its ``torch`` dtype's name, its largest finite value M): E4M3 as OCP/NVIDIA define it (no
infinities, M = 448), E5M2 (IEEE-like, M = 57344)."""
FP8_TORCH = "2.1"  # the first torch release with torch.float8_e4m3fn / torch.float8_e5m2
MIN_BITS, MAX_BITS = 2, 8
DYNAMIC_GRANULARITIES = ("per_token", "per_group")
"""Granularities whose (Δ, z) are computed from each tensor at run time (activations only, min/max)."""


@dataclass(frozen=True)
class QScheme:
    """How one tensor (a weight or a layer's input activation) is fake-quantized.

    Args:
        bits: integer bit-width, 2..8, or ``None`` for "off" (the tensor stays in floating point).
        symmetric: zero point fixed at 0 (signed grid) instead of a fitted zero point (unsigned grid).
        granularity: one (Δ, z) per tensor (static); one per output channel (dim 0; weights only); one per block
            of ``group_size`` consecutive weights of each output row in ``weight.flatten(1)`` order (``per_block``,
            static, weights only: group-wise weights as GPTQ/AWQ use them; a 3×3 conv's row runs over input
            channels, then kernel rows and columns, so a block of 3 is one kernel row of one input channel, a block
            of 9·g is g input channels; a last, shorter block takes the rest of a row); or, for
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
        group_size: channels per group of ``per_group`` (64: SVDQuant), weights per block of ``per_block``; a
            last, shorter group takes the rest.
        smoothing: (activation scheme) divide the layer input by a per-channel factor folded into the weight
            (SmoothQuant/SVDQuant migration, strength searched per layer by ``SVDQuantMethod``).
        rotation: (activation scheme) ``hadamard``: rotate the layer input over its channels by a (block)
            Hadamard matrix H, folded into the weight as W·Hᵀ; the activation side is applied online.
        lowrank_rank: (weight scheme) rank of a floating-point low-rank branch split off the weight before it is
            quantized (SVDQuant); 0 = none. Capped per layer at half of min(out, in·kh·kw).
        format: (activation scheme) the number format of the quantized values: ``"int"`` (the b-bit integer grid
            above) or an 8-bit float, ``"fp8_e4m3"`` (ModelOpt's FP8 activations) or ``"fp8_e5m2"``: one static
            scale s per tensor, s = amax / M with amax the range method's largest magnitude (``minmax``: observed;
            ``mse``/``percentile``: shrunk/clipped as for the integer grid) and M the format's largest finite
            value (``FP8_FORMATS``), and ``Q(x) = s·fp8(clamp(x/s, −M, M))``. fp8 carries its own sign: it needs
            ``bits=8``, ``symmetric=True`` and ``granularity="per_tensor"``; fp8 weights and dynamic fp8
            granularities are not implemented. A simulation (cast to torch's fp8 dtype and back, in float32); no
            backend runs fp8 matmuls.

    ``smoothing``, ``rotation``, ``lowrank_rank`` and ``format`` are structural: loading rebuilds the layers they
    describe, so they live in the schemes the artefact records. Their defaults leave every existing layer as it was;
    ``format`` is written only when it is not ``"int"`` (``written_when_set``), so every scheme without it serializes,
    and keys caches and artefacts, exactly as before the field existed.
    """

    written_when_set: ClassVar[tuple[str, ...]] = ("format",)

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
    format: NumberFormat = "int"

    def __post_init__(self) -> None:
        if self.bits is not None and (
            isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS
        ):
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS} or None (off), got {self.bits!r}")
        if self.granularity not in ("per_tensor", "per_channel", "per_block", *DYNAMIC_GRANULARITIES):
            raise ValueError("granularity must be 'per_tensor', 'per_channel', 'per_block', 'per_token' or "
                             f"'per_group', got {self.granularity!r}")
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
        self._check_format()

    def _check_format(self) -> None:
        """An fp8 format: 8 bits, its own sign (symmetric), one static per-tensor scale, and a torch that has it."""
        if self.format == "int":
            return
        if self.format not in FP8_FORMATS:
            raise ValueError(f"format must be 'int' or one of {sorted(FP8_FORMATS)}, got {self.format!r}")
        if self.bits != 8:
            raise ValueError(f"format {self.format!r} is an 8-bit float: bits must be 8, got {self.bits!r} (an "
                             "'off' scheme keeps format 'int')")
        if not self.symmetric:
            raise ValueError(f"format {self.format!r} carries its own sign bit: its grid is symmetric around 0 with "
                             "no zero point; set symmetric=True")
        if self.granularity != "per_tensor":
            raise ValueError(f"format {self.format!r} is implemented with one static scale per tensor "
                             f"(granularity='per_tensor'), got {self.granularity!r}: fp8 weights (per_channel) and "
                             "dynamic fp8 activations are not implemented")
        dtype_name = FP8_FORMATS[self.format][0]
        if getattr(torch, dtype_name, None) is None:
            raise ValueError(f"format {self.format!r} needs torch.{dtype_name}, which this torch "
                             f"({torch.__version__}) lacks: install torch >= {FP8_TORCH}")

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

    def block_count(self, row_size: int) -> int:
        """Blocks of ``per_block`` in one output row of ``row_size`` weights: ⌈row_size / group_size⌉."""
        return -(-row_size // self.group_size)

    @property
    def transforms(self) -> bool:
        """Whether this scheme asks for a layer-input transform or a low-rank branch (a transformed layer)."""
        return self.smoothing or self.rotation != "none" or self.lowrank_rank > 0

    @property
    def fp8(self) -> bool:
        """Whether the values are quantized to an 8-bit float (``format``) instead of the integer grid."""
        return self.format != "int"

    @property
    def fp8_dtype(self) -> torch.dtype:
        """torch's dtype of the fp8 format (checked to exist when the scheme was made)."""
        if not self.fp8:
            raise ValueError(f"an integer scheme ({self.describe()}) has no fp8 format")
        return getattr(torch, FP8_FORMATS[self.format][0])

    @property
    def fp8_max(self) -> float:
        """M, the fp8 format's largest finite value (448 for E4M3): s = amax / M."""
        if not self.fp8:
            raise ValueError(f"an integer scheme ({self.describe()}) has no fp8 format")
        return FP8_FORMATS[self.format][1]

    def _integer_grid(self) -> None:
        if self.bits is None:
            raise ValueError("an 'off' scheme has no integer grid")
        if self.fp8:
            raise ValueError(f"an {self.format} scheme has no integer grid (its values are 8-bit floats times a "
                             "scale); this operation supports integer schemes only")

    @property
    def qmin(self) -> int:
        self._integer_grid()
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        self._integer_grid()
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        if self.bits is None:
            return "off"
        kind = "sym" if self.symmetric else "asym"
        if self.fp8:  # symmetric and static per tensor by construction
            text = f"{self.format}-{self.granularity}-{self.range_method}"
        elif self.dynamic:  # min/max of each token or group at run time: the range method does not apply
            size = f"{self.group_size}" if self.granularity == "per_group" else ""
            text = f"int{self.bits}-{kind}-{self.granularity}{size}-dynamic"
        elif self.granularity == "per_block":
            text = f"int{self.bits}-{kind}-per_block{self.group_size}-{self.range_method}"
        else:
            text = f"int{self.bits}-{kind}-{self.granularity}-{self.range_method}"
        extras = [name for name, on in (("smooth", self.smoothing), (self.rotation, self.rotation != "none"),
                                        (f"lowrank{self.lowrank_rank}", self.lowrank_rank > 0)) if on]
        return "+".join([text, *extras])


def _weights(bits: int, symmetric: bool = False) -> QScheme:
    return QScheme(bits=bits, symmetric=symmetric, granularity="per_channel", range_method="mse")


def _activations(bits: int | None) -> QScheme:
    return QScheme(bits=bits, symmetric=False, granularity="per_tensor", range_method="mse")


def _fp8_activations() -> QScheme:
    return QScheme(bits=8, symmetric=True, granularity="per_tensor", range_method="mse", format="fp8_e4m3")


PRESETS: dict[str, tuple[QScheme, QScheme]] = {
    "W8A8": (_weights(8), _activations(8)),
    "W4A8": (_weights(4), _activations(8)),
    "W4A4": (_weights(4), _activations(4)),
    "W4A16": (_weights(4), _activations(None)),
    "W8A16": (_weights(8), _activations(None)),
    # symmetric 8-bit weights: C − z fits int8, so integer kernels need no weight-offset correction (faster int8
    # execution at a measured quality cost, docs/backends.md#symmetric-8-bit-weights-w8a8-wsym)
    "W8A8-WSYM": (_weights(8, symmetric=True), _activations(8)),
    # FP8 (E4M3) activations, one static MSE-searched scale per tensor (ModelOpt's W4A8_AWQ / FP8 activations);
    # a fake-quant simulation only: no backend runs it (docs/methods/notation.md#fp8-activations)
    "W4A8-FP8": (_weights(4), _fp8_activations()),
    "W8A8-FP8": (_weights(8), _fp8_activations()),
}


def preset(name: str) -> tuple[QScheme, QScheme]:
    """(weight scheme, activation scheme) of a named preset; ``W4A16`` means weight-only (activations in FP),
    ``-WSYM`` symmetric weights (activations keep their asymmetric grid), ``-FP8`` FP8 E4M3 activations, a final
    ``-G<n>`` weights in blocks of n (``per_block``) instead of per output channel."""
    key = preset_key(name)
    if key in PRESETS:
        return PRESETS[key]
    blocked = BLOCK_SUFFIX.match(key)
    weights, activations = PRESETS[blocked["base"]]
    return replace(weights, granularity="per_block", group_size=int(blocked["size"])), activations
