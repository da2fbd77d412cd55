"""The public verbs: ``quantize`` and ``sample`` (thin orchestration over the core)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from tadq.calibration import CalibrationSet
from tadq.calibration.data import check_calibration_matches
from tadq.calibration.reconstruction import check_checkpoint_settings
from tadq.config import QuantConfig
from tadq.corrections.attach import fit_corrections
from tadq.corrections.base import HookedDenoiser
from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.denoiser import QuantizedDenoiser
from tadq.device import (
    check_weights_loaded,
    float32_default,
    model_placement,
    place_model,
    resolve_device,
    resolve_dtype,
    same_device,
)
from tadq.methods import quantize_base
from tadq.prepare import (
    build_quantized_structure,
    calibrate_activations,
    check_no_adapter_layers,
    check_no_runtime_hooks,
    check_plain_weights,
    check_unshared_weights,
    wrap_in_place,
)
from tadq.provenance import check_same_architecture
from tadq.recipe import Recipe, method_handler
from tadq.registry import adapter_for, correction_for
from tadq.sampling import Conditioning, ConditionSource, SamplerConfig, SamplingPlan, SamplingResult, check_seed
from tadq.sampling import sample as _sample_loop
from tadq.typecheck import expect, expect_int, expect_scheduler
from tadq.utils import eval_mode

__all__ = ["quantize", "build_quantized_structure", "calibrate_activations", "sample", "load", "check_method_dtype"]

logger = logging.getLogger(__name__)


def quantize(
    model: nn.Module, scheduler, recipe: Recipe | QuantConfig, *, calibration: CalibrationSet | None = None,
    cache_dir: str | Path | None = None, checkpoint: str | Path | None = None, progress: bool = True,
    base: QuantizedDenoiser | None = None, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None, fit_batch_size: int = 128, conditions: ConditionSource | None = None,
    fp_trajectories: FPTrajectoryCache | None = None,
) -> QuantizedDenoiser:
    """Quantize a copy of ``model`` as ``recipe`` says (the original is never modified); the result carries it
    (``.recipe``, saved as ``tadq_recipe.json``).

    Phases: prepare (plan and wrap layers) → calibrate (timestep-aware data from the FP sampler, activation ranges)
    → the method's handler (Q-Diffusion reconstruction, TFMQ-DM...) → fit the correction stack in order for the
    first deployment sampler. A plain ``QuantConfig`` runs the first three phases as before.

    Args:
        model: a diffusers denoiser supported by a registered adapter.
        scheduler: its training scheduler (its config builds the calibration sampler).
        recipe: a ``tadq.recipe.Recipe`` (or a ``QuantConfig``: no corrections, deployed with its calibration
            sampler).
        calibration: precomputed calibration data (skips the FP sampling run); a set ``collect_calibration_set``
            made for another model, scheduler, calibration config or conditioning is refused, naming what differs.
        cache_dir: where calibration data is cached between runs.
        checkpoint: reconstruction checkpoint file: written after every unit, resumed from if present (method
            ``qdiffusion`` only; one of other reconstruction settings is refused before calibration).
        base: a network already built for ``recipe.base()`` (e.g. loaded from disk): the method is not run again,
            only what the recipe adds to it (the corrections; TFMQ's per-step tables); raises if it does not fit
            or was quantized from another model than ``model``.
        device: where every phase runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``); ``None``: the model's device.
        dtype: compute dtype of the FP reference (float32, bfloat16, float16); ``None``: the model's dtype.
        fit_batch_size: trajectories per network call while fitting corrections.
        conditions: per-sample conditioning of the calibration trajectories and of the correction fits (class
            labels, prompts: use a set disjoint from the evaluation one); required by a conditional model. Both run
            at the first deployment's guidance scale (``recipe.deployments[0].guidance_scale``), and the correction
            tables are keyed to it.
        fp_trajectories: an ``FPTrajectoryCache(model)`` shared by several calls on the same model (presets,
            correction stacks): the FP trajectories the correction fits walk are computed once. Same tables with or
            without it; not used when the FP reference is a moved or cast copy of ``model``.
    """
    expect(model, nn.Module, "model", "tadq.quantize")
    if isinstance(model, (QuantizedDenoiser, HookedDenoiser)):  # was: "no tadq adapter ... add one"
        raise TypeError(f"tadq.quantize: model is already quantized ({type(model).__name__}); quantize the FP model "
                        "it was made from, or pass it as base= with that FP model to fit a recipe's corrections on it")
    # dropout off for every FP call (calibration trajectories, fits): a model left in training mode made them
    # random, so two identical calls gave different models; the caller's modes are restored afterwards. tadq's
    # own tensors float32 whatever default dtype the caller set (float32_default)
    with eval_mode(model), float32_default():
        return _quantize(model, scheduler, recipe, calibration=calibration, cache_dir=cache_dir,
                         checkpoint=checkpoint, progress=progress, base=base, device=device, dtype=dtype,
                         fit_batch_size=fit_batch_size, conditions=conditions, fp_trajectories=fp_trajectories)


def _quantize(
    model: nn.Module, scheduler, recipe: Recipe | QuantConfig, *, calibration: CalibrationSet | None,
    cache_dir: str | Path | None, checkpoint: str | Path | None, progress: bool, base: QuantizedDenoiser | None,
    device: str | torch.device | None, dtype: str | torch.dtype | None, fit_batch_size: int,
    conditions: ConditionSource | None, fp_trajectories: FPTrajectoryCache | None,
) -> QuantizedDenoiser:
    """``quantize`` with ``model`` in eval mode."""
    if fp_trajectories is not None:
        expect(fp_trajectories, FPTrajectoryCache, "fp_trajectories", "tadq.quantize")
    fit_batch_size = expect_int(fit_batch_size, "fit_batch_size", "tadq.quantize")  # else refused after calibration
    if fit_batch_size < 1:
        raise ValueError(f"tadq.quantize: fit_batch_size must be >= 1, got {fit_batch_size}")
    expect_scheduler(scheduler, "tadq.quantize")
    check_weights_loaded(model, "tadq.quantize")
    check_plain_weights(model, "tadq.quantize")
    check_unshared_weights(model, "tadq.quantize")  # before any sampling, not when the artefact is written
    check_no_runtime_hooks(model, "tadq.quantize")
    check_no_adapter_layers(model, "tadq.quantize")  # a LoRA not fused and unloaded, named before any sampling
    if base is not None:  # its weights are reused as they are: refused here, not by its first forward
        expect(base, QuantizedDenoiser, "base", "tadq.quantize")
        check_weights_loaded(base, "tadq.quantize: base")
        check_float32_base(base)
        try:  # its network is reused and the recipe's corrections fitted against ``model``: the same model only
            check_same_architecture(base, model)
        except ValueError as error:
            raise ValueError(f"base= was not quantized from this model: {error}") from error
    if calibration is not None:
        expect(calibration, CalibrationSet, "calibration", "tadq.quantize")
    if isinstance(recipe, QuantConfig):
        config, derived = recipe, Recipe.from_quant_config(recipe)
        recipe = derived if derived.quant_config() == config else None
    elif isinstance(recipe, Recipe):
        config = recipe.quant_config()
    else:
        raise TypeError(f"quantize takes a Recipe or a QuantConfig, got {type(recipe).__name__}")
    if checkpoint is not None:  # it was ignored without a word where nothing is reconstructed
        if base is not None or config.method != "qdiffusion":
            runs = "a base= model is reused as it is" if base is not None else f"method {config.method!r} runs none"
            raise ValueError(f"checkpoint= (--checkpoint) resumes a block reconstruction, and {runs}: drop it (or "
                             "quantize with method 'qdiffusion')")
        check_checkpoint_settings(checkpoint, config.reconstruction)  # before calibration, not after it
    guidance_scale = recipe.guidance_scale if recipe is not None else 1.0
    if calibration is None or (recipe is not None and recipe.corrections) or conditions is not None:
        check_conditions(model, conditions, guidance_scale, "tadq.quantize")  # before it is copied or sampled
    if recipe is not None:  # Flux: the tables are keyed to the distilled scale its conditions embed, as the CLI
        recipe = _record_distilled_guidance(recipe, conditions)
    # the model's own placement, when device=/dtype= leave it, must be one (refused for a split model, before work)
    own = model_placement(model, "tadq.quantize", device=device is None, dtype=dtype is None)
    parameter = next(model.parameters(), None)
    if own is None and parameter is not None:
        own = parameter.device, parameter.dtype
    device = resolve_device(device) if device is not None else (own[0] if own is not None else None)
    dtype = resolve_dtype(dtype) if dtype is not None else (own[1] if own is not None else None)
    if parameter is not None:
        check_method_dtype(config, dtype, recipe)  # before the model is copied and cast
    fp = place_model(model, device, dtype) if parameter is not None else model
    # the fake-quant network computes in float32 (its Δ, z and rounding are float32); the FP reference in ``dtype``
    network = fp if parameter is None or dtype == torch.float32 else place_model(model, device, torch.float32)
    if network is not fp and network is not model:  # cast here for this call: its layers are wrapped, not copied
        wrap_in_place(network)
    # every sampler the model will be calibrated or deployed with must drive this scheduler: refused here, before
    # calibration or reconstruction, not when a correction is fitted or the model is first sampled
    plans = [SamplingPlan.build(scheduler, deployment.sampler, deployment.guidance_scale)
             for deployment in (recipe.deployments if recipe is not None else ())]
    if recipe is None:  # a Recipe's calibration sampler is its first deployment's (Recipe checks it)
        SamplingPlan.build(scheduler, config.calibration.sampler, guidance_scale)
    for correction in recipe.corrections if recipe is not None else ():  # fitted along the first deployment
        correction_for(correction).check_fittable(plans[0].steps)
    if calibration is not None:  # made for this call's model, scheduler, config and conditioning, or refused
        check_calibration_matches(calibration, model, scheduler, config.calibration, conditions, guidance_scale)
    handler = method_handler(recipe.method) if recipe is not None else None
    options = {"cache_dir": cache_dir, "progress": progress, "conditions": conditions,
               "guidance_scale": guidance_scale}
    if base is not None:
        if recipe is None:
            raise ValueError("base= needs a Recipe whose quant_config() is the base's QuantConfig")
        qmodel = handler.reuse(base, fp, scheduler, recipe, config, **options)
    elif handler is not None:
        qmodel = handler.quantize(network, fp, scheduler, recipe, config, calibration=calibration,
                                  checkpoint=checkpoint, **options)
    else:
        qmodel = quantize_base(network, fp, scheduler, None, config, calibration=calibration, checkpoint=checkpoint,
                               **options)
    if recipe is not None and recipe.corrections:
        reference = _reference(fp, network)
        shared = fp_trajectories if fp_trajectories is not None and reference is fp_trajectories.model else None
        if fp_trajectories is not None and shared is None:
            logger.info("fp_trajectories not used: the FP reference is a moved or cast copy of the cache's model")
        qmodel = fit_corrections(qmodel, reference, scheduler, recipe.sampler, recipe.corrections,
                                 batch_size=fit_batch_size, conditions=conditions, guidance_scale=guidance_scale,
                                 fp_trajectories=shared, progress=progress)
    qmodel.recipe = recipe
    plans = qmodel.plans
    quantized = sum(p.quantized for p in plans)
    logger.info("quantized %d of %d layers (%s)", quantized, len(plans), config.label)
    if plans and not quantized:  # e.g. --exclude '*': saved and sampled as a quantized model that is not one
        logger.warning("no layer was quantized: exclude %s and keep_fp_roles %s keep all %d quantizable layers in "
                       "floating point, so this %s model computes its convs and linears in float",
                       list(config.exclude), list(config.keep_fp_roles), len(plans), config.label)
    return qmodel.eval()  # modules a method installed (TFMQ's per-step quantizers) were built in training mode


def check_method_dtype(config: QuantConfig, dtype: torch.dtype, recipe: Recipe | None = None) -> None:
    """Refuse an FP reference in another dtype than float32 for the methods that compare FP and quantized blocks
    in one dtype (Q-Diffusion's block reconstruction; TFMQ-DM, except on an SVDQuant base), before the model is
    copied and cast (``tadq quantize`` asks before loading it): TFMQ on a naive base was refused only once both
    copies of the model existed."""
    if dtype == torch.float32:
        return
    name = str(dtype).removeprefix("torch.")
    if config.method == "qdiffusion":
        raise NotImplementedError(f"block reconstruction compares FP and quantized blocks in one dtype: quantize "
                                  f"with dtype=float32, not {name} (sampling, evaluation and naive PTQ take it)")
    method = getattr(recipe, "method", None)
    if type(method).__name__ == "TFMQMethod" and getattr(method, "base", None) != "svdquant":
        raise NotImplementedError(f"TFMQ-DM reconstructs against the FP model itself: quantize with dtype=float32, "
                                  f"not {name}")


def check_float32_base(base: QuantizedDenoiser) -> None:
    """Refuse a ``base=`` network in another dtype than float32 (``tadq.load(dir, dtype=torch.bfloat16)``, a
    ``.half()`` copy): the corrections were fitted against its low-precision outputs, and the result could be saved
    only after ``.float()``, as an artefact whose tables belong to another network than the one it stores."""
    lowered = next((p for p in base.model.parameters() if p.is_floating_point() and p.dtype != torch.float32), None)
    if lowered is not None:
        name = str(lowered.dtype).removeprefix("torch.")
        raise ValueError(f"tadq.quantize: base is in {name}; the fake-quant network computes in float32 and the "
                         "recipe's corrections are fitted against it: pass it in float32 (tadq.load(dir) without "
                         "dtype=; dtype= of quantize sets the FP reference's dtype), and sample the result in "
                         f"{name} with tadq.sample(..., dtype=) or load its artefact with tadq.load(dir, dtype=)")


def check_conditions(model: nn.Module, conditions: ConditionSource | None, guidance_scale: float,
                     where: str) -> None:
    """Raise before any sampling when ``conditions`` does not fit ``model`` or the guidance scale: a conditional
    model without conditions or without a field it needs, conditions for an unconditional model, guidance without
    an unconditional branch."""
    adapter = adapter_for(model)
    wanted = adapter.conditioning_inputs(model)
    if wanted and conditions is None:
        raise ValueError(f"{where}: this {type(model).__name__} is conditional (takes {list(wanted)}): pass "
                         "conditions= (class labels or prompts for calibration, disjoint from the evaluation ones)")
    if not wanted and conditions is not None:
        raise ValueError(f"{where}: this {type(model).__name__} is unconditional but was given conditions")
    probe = conditions(0, [0]) if conditions is not None else None
    if probe is not None:  # a field the model needs (SDXL's pooled text, a class embedding's labels) or does not take
        # (a text mask for Flux) is named here, not by the first forward, after the model was copied and traced
        given = {name for name in probe.describe() if name != "unconditional"}
        missing = [name for name in wanted if name not in given]
        if missing:
            raise ValueError(f"{where}: this {type(model).__name__} needs {list(wanted)}; the conditioning lacks "
                             f"{missing} (it has {sorted(given)})")
        optional = getattr(adapter, "optional_inputs", None)  # an adapter registered without it: its own check
        extra = [] if optional is None else sorted(given - set(wanted) - set(optional))
        if extra:
            raise ValueError(f"{where}: this {type(model).__name__} takes {list(wanted)}"
                             + (f" (and optionally {list(optional)})" if optional else "") + f", not {extra}")
    if guidance_scale != 1.0:
        if conditions is None:
            raise ValueError(f"{where}: guidance_scale={guidance_scale} needs a conditional model and conditions")
        if probe.unconditional is None:
            raise ValueError(f"{where}: guidance_scale={guidance_scale} needs an unconditional branch (a null class "
                             "or a negative/empty prompt) but the conditions have none")
        try:  # both branches run in one call: a field only one of them carries failed that first guided call
            probe.guidance_batch()
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from error


def embedded_guidance(conditions: ConditionSource | None) -> float | None:
    """The distilled guidance scale a guidance-distilled model (Flux) is given by ``conditions``
    (``added_cond_kwargs["guidance"]`` of the first sample), ``None`` where they carry none."""
    if conditions is None:
        return None
    value = conditions(0, [0]).added_cond_kwargs.get("guidance")
    return None if value is None else float(value.reshape(-1)[0])


def _record_distilled_guidance(recipe: Recipe, conditions: ConditionSource | None) -> Recipe:
    """``recipe`` with its first deployment's ``distilled_guidance`` set to the scale ``conditions`` embed (Flux),
    as ``tadq quantize`` records it; another scale already recorded there is refused before any work. The Python
    API recorded none, so tables fitted at 3.5 were then sampled at 7 without a word."""
    deployment = recipe.deployments[0]
    embedded = embedded_guidance(conditions)
    if embedded is None:
        return recipe
    if deployment.distilled_guidance is not None and deployment.distilled_guidance != embedded:
        raise ValueError(f"tadq.quantize: recipe.deployments[0].distilled_guidance={deployment.distilled_guidance:g} "
                         f"but the conditions embed guidance {embedded:g}: the tables are fitted at the scale the "
                         "conditions give; make the two agree")
    if deployment.distilled_guidance == embedded:
        return recipe
    recorded = dataclasses.replace(deployment, distilled_guidance=embedded)
    return dataclasses.replace(recipe, deployments=(recorded, *recipe.deployments[1:]))


def check_distilled_guidance_of(denoiser: nn.Module, conditions: ConditionSource | None, where: str) -> None:
    """Refuse conditions embedding another distilled guidance scale (Flux) than the one ``denoiser``'s fitted
    correction or per-step tables were fitted at (its recipe's ``deployments[0].distilled_guidance``)."""
    recipe = getattr(denoiser, "recipe", None)
    recorded = None if recipe is None else recipe.deployments[0].distilled_guidance
    used = embedded_guidance(conditions) if recorded is not None else None
    if used is None or used == recorded:
        return
    fitted = any(getattr(member, "table_key", None) is not None or getattr(member, "sampler_key", None) is not None
                 for member in getattr(denoiser, "corrections", ()))
    if fitted:
        raise ValueError(f"{where}: this model's per-step tables were fitted at the distilled guidance {recorded:g} "
                         f"(added_cond_kwargs['guidance']), and the conditions embed {used:g}: sample at the fitted "
                         "scale, or quantize again for this one")


def _reference(fp: nn.Module, network: nn.Module):
    """The FP reference as the fits call it: itself, or (another dtype than the float32 network) a callable that
    runs it in its dtype on the network's states and returns ε in theirs."""
    if fp is network:
        return fp
    adapter = adapter_for(fp)
    dtype = next(fp.parameters()).dtype

    def call(x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        cond = None if cond is None else cond.to(x.device, dtype)
        return adapter.predict_eps(fp, x.to(dtype), t, cond).to(x.dtype)

    return call


def sample(
    denoiser: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int,
    batch_size: int = 128, hooks: Sequence = (), record_trajectory: bool = False, progress: bool = True,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
) -> SamplingResult:
    """Sample with tadq's loop from a FP diffusers model or a ``QuantizedDenoiser``.

    ``device``/``dtype`` run it on a moved copy of ``denoiser`` (``None``: where and as it is; a device torch
    does not have raises naming it).

    A denoiser carrying corrections (``QuantizedDenoiser``, ``MixedPrecisionDenoiser``) applies them first, then
    ``hooks``. ``conditions`` gives each sample its conditioning (from (seed, index) or an explicit list);
    ``guidance_scale`` ≠ 1 runs classifier-free guidance and needs their unconditional branch. States follow the
    model's device and dtype (noise is drawn on the CPU, then moved).
    """
    expect(denoiser, nn.Module, "denoiser", "tadq.sample")
    expect_scheduler(scheduler, "tadq.sample")
    check_weights_loaded(denoiser, "tadq.sample")
    expect(sampler, SamplerConfig, "sampler", "tadq.sample")
    num_samples, seed = expect_int(num_samples, "num_samples", "tadq.sample"), expect_int(seed, "seed", "tadq.sample")
    batch_size = expect_int(batch_size, "batch_size", "tadq.sample")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"tadq.sample: num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    check_seed("tadq.sample: seed", seed)  # refused here, not by the first noise draw after the progress bar started
    check_no_runtime_hooks(denoiser, "tadq.sample", only=("layerwise_casting",))  # not "several dtypes: dtype="
    plan = SamplingPlan.build(scheduler, sampler, guidance_scale)
    from tadq.backends.integer_denoiser import IntegerDenoiser

    first = next(denoiser.parameters(), None)
    integer = isinstance(denoiser, IntegerDenoiser)
    # where and as it is, when device=/dtype= leave it: one place (a split model is refused here, not mid-step)
    placement = model_placement(denoiser, "tadq.sample", device=device is None, dtype=dtype is None)
    if placement is None and first is not None:
        placement = first.device, first.dtype
    if (device is not None or dtype is not None or integer) and first is not None:
        target_device = resolve_device(device) if device is not None else placement[0]
        target_dtype = resolve_dtype(dtype) if dtype is not None else placement[1]
        if integer:  # its kernels' device type and float32, checked before it is moved or run
            from tadq.backends import check_placement

            check_placement(denoiser.backend, target_device, target_dtype)
        # a fake-quant layer cast to another dtype puts its weights on their grid first (QuantLayer._apply): the
        # bytes its artefact loaded in that dtype gives
        denoiser = place_model(denoiser, target_device, target_dtype)
        placement = target_device, target_dtype
    if isinstance(denoiser, HookedDenoiser):
        check_distilled_guidance_of(denoiser, conditions, "tadq.sample")
        call, shape = denoiser, denoiser.sample_shape
        hooks = (*denoiser.correction_hooks(), *hooks)
    else:
        adapter = adapter_for(denoiser)

        def call(x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
            return adapter.predict_eps(denoiser, x, t, cond)

        shape = adapter.sample_shape(denoiser)
    _check_prediction(denoiser, plan)
    # dropout off: a model left in training mode sampled differently on every call; tadq's noise and step constants
    # float32 whatever default dtype the caller set (the same samples under torch.set_default_dtype(float64))
    with eval_mode(denoiser), float32_default():
        return _sample_loop(
            call, plan, num_samples=num_samples, seed=seed, sample_shape=shape, batch_size=batch_size, hooks=hooks,
            conditions=conditions, record_trajectory=record_trajectory, progress=progress, device="cpu"
            if placement is None else placement[0], dtype=None if placement is None else placement[1],
        )


def _check_prediction(denoiser: nn.Module, plan: SamplingPlan) -> None:
    """The adapter's refusal of a plan whose prediction type the model does not output (a flow model's velocity
    sampled as ε), for adapters that declare one (``check_prediction``)."""
    if isinstance(denoiser, HookedDenoiser):  # a QuantizedDenoiser knows its adapter and network
        model, adapter = getattr(denoiser, "model", None), getattr(denoiser, "adapter", None)
    else:
        model, adapter = denoiser, adapter_for(denoiser)
    check = getattr(adapter, "check_prediction", None)
    if check is not None:
        check(model, plan.steps[0].prediction_type)


def load(
    directory: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    backend: str = "fake",
) -> tuple[QuantizedDenoiser, object]:
    """(quantized denoiser with its ``.recipe``, training scheduler) from an artefact, on ``device`` in ``dtype``.

    The device and dtype are checked before the files are read; float32 (the default) samples bit-identically to
    the saved model, another dtype rounds Δ·(codes − z) to it. ``backend`` (``tadq.backends``): ``"fake"``
    simulates the integer arithmetic in float; an integer backend (``"int8"``...) converts the model while loading,
    on its backend's device type in float32 (``device=None``: ``cpu`` for ``int8``, the current GPU for
    ``int8-cuda``; another placement is refused before anything is read).
    """
    from tadq.io import load_quantized

    target_dtype = resolve_dtype(dtype)
    if backend != "fake":  # as load_pipeline(backend=...): the docs name tadq.load(dir, backend=...)
        from tadq.backends import check_backend, check_placement

        kernels = check_backend(backend).device_type
        # device=None: where its kernels run (int8-cuda: the current GPU), as the backend itself places it
        target_device = resolve_device(device if device is not None else (kernels or "cpu"))
        check_placement(backend, target_device, target_dtype)
        with float32_default():
            qmodel, scheduler = load_quantized(directory, backend=backend)
        placed = next((p.device for p in qmodel.parameters()), target_device)
        if not same_device(placed, target_device):  # int8-cuda lands on the current GPU: device="cuda:1" moves it
            qmodel.to(target_device)
        return qmodel, scheduler
    target_device = resolve_device(device)
    # the rebuilt model's weights float32 as saved, whatever default dtype the caller set: under float64 every
    # stored tensor was refused as "altered"
    with float32_default():
        qmodel, scheduler = load_quantized(directory)
    if (target_device, target_dtype) != (torch.device("cpu"), torch.float32):
        recipe = getattr(qmodel, "recipe", None)
        qmodel = qmodel.to(device=target_device, dtype=target_dtype)
        qmodel.recipe = recipe
    return qmodel, scheduler
