"""The candidate space of ``tadq recipe`` and what each candidate costs (docs/recipe_search.md).

A candidate is (base method, preset, correction stack, floating-point layers): a base of ``BASES`` × a bit-width
preset × one of ``none``, ``ptqd``, ``tac``, ``tcec``, ``tac+tcec`` × a key of ``tadq.config.FP_LAYER_PRESETS``
(``none``, ``first_last``: the input and output convs kept in float, ``first_last_time``: also the timestep MLP),
which becomes the recipe's ``keep_fp_roles``. Its recipe is the one the README's rows use for the same names
(Q-Diffusion with shortcut splitting and quantized attention, naive PTQ without, SVDQuant with its rank-4 branch,
smoothing and dynamic per-group activations of 8 channels), built with the search's calibration, reconstruction
and correction-fit settings. ``smoothquant`` is the SVDQuant recipe without the branch (``lowrank_rank=0``):
smoothing searched per layer and the same per-group activations, at the plain preset's bit-operations.

Cost, in the units the budget is given in:

- **bit-operations per sample**: Σ over every Conv2d/Linear of MACs × b_w × b_a (floating-point layers 32 × 32,
  among them those ``keep_fp_roles`` keeps in float: the plan marks them unquantized),
  per forward, times the sampler's steps: the accounting of ``tadq.corrections.ptqd.bitops`` that ``tadq bench``
  reports as "Gbit-ops / sample". SVDQuant's low-rank branch adds, per quantized layer, its MACs
  r·(K + O) per output position at 32 × 32 (r the rank the build gives that layer, ``effective_rank``): the
  ``bitops`` of ``tadq.svdquant.cost.cost_summary``. It is computed from the quantization plan and one FP forward,
  before anything is built, so a candidate over a bit-operations budget is never built. The corrections, the
  smoothing division and the per-group dynamic scales add element-wise operations only (no MACs) and are free in
  this measure; attention matmuls are not counted (the bench's convention).
- **artefact bytes**: the weights file plus the correction tables as saved (``tadq_weights.safetensors`` +
  ``corrections.safetensors``), measured on the saved artefact. Before building, ``codes_lower_bound_bytes`` (the
  packed weight codes alone) rules out presets that cannot fit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from tadq.config import DEFAULT_FP_LAYERS, CalibrationConfig, ReconstructionConfig, fp_layer_roles
from tadq.corrections.ptqd.bitops import FP_BITS, dummy_conditioning, layer_macs
from tadq.prepare import build_quantized_structure
from tadq.quant.lowrank import effective_rank, lowrank_macs
from tadq.quant.qscheme import preset_key
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe
from tadq.recipe_presets import correction_configs
from tadq.registry import adapter_for
from tadq.safefiles import finite_float
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQUANT_RANK, SVDQuantMethod, svdquant_schemes

__all__ = [
    "BASES", "STACKS", "SVDQUANT_BASES", "Budget", "Candidate", "SearchSpace", "forward_macs", "gbitops_per_sample",
    "branch_macs", "codes_lower_bound_bytes", "parse_stack", "parse_fp_layers", "quantized_layers",
]

SVDQUANT_BASES: dict[str, int] = {"svdquant": SVDQUANT_RANK, "smoothquant": 0}
"""The SVDQuant-family bases → rank of their floating-point branch (both smooth and quantize activations
dynamically per group of ``tadq.svdquant.SVDQUANT_GROUP`` channels)."""
BASES: tuple[str, ...] = ("naive", "qdiffusion", *SVDQUANT_BASES)
STACKS: dict[str, tuple[str, ...]] = {
    "none": (), "ptqd": ("ptqd",), "tac": ("tac",), "tcec": ("tcec",), "tac+tcec": ("tac", "tcec"),
}
"""Correction stacks searched, by name → correction names in application order (``tadq.recipe_presets``)."""

BudgetKind = Literal["gbitops", "bytes"]
FP_SUFFIX = "-fp_"
"""What separates a candidate's name from its floating-point layers key (``qdiffusion+tac-W4A8-fp_first_last``)."""


def parse_stack(name: str) -> tuple[str, ...]:
    """A stack name (``none``, ``tac+tcec``...) → its corrections; ``ValueError`` naming the known ones."""
    key = name.strip().lower()
    if key not in STACKS:
        raise ValueError(f"unknown correction stack {name!r}; choose from {list(STACKS)}")
    return STACKS[key]


