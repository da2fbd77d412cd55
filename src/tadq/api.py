"""The public verbs: ``quantize`` and ``sample`` (thin orchestration over the core)."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from tadq.calibration import Calibrate, CalibrationSet, collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.config import QuantConfig
from tadq.corrections.base import HookedDenoiser
from tadq.denoiser import QuantizedDenoiser
from tadq.quant.attention import apply_attention_quantization
from tadq.quant.convert import convert_layers, plan_layers
from tadq.quant.split import apply_shortcut_split
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig, SamplingResult, make_scheduler
from tadq.sampling import sample as _sample_loop

__all__ = ["quantize", "build_quantized_structure", "calibrate_activations", "sample"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibrate_activations(
    qmodel: QuantizedDenoiser, calib: CalibrationSet, batch_size: int = 128, seed: int = 0, progress: bool = True,
) -> None:
    """Set every activation range from the calibration inputs (the explicit calibrate phase)."""
    with Calibrate(qmodel.model, seed=seed):
        starts = range(0, len(calib), batch_size)
        for start in tqdm(starts, desc="calibrate activation ranges", disable=not progress, leave=False):
            qmodel(calib.x[start: start + batch_size], calib.t[start: start + batch_size])


def build_quantized_structure(
    model: nn.Module, config: QuantConfig, *, init_weight_range: bool = True,
) -> QuantizedDenoiser:
    """The structural step of ``quantize``: copy ``model``, plan the layers and swap in fake-quant wrappers.

    No calibration happens here. It is one function so that ``tadq.load`` rebuilds exactly the structure
    ``quantize`` built (every structural feature added here is rebuilt on load without further changes).

    Args:
        model: a diffusers denoiser supported by a registered adapter (left unmodified).
        config: what to quantize and how.
        init_weight_range: set weight ranges from the weights; ``False`` when saved ranges are loaded next.
    """
    adapter = adapter_for(model)
    qmodel_inner = copy.deepcopy(model).eval().requires_grad_(False)
    plans = plan_layers(adapter.layers(qmodel_inner), config.weights, config.activations,
                        exclude=config.exclude, keep_fp_roles=config.keep_fp_roles)
    convert_layers(qmodel_inner, plans, init_weight_range=init_weight_range)
    splits = apply_shortcut_split(qmodel_inner, adapter, config, plans, init_weight_range=init_weight_range)
    plans = [dataclasses.replace(plan, split=splits.get(plan.name)) for plan in plans]
    apply_attention_quantization(qmodel_inner, adapter, config)
    return QuantizedDenoiser(qmodel_inner, adapter, config, plans)


def quantize(
    model: nn.Module, scheduler, config: QuantConfig, *, calibration: CalibrationSet | None = None,
    cache_dir: str | Path | None = None, checkpoint: str | Path | None = None, progress: bool = True,
) -> QuantizedDenoiser:
    """Quantize a copy of ``model`` (the original is never modified).

    Phases: resolve the adapter → plan and wrap layers (weight ranges from the weights) → collect timestep-aware
    calibration data from the FP sampler (or use ``calibration``) → calibrate activation ranges → for
    ``method="qdiffusion"``, block reconstruction (AdaRound weights, then activation steps).

    Args:
        model: a diffusers denoiser supported by a registered adapter.
        scheduler: its training scheduler (its config builds the calibration sampler).
        config: what to quantize and how.
        calibration: precomputed calibration data (skips the FP sampling run).
        cache_dir: where calibration data is cached between runs.
        checkpoint: reconstruction checkpoint file (``qdiffusion``): written after every unit, resumed from if present.
    """
    adapter = adapter_for(model)
    qmodel = build_quantized_structure(model, config)  # first: a bad layer pattern fails before any sampling
    if calibration is None:
        calibration = collect_calibration_set(model, adapter, scheduler.config, config.calibration,
                                              cache_dir=cache_dir, progress=progress)
    if config.activations.enabled:
        calibrate_activations(qmodel, calibration, config.calibration.batch_size, config.calibration.seed, progress)
    if config.method == "qdiffusion":
        qmodel.reconstruction_report = reconstruct(qmodel.model, model, adapter, calibration, config.reconstruction,
                                                   checkpoint=checkpoint, progress=progress)
    plans = qmodel.plans
    logger.info("quantized %d of %d layers (%s)", sum(p.quantized for p in plans), len(plans), config.label)
    return qmodel


def sample(
    denoiser: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int,
    batch_size: int = 128, hooks: Sequence = (), record_trajectory: bool = False, progress: bool = True,
) -> SamplingResult:
    """Sample with tadq's loop from a FP diffusers model or a ``QuantizedDenoiser``.

    A denoiser carrying corrections (``QuantizedDenoiser``, ``MixedPrecisionDenoiser``) applies them first, then
    ``hooks``.
    """
    if isinstance(denoiser, HookedDenoiser):
        call, shape = denoiser, denoiser.sample_shape
        hooks = (*denoiser.correction_hooks(), *hooks)
    else:
        adapter = adapter_for(denoiser)
        call, shape = (lambda x, t: adapter.predict_eps(denoiser, x, t)), adapter.sample_shape(denoiser)
    return _sample_loop(
        call, make_scheduler(scheduler.config, sampler), sampler, num_samples=num_samples, seed=seed,
        sample_shape=shape, batch_size=batch_size, hooks=hooks, record_trajectory=record_trajectory,
        progress=progress,
    )
