"""``fit_ptqd``: what a ``tadq run`` row calls to put PTQD on top of a quantized model (docs/methods/ptqd.md).

A row reads ``api.sample(fit_ptqd(q, fp, scheduler, sampler, PTQDConfig(seed=calibration_seed)), ...)``.
"""

from __future__ import annotations

import logging

from torch import nn

from tadq.corrections.attach import as_denoiser, with_corrections
from tadq.corrections.context import FitContext
from tadq.corrections.ptqd.config import PTQDConfig
from tadq.corrections.ptqd.correction import PTQDCorrection, vsc_report
from tadq.corrections.stack import CorrectionStack, fit_stack
from tadq.denoiser import QuantizedDenoiser
from tadq.sampling import ConditionSource, Denoiser, SamplerConfig, SamplingPlan

__all__ = ["as_denoiser", "fit_ptqd", "with_corrections"]

logger = logging.getLogger(__name__)


def fit_ptqd(
    qmodel: QuantizedDenoiser,
    fp_model: nn.Module | Denoiser,
    scheduler,
    sampler: SamplerConfig,
    config: PTQDConfig,
    *,
    batch_size: int = 128,
    conditions: ConditionSource | None = None,
    guidance_scale: float = 1.0,
) -> QuantizedDenoiser:
    """PTQD fitted for ``sampler`` on top of ``qmodel`` and its existing corrections (docs/methods/ptqd.md).

    ``qmodel`` is left unchanged: the result is a new ``QuantizedDenoiser`` that shares its quantized network (so
    the base row and the PTQD row of a table come from the very same weights) and whose stack is ``qmodel``'s
    corrections followed by the new ``PTQDCorrection``, fitted on a pair collected with the earlier ones active.

    Args:
        qmodel: The quantized model (e.g. the Q-Diffusion base), possibly with corrections already.
        fp_model: The FP diffusers model (or an ``(x, t) -> ε`` callable).
        scheduler: The model's training scheduler.
        sampler: The deployment sampler; the tables are valid for it only.
        config: PTQD settings; ``config.seed`` must be a calibration seed, not the evaluation seed.
        batch_size: Trajectories per network call while collecting the pair.
        conditions: Per-sample conditions (``None``: unconditional model).
        guidance_scale: Classifier-free guidance scale of the deployment; the tables are keyed by it.

    Returns:
        The corrected denoiser, ready for ``tadq.sample`` and ``save_pretrained``.
    """
    if not isinstance(qmodel, QuantizedDenoiser):
        raise TypeError(f"fit_ptqd takes a QuantizedDenoiser (from tadq.quantize), got {type(qmodel).__name__}")
    if not isinstance(config, PTQDConfig):
        raise TypeError(f"fit_ptqd takes a PTQDConfig, got {type(config).__name__}")
    existing = list(qmodel.corrections)
    stack = CorrectionStack([*existing, PTQDCorrection(config)])
    plan = SamplingPlan.build(scheduler, sampler, guidance_scale)
    ctx = FitContext.of(as_denoiser(fp_model), qmodel, plan, conditions=conditions, batch_size=batch_size)
    fit_stack(stack, ctx, start=len(existing))
    correction = stack[len(existing)]
    logger.info("PTQD %s on %s: mean k = %.4f, mean |μ| = %.4g, mean σ_q = %.4g; %s", qmodel.config.label,
                sampler.key, float(correction.k.mean()), float(correction.mu.abs().mean()),
                float(correction.sigma_q.mean()), vsc_report(correction))
    return with_corrections(qmodel, stack)
