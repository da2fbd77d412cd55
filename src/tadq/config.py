"""Typed configs of a quantization run, and their JSON form (type tag + version) so artefacts carry them."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from tadq.adapters.base import LAYER_ROLES
from tadq.fp_layers import DEFAULT_FP_LAYERS, FP_LAYER_PRESETS, fp_layer_roles
from tadq.quant.qscheme import MAX_BITS, MIN_BITS, QScheme, preset, preset_key
from tadq.registry import register_config_type, registered_config_types
from tadq.safefiles import NewerVersionError
from tadq.sampling import SamplerConfig, check_seed

__all__ = [
    "CalibrationConfig", "ReconstructionConfig", "QuantConfig", "FP_LAYER_PRESETS", "DEFAULT_FP_LAYERS",
    "fp_layer_roles", "config_to_dict", "config_from_dict", "config_version", "QuantMethod", "register_config_type",
    "register_migration", "field_added", "NewerVersionError",
]

QuantMethod = Literal["naive", "qdiffusion", "svdquant"]

CONFIG_VERSION = 1


@dataclass(frozen=True)
class CalibrationConfig:
    """Timestep-aware calibration data (docs/methods/qdiffusion.md): inputs recorded along FP trajectories.

    Args:
        sampler: the deployment sampler whose FP trajectories are recorded (same steps and η as at inference).
        num_trajectories: FP trajectories sampled once (O(S): one run, every step recorded).
        num_steps_kept: sampler steps kept, chosen uniformly over the S steps (Q-Diffusion: 20 of 100 on CIFAR).
        samples_per_step: inputs kept at each kept step (Q-Diffusion: 256); ≤ ``num_trajectories``.
        seed: noise seed of the calibration trajectories; keep it disjoint from evaluation seeds.
        batch_size: batch of the FP sampling and of calibration forwards.
    """

    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="ddim", num_steps=50, eta=0.0))
    num_trajectories: int = 256
    num_steps_kept: int = 25
    samples_per_step: int = 64
    seed: int = 0
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("num_trajectories", "num_steps_kept", "samples_per_step", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_seed("CalibrationConfig.seed", self.seed)
        if self.samples_per_step > self.num_trajectories:
            raise ValueError(
                f"samples_per_step ({self.samples_per_step}) cannot exceed num_trajectories ({self.num_trajectories})"
            )
        if self.num_steps_kept > self.sampler.num_steps:
            raise ValueError(
                f"num_steps_kept ({self.num_steps_kept}) cannot exceed the sampler's steps ({self.sampler.num_steps})"
            )


@dataclass(frozen=True)
class ReconstructionConfig:
    """Block reconstruction (BRECQ units; weights rounded by GPTQ onto the FP outputs or by AdaRound, then optional
    learned activation steps), docs/methods/qdiffusion.md.

    The defaults (GPTQ rounding, no activation phase) are the setting that holds on both shipped pixel models: on the
    natural-image photos AdaRound at the full budget took most of an hour per bit-width and stayed near naive at
    W4A8, where GPTQ onto the FP outputs reaches 32 dB in about 5 CPU minutes; on the digits it is 2 to 5x cheaper
    than AdaRound for 0.7 to 1.5 dB less (docs/methods/qdiffusion.md#the-default-base). Before 2026-12-03 the
    default was ``rounding="adaround", activation_iters=400``, the setting of the README's older tables.

    Args:
        weight_iters: AdaRound iterations per unit (``rounding="adaround"``/``"gptq_adaround"``; Q-Diffusion: 20 000;
            the CPU budget measured on the shipped model in ``benchmarks/reconstruction_budget.py``).
        activation_iters: activation-step (LSQ) iterations per unit (Q-Diffusion: 5000; 0 skips the phase, the
            default: with GPTQ rounding it bought nothing measurable on the digits and costs a third of the time).
        batch_size: reconstruction batch (Q-Diffusion: 32).
        rounding_weight: λ of the AdaRound regulariser (0.01: AdaRound §4 / Q-Diffusion).
        beta_start: β at the end of warm-up (20: AdaRound).
        beta_end: β at the end of training (2: AdaRound).
        warmup: share of weight iterations without the regulariser, β held at ``beta_start`` (0.2: AdaRound).
        weight_lr: Adam learning rate of the rounding variables. Q-Diffusion uses 1e-3 for 20 000 iterations; with a
            CPU budget of about a thousand iterations V barely moves at 1e-3, and 3e-2 measured best of 1e-2/3e-2
            (``benchmarks/reconstruction_budget.py``; table in docs/results/digits.md).
        activation_lr: Adam learning rate of the activation steps, cosine-decayed to 0 (4e-4: Q-Diffusion).
        activation_p: exponent of the activation-phase loss |ŷ − y|^p (2.4: Q-Diffusion ``cali_p``).
        loss_reduction: how the rounding phase's squared error is reduced: ``"channel_sum"`` (over channels, mean
            over batch and positions: BRECQ's/Q-Diffusion's ``lp_loss``, the scale λ = 0.01 was set for) or
            ``"sum"`` over all output elements (tadq before issue 19: λ's weight then shrinks with the resolution,
            which cost the 32×32 photos model most of the gain; docs/methods/qdiffusion.md, "Carrying over to
            natural images").
        seed: seeds batch sampling.
        rounding: how each unit's weights choose their grid points: ``"adaround"`` (learned rounding, the
            iterations above) or ``"gptq"`` (column-by-column rounding with inverse-Hessian error compensation, one
            pass per layer and no iterations; ``weight_iters`` and ``weight_lr`` are then unused) or
            ``"gptq_adaround"`` (AdaRound started from GPTQ's compensated weights, whose nearest rounding is the
            GPTQ result); docs/methods/qdiffusion.md#gptq-rounding.
        gptq_damp: GPTQ's damping, a share of the Hessian's mean diagonal added to it (0.01: GPTQ).
        gptq_target_damp: the ridge damping of the least-squares W* of ``gptq_target="fp_output"``, as a share of
            E[x̂ x̂ᵀ]'s mean diagonal; ``None``: ``gptq_damp`` (tadq before 2026-12-03). The ridge pulls W* toward
            zero along the inputs' weak directions; at 1 % that bias is larger than an 8-bit step, so at W8A8 GPTQ
            onto the FP outputs lost to nearest rounding in every unit of both pixel models. 1e-4 measured best of
            1e-3..1e-6 on the digits and beat 1 % on both models at both presets (digits W8A8 +1.1 / W4A8 +4.4 dB,
            photos +1.0 / +3.8 dB); 1e-6 is ill-conditioned (digits W4A8 25 dB).
            ``benchmarks/gptq_target_damp.py``; docs/methods/qdiffusion.md#the-targets-ridge-damping.
        gptq_target_prior: what the ridge of W* shrinks toward along the input directions the calibration inputs
            barely cover: ``"weight"`` (default: W, i.e. W* = (W E[x x̂ᵀ] + λ·m·W)(E[x̂ x̂ᵀ] + λ·m·I)⁻¹, which is W
            itself when there is no drift to undo) or ``"zero"`` (tadq before 2026-12-07: the plain ridge solve,
            which deletes W's response to those directions). The unit-loss guard sees only the calibration
            inputs, so it could not catch what ``"zero"`` did to other inputs: on the shipped DiT with 16
            calibration trajectories the W8A8 base fell 7 dB under naive PTQ.
            ``benchmarks/gptq_target_prior.py``; docs/methods/qdiffusion.md#what-the-targets-ridge-shrinks-toward.
        gptq_act_order: round the columns with the largest input energy first (GPTQ's act-order).
        gptq_target: what GPTQ's rounding reproduces: ``"fp_output"`` (default: the FP network's layer output W x;
            W is first replaced by the least-squares W* = W E[x x̂ᵀ] E[x̂ x̂ᵀ]⁻¹, which also absorbs the drift of
            x̂ from x; +1.3 dB on the digits, +3.7 dB on the photos at W4A8) or ``"own_inputs"`` (the layer's float
            output on the quantized path's inputs x̂: plain GPTQ).
        gptq_inputs: calibration inputs (rows of the set, drawn with ``seed``) whose layer inputs form each
            Hessian; 0: all of them.
    """

    # 2: rounding, gptq_damp, gptq_inputs (before: AdaRound); 3: gptq_target_damp; 4: gptq_target_prior
    config_version: ClassVar[int] = 4

    weight_iters: int = 1000
    activation_iters: int = 0
    batch_size: int = 32
    rounding_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    weight_lr: float = 3e-2
    activation_lr: float = 4e-4
    activation_p: float = 2.4
    loss_reduction: Literal["sum", "channel_sum"] = "channel_sum"
    seed: int = 0
    rounding: Literal["adaround", "gptq", "gptq_adaround"] = "gptq"
    gptq_damp: float = 0.01
    gptq_target_damp: float | None = 1e-4
    gptq_target_prior: Literal["zero", "weight"] = "weight"
    gptq_act_order: bool = True
    gptq_target: Literal["own_inputs", "fp_output"] = "fp_output"
    gptq_inputs: int = 256

    def __post_init__(self) -> None:
        for name in ("weight_iters", "activation_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_seed("ReconstructionConfig.seed", self.seed)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ValueError(f"need beta_start >= beta_end > 0, got {self.beta_start}, {self.beta_end}")
        if self.loss_reduction not in ("sum", "channel_sum"):
            raise ValueError(f"loss_reduction must be 'sum' or 'channel_sum', got {self.loss_reduction!r}")
        if self.rounding_weight < 0:
            raise ValueError(f"rounding_weight must be >= 0, got {self.rounding_weight}")
        if self.rounding not in ("adaround", "gptq", "gptq_adaround"):
            raise ValueError(f"rounding must be 'adaround', 'gptq' or 'gptq_adaround', got {self.rounding!r}")
        if not self.gptq_damp > 0:
            raise ValueError(f"gptq_damp must be > 0, got {self.gptq_damp}")
        if self.gptq_target_damp is not None and (isinstance(self.gptq_target_damp, bool)
                                                  or not self.gptq_target_damp > 0):
            raise ValueError(f"gptq_target_damp must be > 0 or None (gptq_damp), got {self.gptq_target_damp!r}")
        if self.gptq_target_prior not in ("zero", "weight"):
            raise ValueError(f"gptq_target_prior must be 'zero' or 'weight', got {self.gptq_target_prior!r}")
        if self.gptq_target not in ("own_inputs", "fp_output"):
            raise ValueError(f"gptq_target must be 'own_inputs' or 'fp_output', got {self.gptq_target!r}")
        if self.gptq_inputs < 0:
            raise ValueError(f"gptq_inputs must be >= 0 (0: all), got {self.gptq_inputs}")
        for name in ("weight_lr", "activation_lr", "activation_p"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def fp_output_damp(self) -> float:
        """The ridge damping W* is solved with: ``gptq_target_damp``, or ``gptq_damp`` where that is ``None``."""
        return self.gptq_damp if self.gptq_target_damp is None else self.gptq_target_damp


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Args:
        weights: scheme of every quantized layer's weight.
        activations: scheme of every quantized layer's input activation.
        method: ``naive`` = calibrated ranges, no reconstruction, no correction; ``qdiffusion`` = block
            reconstruction (AdaRound weights, then learned activation steps), docs/methods/qdiffusion.md;
            ``svdquant`` = per-layer smoothing search and low-rank branch (``tadq.svdquant.SVDQuantMethod`` in a
            Recipe), docs/methods/svdquant.md.
        calibration: calibration data.
        reconstruction: reconstruction settings (used by ``qdiffusion``).
        split_shortcut: give the two halves of a decoder skip conv's ``[deep | skip]`` input their own activation
            and weight quantizers (Q-Diffusion shortcut splitting, docs/methods/qdiffusion.md#split-shortcuts).
        quantize_attention: quantize the attention matmul operands q, k, v and the softmax output P
            (docs/methods/qdiffusion.md#attention).
        softmax_bits: bit-width of the softmax output P (unsigned, zero point 0); 8 in Q-Diffusion.
        softmax_granularity: P's step: ``"per_row"`` (default; Δ_i = max_j P_ij / (2^b − 1) of each query row,
            at run time) or ``"per_tensor"`` (one calibrated step per attention module, Q-Diffusion's code). A row
            over M keys holds entries near 1/M, so at M = 256 a step sized for the largest probability any row
            reaches rounds most of them away: 6.9 dB at W8A8 on the photos model, level on the digits
            (docs/methods/qdiffusion.md#attention). Artefacts saved before this field existed hold a per-tensor
            P and are refused on loading until their config says ``"per_tensor"``.
        exclude: fnmatch patterns of layer names kept in floating point (e.g. ``("conv_in", "conv_out")``).
        keep_fp_roles: adapter roles kept in floating point (e.g. ``("input_conv", "output_conv")``).
            Q-Diffusion's released code keeps none (docs/methods/qdiffusion.md#what-is-quantized).
        preset_name: the preset this config came from, for reports (informational).
        branch_ranges: give the unconditional branch of classifier-free guidance its own static activation ranges
            (calibrated on its rows; the conditional rows keep the main ones; ``tadq.guidance_ranges``). Needs
            guided calibration data (a conditional model, guidance ≠ 1).
        layer_bits: per-layer bit-widths ``(qualified layer name, weight bits, activation bits)``: the named
            quantized layer gets the preset's schemes with these bits (2..8). The activation bits are ``None``
            exactly when ``activations`` is off (an override changes a grid, never whether a tensor is quantized).
            Mixed precision (``tadq.svdquant.sensitivity``) raises chosen layers to 8 bits; the choice has to be
            part of the config so that an artefact records it and loading rebuilds those layers at their bits. A
            name that is not a quantized layer of the model raises when the network is built.
    """

    # 2: softmax_granularity added (default "per_row"); a version-1 payload was calibrated per tensor
    # 3: layer_bits added (default (): a version-2 payload had every layer at the preset's bits)
    config_version: ClassVar[int] = 3

    weights: QScheme = field(default_factory=lambda: preset("W8A8")[0])
    activations: QScheme = field(default_factory=lambda: preset("W8A8")[1])
    method: QuantMethod = "naive"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    split_shortcut: bool = False
    quantize_attention: bool = False
    softmax_bits: int = 8
    softmax_granularity: Literal["per_tensor", "per_row"] = "per_row"
    exclude: tuple[str, ...] = ()
    keep_fp_roles: tuple[str, ...] = ()
    preset_name: str = ""
    branch_ranges: bool = False
    layer_bits: tuple[tuple[str, int, int | None], ...] = ()

    def __post_init__(self) -> None:
        refuse_strings(self, ("keep_fp_roles", "exclude", "layer_bits"))
        entries = tuple(tuple(e) if isinstance(e, (tuple, list)) else e for e in self.layer_bits)  # JSON: lists
        object.__setattr__(self, "layer_bits", entries)
        self._check_layer_bits()
        if self.branch_ranges and not self.activations.enabled:
            raise ValueError("branch_ranges gives the unconditional branch its own activation ranges: it needs "
                             "quantized activations")
        if self.method not in ("naive", "qdiffusion", "svdquant"):
            raise ValueError(f"method must be one of ('naive', 'qdiffusion', 'svdquant'), got {self.method!r}")
        if not 2 <= self.softmax_bits <= 16:
            raise ValueError(f"softmax_bits must be in 2..16, got {self.softmax_bits}")
        if self.softmax_granularity not in ("per_tensor", "per_row"):
            raise ValueError("softmax_granularity must be 'per_tensor' or 'per_row', got "
                             f"{self.softmax_granularity!r}")
        unknown = [r for r in self.keep_fp_roles if r not in LAYER_ROLES]
        if unknown:
            raise ValueError(f"unknown roles {unknown}; roles are {list(LAYER_ROLES)}")
        if self.weights.granularity == "per_channel" and self.activations.granularity == "per_channel":
            raise ValueError("per-channel activation quantization is not supported; use granularity='per_tensor'")
        if self.activations.granularity in ("per_channel", "per_block"):
            raise ValueError("activations must be quantized per tensor (granularity='per_tensor'), or dynamically "
                             f"per token / per group ('per_token', 'per_group'), got {self.activations.granularity!r} "
                             "(a weight granularity)")
        self._check_layer_transforms()

    def _check_layer_bits(self) -> None:
        """Each override names one layer once, with bits a scheme accepts, and leaves quantized-or-not alone."""
        if self.layer_bits and not self.weights.enabled:
            raise ValueError("layer_bits overrides the bits of quantized layers; this config quantizes no weights")
        names: set[str] = set()
        for entry in self.layer_bits:
            if not isinstance(entry, tuple) or len(entry) != 3 or not isinstance(entry[0], str) or not entry[0]:
                raise ValueError(f"layer_bits entries are (layer name, weight bits, activation bits), got {entry!r}")
            name, weight_bits, activation_bits = entry
            if name in names:
                raise ValueError(f"layer_bits names {name!r} more than once")
            names.add(name)
            if not _valid_bits(weight_bits):
                raise ValueError(f"layer_bits[{name!r}]: weight bits must be an integer in "
                                 f"{MIN_BITS}..{MAX_BITS}, got {weight_bits!r}")
            if not self.activations.enabled:
                if activation_bits is not None:
                    raise ValueError(f"layer_bits[{name!r}]: activations are off in this config (weight-only); "
                                     f"give activation bits None, got {activation_bits!r}")
            elif not _valid_bits(activation_bits):
                raise ValueError(f"layer_bits[{name!r}]: activation bits must be an integer in "
                                 f"{MIN_BITS}..{MAX_BITS}, got {activation_bits!r}")
            elif self.activations.fp8 and activation_bits != 8:
                raise ValueError(f"layer_bits[{name!r}]: the activations are {self.activations.format}, an 8-bit "
                                 f"float; give activation bits 8, got {activation_bits!r}")

    def _check_layer_transforms(self) -> None:
        """Dynamic granularities, smoothing, rotation and low-rank branches: where each field belongs and which
        methods and structural options have been built and tested with them."""
        if self.weights.fp8:
            raise ValueError(f"weights in {self.weights.format} are not implemented (fp8 is an activation format "
                             "here); quantize weights on the integer grid (format 'int')")
        if self.weights.dynamic:
            raise ValueError(f"weights cannot be quantized {self.weights.granularity} (an activation granularity); "
                             "use per_channel, per_block or per_tensor")
        if self.weights.smoothing or self.weights.rotation != "none":
            raise ValueError("smoothing and rotation transform the layer input: set them on the activation scheme")
        if self.activations.lowrank_rank:
            raise ValueError("lowrank_rank splits the weight: set it on the weight scheme")
        if (self.activations.smoothing or self.weights.lowrank_rank) and self.method != "svdquant":
            raise ValueError("smoothing and a low-rank branch are fitted by the svdquant method (Recipe.method="
                             "SVDQuantMethod(...)); with method 'naive' they would stay identity / empty")
        transformed = self.activations.transforms or self.weights.transforms
        if self.method == "qdiffusion" and (transformed or self.activations.dynamic):
            raise ValueError("block reconstruction is not built for dynamic activations, rotations or low-rank "
                             "branches; use method 'naive' or 'svdquant'")
        if self.split_shortcut and transformed:
            raise ValueError("split_shortcut cannot be combined with smoothing, rotation or a low-rank branch")
        if self.quantize_attention and self.activations.dynamic:
            raise ValueError("attention operands are quantized per tensor; quantize_attention needs "
                             "activations granularity 'per_tensor'")

    @classmethod
    def from_preset(cls, name: str, fp_layers: str | None = None, **overrides: Any) -> QuantConfig:
        """``QuantConfig.from_preset("W4A8", fp_layers="first_last", calibration=...)``.

        Args:
            name: W8A8, W4A8, W4A4, W4A16, W8A16, W8A8-WSYM (symmetric weights), W4A8-FP8 or W8A8-FP8 (FP8 E4M3
                activations, ``QScheme.format``).
            fp_layers: a key of ``FP_LAYER_PRESETS`` (its roles are kept in floating point, with any
                ``keep_fp_roles`` given beside it); ``None`` keeps the default (none).
        """
        weights, activations = preset(name)
        if fp_layers is not None:  # merged, not replaced: the given roles used to be dropped without a word
            given = overrides.get("keep_fp_roles", ())
            if isinstance(given, str):
                raise TypeError(f"keep_fp_roles takes a tuple of role names, got the string {given!r}")
            overrides["keep_fp_roles"] = tuple(dict.fromkeys((*fp_layer_roles(fp_layers), *given)))
        # a given field replaces the preset's, as Recipe.from_preset does (weights= raised Python's "got multiple
        # values for keyword argument" TypeError here)
        return cls(**{"weights": weights, "activations": activations, "preset_name": preset_key(name), **overrides})

    @property
    def label(self) -> str:
        """``W4A8``-style label (A16 when activations stay in floating point; ``-WSYM`` for symmetric weights, a
        different model from the asymmetric one at the same widths; ``-FP8`` for FP8 E4M3 activations, the preset's
        name, ``-FP8E5M2`` for E5M2 ones; ``-G<n>`` last for weights in blocks of n, as the preset names it)."""
        w = self.weights.bits if self.weights.bits is not None else 16
        a = self.activations.bits if self.activations.bits is not None else 16
        suffix = {"int": "", "fp8_e4m3": "-FP8", "fp8_e5m2": "-FP8E5M2"}[self.activations.format]
        blocks = f"-G{self.weights.group_size}" if self.weights.enabled and self.weights.granularity == "per_block" \
            else ""
        return f"W{w}A{a}" + ("-WSYM" if self.weights.bits is not None and self.weights.symmetric else "") + suffix \
            + blocks


for _config_type in (QuantConfig, CalibrationConfig, QScheme, SamplerConfig, ReconstructionConfig):
    register_config_type(_config_type)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """``{"type": ..., "version": ..., "data": {...}}``, nested configs included."""
    name = type(config).__name__
    if name not in registered_config_types():
        raise TypeError(f"{name} is not a registered tadq config")
    optional = getattr(config, "written_when_set", ())  # fields added later, left out while at their default
    data = {f.name: _encode(getattr(config, f.name)) for f in dataclasses.fields(config)
            if f.name not in optional or getattr(config, f.name) != f.default}
    return {"type": name, "version": config_version(type(config)), "data": data}


# (type, version) → how a payload of that version becomes one of the next: a field added later gets the value
# the old payload was written with (not the new default), so an old artefact or recipe means what it meant
_MIGRATIONS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_migration(kind: str, from_version: int, upgrade: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Register ``upgrade`` (data of ``from_version`` → data of ``from_version + 1``) for config type ``kind``."""
    _MIGRATIONS[(kind, from_version)] = upgrade


def _migrate(kind: str, version: int, data: dict[str, Any], current: int, where: str) -> dict[str, Any]:
    while version < current:
        upgrade = _MIGRATIONS.get((kind, version))
        if upgrade is None:
            raise ValueError(f"{where}{kind} version {version} cannot be read by this tadq (it writes {current})")
        data, version = upgrade(dict(data)), version + 1
    return data


def field_added(name: str, value_before: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The migration over a version that added field ``name``: an older payload gets ``value_before``, what it was
    written with (not the field's new default)."""
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        data.setdefault(name, copy.deepcopy(value_before))
        return data

    return upgrade


# version 2: softmax_granularity (before it, P had one calibrated step per attention module);
# version 3: layer_bits (before it, every quantized layer had the preset's bits)
register_migration("QuantConfig", 1, field_added("softmax_granularity", "per_tensor"))
register_migration("QuantConfig", 2, field_added("layer_bits", []))
# ReconstructionConfig version 2: rounding (before it, always AdaRound); the GPTQ settings, unused by AdaRound, get
# their defaults
register_migration("ReconstructionConfig", 1, lambda data: field_added("gptq_target", "fp_output")(
    field_added("gptq_inputs", 256)(
    field_added("gptq_act_order", True)(field_added("gptq_damp", 0.01)(field_added("rounding", "adaround")(data))))))
# version 3: gptq_target_damp (before it, W* was solved with gptq_damp)
register_migration("ReconstructionConfig", 2, field_added("gptq_target_damp", None))
# version 4: gptq_target_prior (before it, the ridge of W* shrank toward zero)
register_migration("ReconstructionConfig", 3, field_added("gptq_target_prior", "zero"))


def _fields_as_written(klass: type, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the fields its class added without a version bump (``fields_added``: name → what a payload
    written before the field meant) filled in with that earlier value, when ``data`` was written by a tadq.

    tadq writes every field, so a payload holding every field the class had before the first of them was written by
    a tadq older than each one it lacks: it gets the value it was fitted with, not today's default (an old TCEC recipe
    refitted per element with an offset, an old PTQD artefact sampled with the noise-only VSC). A payload lacking one
    of those first fields is hand-written and short (docs/recipes.md): what it leaves out takes today's default.
    """
    added: dict[str, Any] = getattr(klass, "fields_added", {})
    first = {f.name for f in dataclasses.fields(klass)} - set(added) - set(getattr(klass, "written_when_set", ()))
    if not added or not first <= set(data):
        return data
    return {**{name: copy.deepcopy(value) for name, value in added.items() if name not in data}, **data}


def refuse_strings(config: Any, names: tuple[str, ...]) -> None:
    """Refuse a string given for a list field of ``config``, naming the field: the class's own checks, which win
    over the field-type check, iterated it into letters ('unknown roles ['i', 'n', ...]')."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, str):
            raise ValueError(f"{type(config).__name__}.{name} takes a list, got the string {value!r} (write "
                             f"[{value!r}] for one entry)")


def _valid_bits(bits: Any) -> bool:
    return isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS


def config_version(klass: type) -> int:
    """The JSON version of a config class: its ``config_version`` class attribute, else ``CONFIG_VERSION``."""
    return int(getattr(klass, "config_version", CONFIG_VERSION))


def _decode(value: Any, annotation_is_tuple: bool, where: str) -> Any:
    if isinstance(value, dict) and "type" in value and "data" in value:
        return config_from_dict(value, where=where)
    if isinstance(value, list):
        items = [_decode(v, False, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if annotation_is_tuple else items
    return value


def config_from_dict(payload: dict[str, Any], *, where: str = "") -> Any:
    """Inverse of ``config_to_dict``; ``ValueError`` naming the place (``where``, e.g. ``Recipe.method``) of an
    unknown type, an unknown field or a version newer than this tadq reads."""
    at = f"{where}: " if where else ""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), dict):
        raise ValueError(f"{at}expected a config object {{\"type\": ..., \"version\": ..., \"data\": {{...}}}}, "
                         f"got {str(payload)[:80]!r}")
    kind, version = payload.get("type"), payload.get("version")
    config_types = registered_config_types()  # the built-in ones included, whatever was imported before
    if not isinstance(kind, str) or kind not in config_types:
        raise ValueError(f"{at}unknown config type {kind!r}; known: {sorted(config_types)} (a type of a newer tadq "
                         "or of a plugin: upgrade tadq, or import the plugin that registers it)")
    klass = config_types[kind]
    beside = sorted(set(payload) - {"type", "version", "data"})
    if beside:  # a field written next to "data" instead of inside it was ignored without a word
        raise ValueError(f"{at}{kind} has keys {beside} beside \"type\", \"version\" and \"data\"; a config's "
                         "fields go inside \"data\"")
    if isinstance(version, bool) or not isinstance(version, int):  # true read as 1, a missing one as "newer"
        raise ValueError(f"{at}{kind} version must be an int (1..{config_version(klass)}), got {version!r}")
    if version > config_version(klass):
        raise NewerVersionError(f"{at}{kind} version {version!r} is newer than this tadq understands "
                         f"({config_version(klass)}); upgrade tadq or write version {config_version(klass)}")
    data = _fields_as_written(klass, _migrate(kind, version, payload["data"], config_version(klass), at))
    fields = {f.name: f for f in dataclasses.fields(klass)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ValueError(f"{at}{kind} has no fields {sorted(unknown)}; its fields are {sorted(fields)} (fields of a "
                         "newer tadq? upgrade tadq)")
    prefix = f"{where}." if where else f"{kind}."
    kwargs = {k: _decode(v, "tuple" in str(fields[k].type), prefix + k) for k, v in data.items()}
    try:
        return klass(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{at}{error}") from error
