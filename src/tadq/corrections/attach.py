"""Attach fitted corrections to a quantized model: ``fit_corrections`` is what a row or a user calls to put any
stack of correction configs on top of a ``QuantizedDenoiser`` for one deployment sampler (docs/methods/composition.md).

Imported explicitly (it depends on ``tadq.denoiser``, which imports ``tadq.corrections``).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence

from torch import Tensor, nn

from tadq.corrections.base import CorrectionConfig
from tadq.corrections.context import FitContext, single_placement
from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.corrections.stack import CorrectionStack, fit_stack
from tadq.denoiser import QuantizedDenoiser
from tadq.recipe import Recipe
from tadq.registry import adapter_for, correction_for
from tadq.sampling import Conditioning, ConditionSource, Denoiser, SamplerConfig, SamplingPlan

__all__ = ["as_denoiser", "fit_corrections", "models_sharing", "with_corrections"]

logger = logging.getLogger(__name__)

# network → the models that ``with_corrections`` made share it (weak both ways: tracking keeps nothing alive), so an
# in-place conversion of one of them can refuse to change the others' layers under them (``to_backend``)
_SHARING: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def models_sharing(network: nn.Module) -> list[QuantizedDenoiser]:
    """The live models that ``with_corrections`` built on ``network`` (and their sources) that still run it."""
    return [model for model in _SHARING.get(network, ()) if model.model is network]


def as_denoiser(model: nn.Module | Denoiser) -> Denoiser:
    """``(x, t, cond) -> prediction`` of a diffusers model through its adapter; a ``QuantizedDenoiser`` or callable
    as is.

    The model runs where and as it is: the states (placed as the quantized model's) and the conditions are moved
    to its device and dtype, its prediction back to theirs, so an FP reference kept in another dtype or on another
    device than the quantized model still serves the fit (it failed inside its first layer).
    """
    if isinstance(model, QuantizedDenoiser) or not isinstance(model, nn.Module):
        return model
    adapter = adapter_for(model)
    device, dtype = single_placement(model)
    if device is None or dtype is None:  # no parameters, or split over devices or dtypes: called as it is
        return lambda x, t, cond=None: adapter.predict_eps(model, x, t, cond)

    def call(x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:  # each .to a no-op when placed
        cond = None if cond is None else cond.to(device, dtype)
        return adapter.predict_eps(model, x.to(device=device, dtype=dtype), t.to(device), cond).to(x.device, x.dtype)

    return call


def with_corrections(qmodel: QuantizedDenoiser, stack: CorrectionStack) -> QuantizedDenoiser:
    """A new model of ``qmodel``'s class sharing its network (no weights copied) with ``stack`` as corrections.

    Everything but the corrections is ``qmodel``'s own: its calibrated guidance branch ranges (a fresh
    ``BranchRanges`` would quantize the unconditional rows with Δ = 1, z = 0), its recipe, and on an integer backend
    its class and backend attributes (an ``IntegerDenoiser`` rebuilt as a plain ``QuantizedDenoiser`` lost its
    placement and ``save_pretrained`` refusals and, compiled, the frozen no-grad call its graph needs).
    """
    view = QuantizedDenoiser(qmodel.model, qmodel.adapter, qmodel.config, qmodel.plans)
    view.__class__ = type(qmodel)
    for name, value in vars(qmodel).items():  # plain attributes: recipe, reconstruction report, backend, layers, ...
        if not name.startswith("_"):
            object.__setattr__(view, name, value)
    view.branch_ranges = qmodel.branch_ranges  # the calibrated buffers, shared like the network they belong to
    view.corrections = stack
    sharing = _SHARING.setdefault(qmodel.model, weakref.WeakSet())
    sharing.update((qmodel, view))
    return view


def fit_corrections(
    qmodel: QuantizedDenoiser,
    fp_model: nn.Module | Denoiser,
    scheduler,
    sampler: SamplerConfig,
    configs: Sequence[CorrectionConfig],
    *,
    batch_size: int = 128,
    conditions: ConditionSource | None = None,
    guidance_scale: float = 1.0,
    fp_trajectories: FPTrajectoryCache | None = None,
    progress: bool = True,
) -> QuantizedDenoiser:
    """``qmodel`` with the corrections of ``configs`` appended to its own and fitted in application order.

    Each new correction is fitted on a pair (or a sequential pass) with every earlier one active, so output
    correctors that estimate the same map (PTQD, TAC NER, TCEC) never correct twice. ``qmodel`` is unchanged: the
    result shares its network, so a base row and its corrected rows come from the very same weights.

    Args:
        qmodel: The quantized model, possibly with corrections already.
        fp_model: The FP diffusers model (or an ``(x, t) -> ε`` callable).
        scheduler: The model's training scheduler.
        sampler: The deployment sampler; every table is valid for it only.
        configs: Correction configs in application order; their seeds must be calibration seeds.
        batch_size: Samples per network call while fitting.
        conditions: Per-sample conditions of the fitting runs (``None``: unconditional model).
        guidance_scale: Classifier-free guidance scale of the deployment; the tables are keyed by it.
        fp_trajectories: FP trajectories shared with other fits on ``fp_model`` (the cache's network must be
            ``fp_model``); the tables are the same with or without it, only the FP walks are skipped.
        progress: Show a tqdm bar over each walk's steps (no effect on the tables).
    """
    if not isinstance(qmodel, QuantizedDenoiser):
        raise TypeError(f"fit_corrections takes a QuantizedDenoiser (from tadq.quantize), got {type(qmodel).__name__}")
    if fp_trajectories is not None and fp_trajectories.model is not fp_model:
        raise ValueError("fp_trajectories keeps another network's FP trajectories: build it from this fp_model")
    existing = list(qmodel.corrections)
    stack = CorrectionStack([*existing, *(correction_for(config) for config in configs)])
    plan = SamplingPlan.build(scheduler, sampler, guidance_scale)
    ctx = FitContext.of(as_denoiser(fp_model), qmodel, plan, conditions=conditions, batch_size=batch_size,
                        fp_trajectories=fp_trajectories, progress=progress)
    fit_stack(stack, ctx, start=len(existing))
    # the fitted tables (built on the CPU) beside the network, as tadq.load(dir, device=) places them: left on the
    # CPU, a GPU model copied a row of each to the device at every step (a host sync each)
    for member in tuple(stack)[len(existing):]:  # (the earlier members are qmodel's own: left where they are)
        member.to(ctx.device)
    corrected = with_corrections(qmodel, stack)
    corrected.recipe = _recipe_with(getattr(qmodel, "recipe", None), configs, sampler, plan.guidance_scale)
    return corrected


def _recipe_with(recipe: Recipe | None, configs: Sequence[CorrectionConfig], sampler: SamplerConfig,
                 guidance_scale: float) -> Recipe | None:
    """The recipe of the corrected model: ``recipe`` with ``configs`` appended to its corrections when they were
    fitted for its (one) deployment, so the artefact records the stack it carries (it recorded the base's recipe:
    ``tadq sample`` named the model without its corrections and did not check the sampler flags against their
    tables). A recipe that cannot hold them (another sampler or scale than its deployment's) is kept as it is."""
    if not isinstance(recipe, Recipe) or not configs:
        return recipe
    if len(recipe.deployments) != 1 or recipe.sampler != sampler or recipe.guidance_scale != guidance_scale:
        logger.info("the model's recipe (deployed with %s at guidance %g) does not record corrections fitted for %s "
                    "at guidance %g", recipe.sampler.key, recipe.guidance_scale, sampler.key, guidance_scale)
        return recipe
    return dataclasses.replace(recipe, corrections=(*recipe.corrections, *configs), name="")