def parse_fp_layers(name: str) -> str:
    """A floating-point layers key (``none``, ``first_last``...) normalised; ``ValueError`` naming the known ones."""
    key = name.strip().lower() if isinstance(name, str) else name
    fp_layer_roles(key)
    return key


@dataclass(frozen=True)
class Candidate:
    """One point of the space: base method, preset, correction stack (application order) and the
    ``FP_LAYER_PRESETS`` key of the layers kept in floating point."""

    base: str
    preset: str
    stack: tuple[str, ...] = ()
    fp_layers: str = "none"

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"unknown base method {self.base!r}; searched bases: {list(BASES)}")
        object.__setattr__(self, "preset", preset_key(self.preset))  # ValueError naming the presets
        object.__setattr__(self, "stack", tuple(self.stack))
        object.__setattr__(self, "fp_layers", parse_fp_layers(self.fp_layers))

    @property
    def name(self) -> str:
        """The README's row naming, ``qdiffusion+tac+tcec-W4A8``, ``naive-W4A4``, for ``fp_layers="none"``; other
        floating-point layers add ``-fp_<key>``: ``qdiffusion+tac-W4A8-fp_first_last`` (letters, digits, ``+``,
        ``-`` and ``_`` only: a file name as it is)."""
        name = "+".join((self.base, *self.stack)) + f"-{self.preset}"
        return name if self.fp_layers == "none" else f"{name}{FP_SUFFIX}{self.fp_layers}"

    @property
    def keep_fp_roles(self) -> tuple[str, ...]:
        """The adapter roles this candidate keeps in floating point (``FP_LAYER_PRESETS[fp_layers]``)."""
        return fp_layer_roles(self.fp_layers)

    @property
    def stack_name(self) -> str:
        return "+".join(self.stack) or "none"

    @property
    def parent(self) -> Candidate | None:
        """The candidate this one extends by one correction (``None`` for a base)."""
        return dataclasses.replace(self, stack=self.stack[:-1]) if self.stack else None

    @property
    def base_candidate(self) -> Candidate:
        return dataclasses.replace(self, stack=())


@dataclass(frozen=True)
class Budget:
    """A cost ceiling: ``gbitops`` (Gbit-ops per sample, all steps) or ``bytes`` (artefact weights + tables).

    ``source`` says where the value came from (e.g. ``"the W4A8 preset"``) for the report.
    """

    kind: BudgetKind
    value: float
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("gbitops", "bytes"):
            raise ValueError(f"Budget.kind={self.kind!r}; accepted: gbitops, bytes")
        if not finite_float(self.value) \
                or self.value <= 0:
            raise ValueError(f"the budget must be a finite number > 0, got {self.value!r}")

    def describe(self) -> str:
        amount = f"{self.value:.4g} Gbit-ops/sample" if self.kind == "gbitops" else f"{int(self.value)} bytes"
        return f"{amount} ({self.source})" if self.source else amount

    def fits(self, gbitops: float, nbytes: int | None) -> bool | None:
        """Whether a cost is within the budget; ``None`` when the budget's measure is not known yet."""
        if self.kind == "gbitops":
            return gbitops <= self.value * (1 + 1e-9)
        return None if nbytes is None else nbytes <= self.value


def forward_macs(model: nn.Module) -> dict[str, int]:
    """MACs per sample of every Conv2d/Linear of one FP forward (qualified name → MACs); a conditional model runs
    on the adapter's placeholder conditioning (the MACs do not depend on its values)."""
    adapter = adapter_for(model)
    cond = dummy_conditioning(adapter, model)
    with torch.no_grad():
        return layer_macs(model, lambda x, t: adapter.predict_eps(model, x, t, cond), adapter.sample_shape(model))


def quantized_layers(model: nn.Module, recipe: Recipe) -> set[str]:
    """Names of the layers ``recipe`` quantizes (its plan; no range is computed)."""
    structure = build_quantized_structure(model, recipe.quant_config(), init_weight_range=False)
    return {plan.name for plan in structure.plans if plan.quantized}


