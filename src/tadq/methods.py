"""The built-in quantization methods' handlers (naive PTQ, Q-Diffusion) for ``Recipe.method``.

Each handler runs prepare → calibrate → method; ``tadq.quantize`` then fits the recipe's corrections. TFMQ-DM's
handler sits beside it in ``tadq.tfmq.method``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from tadq.calibration import CalibrationSet, collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.config import QuantConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.prepare import build_quantized_structure, calibrate_activations
from tadq.recipe import NaiveMethod, QDiffusionMethod, register_quant_method
from tadq.registry import adapter_for
from tadq.sampling.conditioning import ConditionSource
from tadq.svdquant import SVDQuantMethod, apply_svdquant

if TYPE_CHECKING:
    from tadq.recipe import Recipe

__all__ = ["model_device", "calibrated_structure", "quantize_base", "reuse_base", "check_base", "check_sampler",
           "fitted_sampler_keys"]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def calibration_on(calibration: CalibrationSet, device: torch.device,
                   dtype: torch.dtype = torch.float32) -> CalibrationSet:
    """``calibration`` with its tensors on ``device`` and its states in ``dtype`` (the network's; the same object
    when they are so already)."""
    if calibration.x.device == device and calibration.x.dtype == dtype:
        return calibration
    moved = {name: getattr(calibration, name).to(device) for name in ("t", "step_index")}
    moved |= {name: getattr(calibration, name).to(device=device, dtype=dtype) for name in ("x", "eps")}
    if calibration.cond is not None:  # prompt embeddings (floating) follow the states; labels stay integers
        moved["cond"] = calibration.cond.to(device, dtype)
    return dataclasses.replace(calibration, **moved)


def calibration_for(calibration: CalibrationSet, model: nn.Module) -> CalibrationSet:
    """``calibration`` on ``model``'s device with its states in the model's dtype (float32 for a model without
    parameters): a set collected elsewhere (another device, a float64 copy) feeds the network as its own would."""
    first = next(model.parameters(), None)
    return calibration_on(calibration, model_device(model), torch.float32 if first is None else first.dtype)


def calibrated_structure(
    model: nn.Module, reference: nn.Module, scheduler, config: QuantConfig, *, calibration: CalibrationSet | None,
    cache_dir: str | Path | None, progress: bool, conditions: ConditionSource | None = None,
    guidance_scale: float = 1.0,
    before_ranges: Callable[[QuantizedDenoiser, CalibrationSet], None] | None = None,
) -> tuple[QuantizedDenoiser, CalibrationSet]:
    """Plan and wrap the layers of a copy of ``model``, collect calibration data from ``reference`` (unless given;
    sampled with ``conditions`` at ``guidance_scale``, as deployed), calibrate activation ranges; the calibration set
    comes back on the model's device. ``before_ranges`` changes the network first (SVDQuant's smoothing and
    branches), so the ranges are calibrated on the inputs the layers will see."""
    adapter = adapter_for(model)
    qmodel = build_quantized_structure(model, config)  # first: a bad layer pattern fails before any sampling
    if calibration is None:
        calibration = collect_calibration_set(reference, adapter, scheduler, config.calibration,
                                              cache_dir=cache_dir, progress=progress, conditions=conditions,
                                              guidance_scale=guidance_scale)
    calibration = calibration_for(calibration, model)
    if before_ranges is not None:
        before_ranges(qmodel, calibration)
    if config.activations.enabled:
        calibrate_activations(qmodel, calibration, config.calibration.batch_size, config.calibration.seed, progress)
    return qmodel, calibration


def quantize_base(
    model: nn.Module, reference: nn.Module, scheduler, recipe: Recipe, config: QuantConfig, *,
    calibration: CalibrationSet | None = None, cache_dir: str | Path | None = None,
    checkpoint: str | Path | None = None, progress: bool = True, conditions: ConditionSource | None = None,
    guidance_scale: float = 1.0,
) -> QuantizedDenoiser:
    """Naive PTQ (ranges only) or Q-Diffusion (block reconstruction after the ranges)."""
    if config.method == "svdquant":  # a plain QuantConfig asking for SVDQuant: the default fitting settings
        return quantize_svdquant(model, reference, scheduler, recipe, config, calibration=calibration,
                                 cache_dir=cache_dir, progress=progress, conditions=conditions,
                                 guidance_scale=guidance_scale)
    qmodel, calibration = calibrated_structure(model, reference, scheduler, config, calibration=calibration,
                                               cache_dir=cache_dir, progress=progress, conditions=conditions,
                                               guidance_scale=guidance_scale)
    if config.method == "qdiffusion":
        if reference is not model:
            raise NotImplementedError("block reconstruction compares FP and quantized blocks in one dtype: quantize "
                                      "with dtype=float32 (sampling, evaluation and naive PTQ take another)")
        before = qmodel.branch_ranges.main_scales(qmodel.model) if qmodel.branch_ranges is not None else None
        qmodel.reconstruction_report = reconstruct(qmodel.model, reference, qmodel.adapter, calibration,
                                                   config.reconstruction, checkpoint=checkpoint, progress=progress)
        if before is not None:  # the learned steps moved the main ranges: the branch's follow by the same factor
            qmodel.branch_ranges.rescale(qmodel.model, before)
    return qmodel


def check_base(base: QuantizedDenoiser, config: QuantConfig) -> None:
    """Raise ``ValueError`` naming the first differing field unless ``base`` was built with ``config``."""
    if not isinstance(base, QuantizedDenoiser):
        raise TypeError(f"base must be a QuantizedDenoiser (tadq.quantize / tadq.load), got {type(base).__name__}")
    if base.config != config:
        differing = [f.name for f in dataclasses.fields(config) if getattr(base.config, f.name) != getattr(config,
                                                                                                          f.name)]
        raise ValueError(f"the base model was quantized with other settings ({differing}); it cannot carry this "
                         "recipe: quantize without base=")


def reuse_base(base: QuantizedDenoiser, reference: nn.Module, scheduler, recipe: Recipe, config: QuantConfig,
               **options) -> QuantizedDenoiser:
    """``base`` itself when it is this method's network with no corrections (they are fitted next)."""
    check_base(base, config)
    if len(base.corrections):
        raise ValueError(f"the base model already carries {len(base.corrections)} corrections; pass the network "
                         "without them (the recipe's stack is fitted in order on top of it)")
    return base


