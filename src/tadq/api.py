"""The public verbs: ``quantize`` and ``sample`` (thin orchestration over the core)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from tadq.calibration import CalibrationSet, collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.config import QuantConfig
from tadq.corrections.base import HookedDenoiser
from tadq.denoiser import QuantizedDenoiser
from tadq.prepare import build_quantized_structure, calibrate_activations
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig, SamplingResult, make_scheduler
from tadq.sampling import sample as _sample_loop

__all__ = ["quantize", "build_quantized_structure", "calibrate_activations", "sample"]

logger = logging.getLogger(__name__)


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