def branch_macs(model: nn.Module, recipe: Recipe, macs: dict[str, int], quantized: set[str]) -> int:
    """MACs per forward of the low-rank floating-point branches ``recipe`` gives its quantized layers (0 without).

    Per layer: output positions (its MACs / (K·O)) × ``lowrank_macs`` at the rank the build applies
    (``effective_rank``: the scheme's rank capped at half of min(O, K)); K = in/groups·kh·kw, O = out channels.
    """
    rank = recipe.weights.lowrank_rank
    if not rank:
        return 0
    total = 0
    for name in quantized:
        if name not in macs:  # not called in the forward (no MACs, no branch work)
            continue
        weight = model.get_submodule(name).weight
        out_features, reduction = int(weight.shape[0]), int(weight[0].numel())
        positions = macs[name] // (reduction * out_features)
        total += positions * lowrank_macs(effective_rank(out_features, reduction, rank), reduction, out_features)
    return total


def gbitops_per_sample(model: nn.Module, recipe: Recipe, macs: dict[str, int] | None = None,
                       quantized: set[str] | None = None) -> float:
    """Gbit-ops of one sample (every step) of ``recipe`` on ``model``, from its plan: no calibration needed.

    The quantized GEMMs at the recipe's bits, floating-point layers and SVDQuant's low-rank branch at 32 × 32.
    Equal to ``bit_operations(qmodel) × steps / 1e9`` of the built model, and for an SVDQuant recipe to
    ``tadq.svdquant.cost.cost_summary(qmodel, steps)["bitops"] / 1e9`` (tests check both).
    """
    macs = forward_macs(model) if macs is None else macs
    quantized = quantized_layers(model, recipe) if quantized is None else quantized
    bits = (recipe.weights.bits or FP_BITS) * (recipe.activations.bits or FP_BITS)
    per_forward = sum(count * (bits if name in quantized else FP_BITS * FP_BITS) for name, count in macs.items())
    per_forward += branch_macs(model, recipe, macs, quantized) * FP_BITS * FP_BITS
    return per_forward * recipe.sampler.num_steps / 1e9


def codes_lower_bound_bytes(model: nn.Module, recipe: Recipe, quantized: set[str] | None = None) -> int:
    """Bytes of the packed weight codes alone: no artefact of ``recipe`` can be smaller."""
    bits = recipe.weights.bits
    if bits is None:
        return 0
    total = 0
    for name in quantized_layers(model, recipe) if quantized is None else quantized:
        weight = getattr(model.get_submodule(name), "weight", None)
        total += 0 if weight is None else weight.numel() * bits // 8
    return total


