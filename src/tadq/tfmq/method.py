"""``TFMQMethod``: TFMQ-DM as a ``Recipe.method`` (its handler: ``quantize_tfmq``, or ``apply_tfmq`` on a base).

The per-step tables (FSC ranges, feature cache) are built for the recipe's first deployment sampler. On an
SVDQuant base (``base="svdquant"``) only the parts that act after the weights exist carry over: FSC of the static
activation quantizers and the temporal-feature cache (TIAR's AdaRound of the TIB does not apply to SVDQuant's
smoothed, branch-split layers; docs/methods/tfmq.md#on-the-svdquant-base).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import nn

from tadq.calibration import CalibrationSet
from tadq.config import QuantConfig, ReconstructionConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.methods import check_base, quantize_svdquant
from tadq.recipe import register_quant_method
from tadq.registry import adapter_for
from tadq.sampling.conditioning import ConditionSource
from tadq.svdquant import SVDQuantMethod
from tadq.tfmq.config import TFMQConfig
from tadq.tfmq.correction import TFMQCorrection
from tadq.tfmq.pipeline import apply_tfmq, check_fsc_format, check_temporal_path, deployment_grid, quantize_tfmq

if TYPE_CHECKING:
    from tadq.recipe import Recipe

__all__ = ["TFMQMethod"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TFMQMethod:
    """TFMQ-DM on tadq's base quantizer.

    Args:
        base: the base quantizer after TIAR: ``"qdiffusion"`` (block reconstruction, the paper), ``"naive"``, or
            ``"svdquant"`` (SVDQuant's network with ``svdquant``'s settings; needs ``tiar=False`` and
            ``freeze_time_projections=False``: TFMQ's per-step tables and cache are built on it).
        reconstruction: block-reconstruction settings (``base="qdiffusion"``; TIAR reads its batch too).
        tfmq: TIAR, FSC and maintenance settings.
        svdquant: SVDQuant's fitting settings (``base="svdquant"`` only).
    """

    per_step_tables: ClassVar[bool] = True  # built for one deployment (Recipe refuses several)

    base: Literal["naive", "qdiffusion", "svdquant"] = "qdiffusion"
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    tfmq: TFMQConfig = field(default_factory=TFMQConfig)
    svdquant: SVDQuantMethod = field(default_factory=SVDQuantMethod)

    def __post_init__(self) -> None:
        parts = (("reconstruction", ReconstructionConfig), ("tfmq", TFMQConfig), ("svdquant", SVDQuantMethod))
        for name, kind in parts:
            if not isinstance(getattr(self, name), kind):  # tfmq=None failed after the FP calibration run
                raise ValueError(f"TFMQMethod.{name} must be a {kind.__name__}, got {getattr(self, name)!r:.60}")
        if self.base not in ("naive", "qdiffusion", "svdquant"):
            raise ValueError(f"TFMQMethod.base must be 'naive', 'qdiffusion' or 'svdquant', got {self.base!r}")
        if self.base == "svdquant" and (self.tfmq.tiar or self.tfmq.freeze_time_projections):
            raise ValueError("TFMQMethod(base='svdquant') needs TFMQConfig(tiar=False, freeze_time_projections="
                             "False): TIAR and freezing act on the block reconstruction, which SVDQuant does not run")

    @property
    def base_method(self) -> str:
        return self.base

    def check_quant_config(self, config: QuantConfig) -> None:
        """What ``Recipe`` asks of its method with the network's config, when the recipe is made: FSC's per-step
        integer steps refuse fp8 activations there, not after calibration."""
        check_fsc_format(config, self.tfmq)


def _quantize(model: nn.Module, reference: nn.Module, scheduler, recipe: Recipe, config: QuantConfig, *,
              calibration: CalibrationSet | None = None, cache_dir: str | Path | None = None,
              checkpoint: str | Path | None = None, progress: bool = True,
              conditions: ConditionSource | None = None, guidance_scale: float = 1.0) -> QuantizedDenoiser:
    if config.branch_ranges:
        raise NotImplementedError("branch_ranges does not combine with TFMQ-DM: its per-step quantizers hold one "
                                  "range per step, not one per guidance branch")
    if model is not reference and recipe.method.base != "svdquant":
        raise NotImplementedError("TFMQ-DM reconstructs against the FP model itself: run it with the reference in "
                                  "float32 (dtype=float32)")
    if recipe.method.base == "svdquant":
        check_fsc_format(config, recipe.method.tfmq)  # before SVDQuant's calibration, as the next checks
        check_temporal_path(model, adapter_for(model))
        deployment_grid(scheduler, recipe.sampler)
        svdquant_recipe = dataclasses.replace(recipe, method=recipe.method.svdquant)
        qmodel = quantize_svdquant(model, reference, scheduler, svdquant_recipe, config, calibration=calibration,
                                   cache_dir=cache_dir, progress=progress, conditions=conditions,
                                   guidance_scale=guidance_scale)
        return apply_tfmq(qmodel, reference, scheduler, recipe.method.tfmq, recipe.sampler,
                          cache_dir=None if cache_dir is None else str(cache_dir), progress=progress,
                          conditions=conditions, guidance_scale=guidance_scale)
    return quantize_tfmq(model, scheduler, config, recipe.method.tfmq, recipe.sampler, calibration=calibration,
                         cache_dir=None if cache_dir is None else str(cache_dir),
                         checkpoint=None if checkpoint is None else str(checkpoint), progress=progress,
                         conditions=conditions, guidance_scale=guidance_scale)


def _reuse(base: QuantizedDenoiser, reference: nn.Module, scheduler, recipe: Recipe, config: QuantConfig, *,
           cache_dir: str | Path | None = None, progress: bool = True, conditions: ConditionSource | None = None,
           guidance_scale: float = 1.0, **_: object) -> QuantizedDenoiser:
    """A saved TFMQ model (same TIAR settings) or, without TIAR and freezing, the Q-Diffusion network: FSC and
    maintenance are rebuilt for the recipe (seconds) on a copy of ``base``, which is left as it was; the weights
    are the base's (copied)."""
    check_base(base, config)
    settings: TFMQConfig = recipe.method.tfmq
    members = list(base.corrections)
    if any(not isinstance(m, TFMQCorrection) for m in members):
        raise ValueError("the base model carries sampler-level corrections; pass the network without them")
    if members and members[0].config == settings and members[0].sampler_key == recipe.sampler.key and torch.equal(
            members[0].grid_timesteps.cpu(), deployment_grid(scheduler, recipe.sampler)):  # the key names no spacing
        return base
    if not members and (settings.tiar or settings.freeze_time_projections):
        raise ValueError("a base without TFMQ weights only serves TFMQ settings with tiar=False and "
                         "freeze_time_projections=False; quantize this recipe without base=")
    # on a copy: ``apply_tfmq`` rebuilds the tables inside the network, and the caller's base (its own sampler's
    # tables, or a Q-Diffusion network without any) sampled with the new ones afterwards
    return apply_tfmq(copy.deepcopy(base), reference, scheduler, settings, recipe.sampler,
                      cache_dir=None if cache_dir is None else str(cache_dir), progress=progress,
                      conditions=conditions, guidance_scale=guidance_scale)


register_quant_method(TFMQMethod, _quantize, _reuse)