def quantize_svdquant(
    model: nn.Module, reference: nn.Module, scheduler, recipe: Recipe | None, config: QuantConfig, *,
    calibration: CalibrationSet | None = None, cache_dir: str | Path | None = None, progress: bool = True,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0, **_: object,
) -> QuantizedDenoiser:
    """SVDQuant: structure (rotations folded) → calibration data → per-layer smoothing search, low-rank branch and
    residual weight ranges → activation ranges on the transformed inputs. ``svdquant_report`` holds the per-layer
    choices and the fitting time."""
    method = recipe.method if recipe is not None else None
    settings = method if isinstance(method, SVDQuantMethod) else SVDQuantMethod()
    report: dict[str, object] = {}

    def fit(qmodel: QuantizedDenoiser, calib: CalibrationSet) -> None:
        fits, seconds = apply_svdquant(qmodel, calib, settings, config.calibration.batch_size)
        report.update(layers=[f.to_json() for f in fits], seconds=round(seconds, 3))

    qmodel, _ = calibrated_structure(model, reference, scheduler, config, calibration=calibration,
                                     cache_dir=cache_dir, progress=progress, conditions=conditions,
                                     guidance_scale=guidance_scale, before_ranges=fit)
    qmodel.svdquant_report = report
    return qmodel


register_quant_method(NaiveMethod, quantize_base, reuse_base)
register_quant_method(QDiffusionMethod, quantize_base, reuse_base)
register_quant_method(SVDQuantMethod, quantize_svdquant, reuse_base)


def fitted_sampler_keys(qmodel: nn.Module) -> set[str]:
    """The sampler keys the model's per-step tables (corrections, TFMQ) were built for; empty when it has none."""
    keys = set()
    for member in getattr(qmodel, "corrections", ()):
        table_key = getattr(member, "table_key", None)
        key = table_key.sampler_key if table_key is not None else getattr(member, "sampler_key", None)
        if key is not None:
            keys.add(key)
    return keys


def check_sampler(qmodel: nn.Module, sampler, where: str = "") -> None:
    """Raise ``ValueError`` when ``qmodel`` carries tables fitted for another sampler grid than ``sampler``'s."""
    keys = fitted_sampler_keys(qmodel)
    if keys and keys != {sampler.key}:
        raise ValueError(f"{where or 'this model'} carries per-step tables fitted for {sorted(keys)}, not for "
                         f"{sampler.key}; sample with that sampler (--sampler/--steps/--eta; an artefact of tadq "
                         "quantize defaults to it, one saved without a recipe to ddim-50) or quantize again with "
                         "--steps/--eta for this one")