@dataclass(frozen=True)
class SearchSpace:
    """What is searched and with which build settings (shared by every candidate).

    Args:
        presets: bit-width presets tried (those within a bit-operations budget are built).
        bases: base methods (``BASES``: ``naive``, ``qdiffusion``, ``svdquant``, ``smoothquant``).
        stacks: correction stacks by name (``STACKS``).
        fp_layers: keys of ``tadq.config.FP_LAYER_PRESETS`` (``none``, ``first_last``, ``first_last_time``): each
            candidate is tried with each set of layers kept in floating point (``Recipe.keep_fp_roles``); the
            default is ``tadq run``'s (``DEFAULT_FP_LAYERS``: the input and output convs).
        sampler: the deployment sampler (calibration, fits and scoring run with it).
        guidance_scale: the deployment's classifier-free guidance scale (1: none); calibration, fits and scoring run
            with it, and every candidate's recipe records it (``Deployment.guidance_scale``).
        distilled_guidance: the scale a guidance-distilled model (Flux) embeds in every run of the search, recorded
            in every candidate's recipe (``Deployment.distilled_guidance``); ``None`` for every other model.
        calibration: calibration trajectories (its seed is the calibration seed every fit uses).
        reconstruction: Q-Diffusion's block reconstruction settings (``rounding``: AdaRound, GPTQ or both; the
            SVDQuant-family and naive bases do not reconstruct).
        fit_trajectories: trajectories of each correction fit (``CorrectionConfig.num_samples``).
        selection_samples: TCEC's held-out (a, κ, start) selection trajectories.
    """

    presets: tuple[str, ...] = ("W8A8", "W4A8", "W4A4")
    bases: tuple[str, ...] = BASES
    stacks: tuple[str, ...] = tuple(STACKS)
    fp_layers: tuple[str, ...] = (DEFAULT_FP_LAYERS,)
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="ddim", num_steps=50, eta=0.0))
    guidance_scale: float = 1.0
    distilled_guidance: float | None = None
    calibration: CalibrationConfig | None = None
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    fit_trajectories: int = 256
    selection_samples: int = 64

    def __post_init__(self) -> None:
        for axis in ("presets", "bases", "stacks", "fp_layers"):  # a string would be searched letter by letter
            if isinstance(getattr(self, axis), str):
                raise ValueError(f"SearchSpace.{axis} must be a tuple of names, got the string "
                                 f"{getattr(self, axis)!r}")
        # a name given twice (W4A4,w4a4) would be built once and reported, reused and counted once per copy
        object.__setattr__(self, "presets", tuple(dict.fromkeys(p.strip().upper() for p in self.presets)))
        object.__setattr__(self, "bases", tuple(dict.fromkeys(b.strip().lower() for b in self.bases)))
        object.__setattr__(self, "stacks", tuple(dict.fromkeys(s.strip().lower() for s in self.stacks)))
        object.__setattr__(self, "fp_layers", tuple(dict.fromkeys(parse_fp_layers(f) for f in self.fp_layers)))
        # Deployment checks the scale (finite, >= 0) and makes it a float
        object.__setattr__(self, "guidance_scale", Deployment(self.sampler, self.guidance_scale).guidance_scale)
        for name in self.presets:
            preset_key(name)  # ValueError naming the presets
        for name in self.bases:
            if name not in BASES:
                raise ValueError(f"unknown base method {name!r}; searched bases: {list(BASES)}")
            if name in SVDQUANT_BASES:  # fp8 presets have no per-group activations: refused here, named
                for preset_name in self.presets:
                    svdquant_schemes(preset_name, rank=SVDQUANT_BASES[name])
        for name in self.stacks:
            parse_stack(name)
        if not (self.presets and self.bases and self.stacks and self.fp_layers):
            raise ValueError("the search space is empty: give at least one preset, base, stack and fp_layers key")
        if self.calibration is None:
            object.__setattr__(self, "calibration", CalibrationConfig(sampler=self.sampler))
        if self.calibration.sampler != self.sampler:
            raise ValueError("SearchSpace.calibration.sampler must be the deployment sampler")
        for name in ("fit_trajectories", "selection_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SearchSpace.{name} must be a positive int, got {value!r}")

    @property
    def calibration_seed(self) -> int:
        return self.calibration.seed

    def candidates(self) -> list[Candidate]:
        """Every candidate, bases before the stacks built on them, shorter stacks first (so parents come first);
        the stacks of one base (method, preset, floating-point layers) follow each other."""
        stacks = sorted({parse_stack(s) for s in self.stacks}, key=lambda s: (len(s), s))
        return [Candidate(base, preset, stack, fp) for preset in self.presets for base in self.bases
                for fp in self.fp_layers for stack in stacks]

    def recipe(self, candidate: Candidate) -> Recipe:
        """The candidate's full recipe (what ``recipe.json`` holds and ``tadq quantize --recipe`` rebuilds)."""
        deployment = Deployment(self.sampler, self.guidance_scale, distilled_guidance=self.distilled_guidance)
        fields = {"calibration": self.calibration, "deployments": (deployment,),
                  "keep_fp_roles": candidate.keep_fp_roles, "name": candidate.name}
        corrections = tuple(self._fit_settings(c) for c in correction_configs(candidate.stack, self.calibration_seed))
        if candidate.base == "naive":
            return Recipe.from_preset(candidate.preset, method=NaiveMethod(), corrections=corrections, **fields)
        if candidate.base in SVDQUANT_BASES:
            weights, activations = svdquant_schemes(candidate.preset, rank=SVDQUANT_BASES[candidate.base])
            return Recipe.from_preset(candidate.preset, method=SVDQuantMethod(seed=self.calibration_seed),
                                      weights=weights, activations=activations, corrections=corrections, **fields)
        return Recipe.from_preset(candidate.preset, method=QDiffusionMethod(self.reconstruction),
                                  split_shortcut=True, quantize_attention=True, corrections=corrections, **fields)

    def _fit_settings(self, config):
        changes = {"num_samples": self.fit_trajectories}
        if hasattr(config, "selection_samples"):
            changes["selection_samples"] = self.selection_samples
        return dataclasses.replace(config, **changes)

    def correction_seeds(self) -> dict[str, int]:
        """Every noise seed a correction fit draws from (fit pairs, TCEC's own held-out selection)."""
        seeds = {"fit": self.calibration_seed}
        for config in correction_configs(("tcec",), self.calibration_seed):
            seeds["tcec_selection"] = self._fit_settings(config).held_out_seed
        return seeds
