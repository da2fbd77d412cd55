"""``quantize_tfmq`` and ``apply_tfmq``: TFMQ-DM end to end on tadq's base quantizer (docs/methods/tfmq.md).

Order (docs/methods/composition.md#calibration-order, step 1):

    1. plan and wrap the layers; calibrate single activation ranges (as ``tadq.quantize``)
    2. TIAR: AdaRound the TIB against the FP temporal features over the sampler grid (× labels)
    3. block reconstruction of everything else, the TIB frozen; each block sees the quantized temporal input
    4. FSC: per-step ranges of the TIB's (or every) activation quantizer          } ``apply_tfmq``: cheap, and
    5. maintenance: TIB, cache (FP / quantized) or the per-block selection        } re-runnable on saved weights
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from torch import Tensor, nn

from tadq.calibration import activation_quantizers, collect_calibration_set
from tadq.calibration.data import CalibrationSet
from tadq.calibration.reconstruction import reconstruct
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections.stack import CorrectionStack
from tadq.denoiser import QuantizedDenoiser
from tadq.methods import calibration_for, calibration_on
from tadq.prepare import build_quantized_structure, calibrate_activations
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig, SamplingPlan
from tadq.sampling.conditioning import ConditionSource
from tadq.tfmq.cache import dequantize_cache, disturbance_rows, quantize_cache
from tadq.tfmq.config import TFMQConfig
from tadq.tfmq.correction import TFMQCorrection
from tadq.tfmq.fsc import calibrate_per_step
from tadq.tfmq.tiar import reconstruct_tib
from tadq.tfmq.tib import TemporalInformationBlock, grid_inputs

__all__ = ["quantize_tfmq", "apply_tfmq", "deployment_grid", "temporal_features_per_step", "check_fsc_format"]

logger = logging.getLogger(__name__)


def check_fsc_format(quant_config: QuantConfig, tfmq_config: TFMQConfig) -> None:
    """Refuse FSC's per-step activation steps on fp8 activations (``QScheme.format``), before any calibration: FSC
    tabulates integer (Δ, z) per step; per-step fp8 scales are not implemented (``fsc="off"`` keeps TIAR and the
    feature cache, which do not touch the activation grid)."""
    if tfmq_config.fsc != "off" and quant_config.activations.fp8:
        raise ValueError(f"TFMQ's FSC (fsc={tfmq_config.fsc!r}) tabulates integer activation steps per sampler "
                         f"step; activations in {quant_config.activations.format} are not supported by it: use "
                         "TFMQConfig(fsc='off') or integer activations")


def deployment_grid(scheduler, sampler: SamplerConfig) -> Tensor:
    """The training timestep of every sampler step, (S,) (step 0 = noisiest): long, refused when a step falls
    between training timesteps."""
    timesteps = SamplingPlan.build(scheduler, sampler).timesteps()
    fractional = [float(t) for t in timesteps if float(t) != round(float(t))]
    if fractional:
        raise NotImplementedError(
            f"TFMQ-DM builds its per-step tables at integer training timesteps, but the {sampler.key} grid of this "
            f"scheduler visits fractional ones (e.g. {fractional[0]:g}; euler and dpmsolver++ grids with linspace "
            "spacing do): its tables would be built at the rounded timesteps and refused when sampled. Use a grid "
            "on integer timesteps (ddim or ddpm, or timestep_spacing 'leading' / 'trailing')")
    return timesteps.long()


def quantize_tfmq(
    model: nn.Module, scheduler, quant_config: QuantConfig, tfmq_config: TFMQConfig, sampler: SamplerConfig, *,
    calibration: CalibrationSet | None = None, cache_dir: str | None = None, checkpoint: str | None = None,
    progress: bool = True, conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
) -> QuantizedDenoiser:
    """Quantize a copy of ``model`` with TFMQ-DM on top of ``quant_config``'s base quantizer.

    Args:
        model: a diffusers ``UNet2DModel`` (left unmodified).
        scheduler: its training scheduler.
        quant_config: the base quantizer (e.g. the Q-Diffusion row's config); ``method="qdiffusion"`` runs block
            reconstruction after TIAR, ``"naive"`` none.
        tfmq_config: TIAR, FSC and maintenance settings.
        sampler: the deployment sampler: the finite set of timesteps every per-step table is built for.
        calibration: the base calibration set (collected from ``quant_config.calibration`` when ``None``; moved to
            the model's device and dtype).
        cache_dir: where calibration sets are cached between runs.
        checkpoint: block-reconstruction checkpoint file.
        conditions: per-sample conditions of the FP trajectories (calibration set, model-wide FSC) of a conditional
            model; the temporal path itself reads only (t, class label), so TIAR and the feature cache need none.
        guidance_scale: the deployment's classifier-free guidance scale those trajectories are sampled with.

    Returns:
        A ``QuantizedDenoiser`` whose ``corrections`` hold the ``TFMQCorrection`` (saved and restored by
        ``save_quantized``/``load_quantized``); ``corrections[0].report`` has the TIAR and disturbance results.
    """
    if quant_config.method not in ("naive", "qdiffusion"):  # before calibration: svdquant's fit is not run here
        raise ValueError(f"quantize_tfmq builds TFMQ-DM on the 'naive' or 'qdiffusion' base, not "
                         f"{quant_config.method!r}: its smoothing and low-rank branches would stay identity and "
                         "empty. For TFMQ-DM on SVDQuant use tadq.quantize with TFMQMethod(base='svdquant', ...)")
    check_fsc_format(quant_config, tfmq_config)
    adapter = adapter_for(model)
    check_temporal_path(model, adapter)
    deployment_grid(scheduler, sampler)  # a fractional grid is refused before calibration
    qmodel = build_quantized_structure(model, quant_config)
    if calibration is None:
        calibration = collect_calibration_set(model, adapter, scheduler.config, quant_config.calibration,
                                              cache_dir=cache_dir, progress=progress, conditions=conditions,
                                              guidance_scale=guidance_scale)
    calibration = calibration_for(calibration, model)  # as the naive and Q-Diffusion bases take a given set
    if quant_config.activations.enabled:
        calibrate_activations(qmodel, calibration, quant_config.calibration.batch_size, quant_config.calibration.seed,
                              progress)
    fp_tib, q_tib = TemporalInformationBlock(model, adapter), TemporalInformationBlock(qmodel.model, adapter)
    t, labels, _ = grid_inputs(deployment_grid(scheduler, sampler), fp_tib.num_labels)
    report: dict[str, Any] = {}
    if tfmq_config.tiar:
        report["tiar"] = reconstruct_tib(q_tib, fp_tib, t, labels, quant_config.reconstruction, tfmq_config).to_json()
    frozen = set(q_tib.layer_names) - set(q_tib.projection_names) if tfmq_config.tiar else set()
    if tfmq_config.freeze_time_projections:
        frozen |= set(q_tib.projection_names)
    if quant_config.method == "qdiffusion":
        qmodel.reconstruction_report = reconstruct(
            qmodel.model, model, adapter, calibration, quant_config.reconstruction, checkpoint=checkpoint,
            progress=progress, frozen_layers=sorted(frozen))
    return apply_tfmq(qmodel, model, scheduler, tfmq_config, sampler, cache_dir=cache_dir, progress=progress,
                      report=report, conditions=conditions, guidance_scale=guidance_scale)


def check_temporal_path(model: nn.Module, adapter) -> None:
    """Refuse, before any calibration, a model whose temporal path TFMQ-DM cannot tabulate over (t, y): the TIB's
    own errors (continuous class labels, SDXL's added embedding of the text) raised by one dry call at t = 0."""
    tib = TemporalInformationBlock(model, adapter)
    device = next(model.parameters()).device
    labels = torch.zeros(1, dtype=torch.long, device=device) if tib.num_labels else None
    with torch.no_grad():
        tib(torch.zeros(1, dtype=torch.long, device=device), labels)


def apply_tfmq(
    qmodel: QuantizedDenoiser, fp_model: nn.Module, scheduler, tfmq_config: TFMQConfig, sampler: SamplerConfig, *,
    cache_dir: str | None = None, progress: bool = True, report: dict[str, Any] | None = None,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
) -> QuantizedDenoiser:
    """Build FSC and maintenance for ``qmodel``'s current weights (steps 4-5), in place; returns ``qmodel``.

    A ``TFMQCorrection`` already on ``qmodel`` (e.g. a saved TFMQ model) is released first and its TIAR report
    kept, so FSC and maintenance variants of one reconstruction cost seconds, not a reconstruction.

    Raises:
        ValueError: ``qmodel`` carries other corrections (fit those after TFMQ), or its TFMQ weights were built
            with other TIAR/freeze settings than ``tfmq_config``'s.
    """
    check_fsc_format(qmodel.config, tfmq_config)
    report = dict(report or {})
    members = list(qmodel.corrections)
    if any(not isinstance(m, TFMQCorrection) for m in members):
        raise ValueError("apply TFMQ before sampler-level corrections: they were fitted on another network")
    for old in members:
        if old.config.weight_fields != tfmq_config.weight_fields:
            raise ValueError(f"this model's weights come from TFMQ settings {old.config.weight_fields}; "
                             f"{tfmq_config.weight_fields} needs its own quantize_tfmq run")
        report = {**{k: v for k, v in old.report.items() if k == "tiar"}, **report}
        old.release(qmodel.model)
    adapter = qmodel.adapter
    timesteps = deployment_grid(scheduler, sampler)
    correction = TFMQCorrection(tfmq_config)
    correction.set_grid(sampler.key, timesteps)
    if tfmq_config.fsc != "off":
        quantizers, run_step = _fsc_inputs(qmodel, fp_model, scheduler, tfmq_config, sampler, timesteps, cache_dir,
                                           progress, conditions, guidance_scale)
        # a dynamic quantizer (per-row softmax P, per-token or per-group inputs) computes its step from each tensor:
        # nothing to tabulate, in the TIB or the model
        quantizers = {name: q for name, q in quantizers.items() if not q.scheme.dynamic}
        correction.set_fsc(list(quantizers), *calibrate_per_step(quantizers, len(timesteps), run_step,
                                                                 tfmq_config.fsc_range))
    correction.prepare(qmodel.model, adapter)
    fp_tib = TemporalInformationBlock(fp_model, adapter)
    choices = _choose(fp_tib, TemporalInformationBlock(qmodel.model, adapter), timesteps, correction, tfmq_config)
    correction.report = {**report, "disturbance": choices["report"]}
    if tfmq_config.maintenance == "cache_fp":
        correction.set_cache(choices["cached"], "fp", tfmq_config.cache_bits, fp_tib.num_labels)
    else:
        correction.set_quantized_cache(choices["cached"], fp_tib.num_labels)
    qmodel.corrections = CorrectionStack([correction])
    qmodel.model = qmodel.corrections.prepare(qmodel.model, adapter)
    if getattr(qmodel, "recipe", None) is not None:  # saved as the artefact's tadq_recipe.json: it must still hold
        qmodel.recipe = _recipe_after(qmodel.recipe, tfmq_config, sampler, guidance_scale)
    logger.info("TFMQ: FSC %s on %d quantizers, %d of %d temporal features cached (%d bytes)", tfmq_config.fsc,
                len(correction.fsc_quantizers), len(choices["cached"]), len(choices["report"]),
                correction.cache_size_bytes())
    return qmodel


def _recipe_after(recipe: Any, config: TFMQConfig, sampler: SamplerConfig, guidance_scale: float) -> Any:
    """The recipe of a TFMQ model after ``apply_tfmq``: its TFMQ settings replaced when it deploys this sampler (at
    this guidance scale, which model-wide FSC's trajectories were sampled at), else ``None``: no recipe says
    "calibrated on one grid, tables for another" (its calibration sampler is its deployment's), and the old one
    would name the tables' sampler and settings wrongly."""
    method = recipe.method
    if (isinstance(getattr(method, "tfmq", None), TFMQConfig) and not recipe.corrections
            and recipe.sampler == sampler and (config.fsc != "model" or recipe.guidance_scale == guidance_scale)):
        return dataclasses.replace(recipe, method=dataclasses.replace(method, tfmq=config))
    logger.info("apply_tfmq: the model's recipe (%s, %s) no longer describes it; it is dropped",
                type(method).__name__, recipe.sampler.key)
    return None


def _fsc_inputs(qmodel: QuantizedDenoiser, fp_model: nn.Module, scheduler, config: TFMQConfig,
                sampler: SamplerConfig, timesteps: Tensor, cache_dir: str | None, progress: bool,
                conditions: ConditionSource | None = None, guidance_scale: float = 1.0):
    """The enabled activation quantizers FSC covers (name → quantizer; dynamic ones included) and ``run_step(s)``,
    which feeds them step s's data."""
    tib = TemporalInformationBlock(qmodel.model, qmodel.adapter)
    if config.fsc == "tib":
        labels = torch.arange(tib.num_labels) if tib.num_labels else None

        def run_tib(step: int) -> None:
            count = tib.num_labels or 1
            tib(timesteps[step].repeat(count), labels)

        return tib.activation_quantizers(), run_tib
    fsc_set = collect_calibration_set(fp_model, qmodel.adapter, scheduler.config, CalibrationConfig(
        sampler=sampler, num_trajectories=config.num_samples, num_steps_kept=sampler.num_steps,
        samples_per_step=config.fsc_samples_per_step, seed=config.seed), cache_dir=cache_dir, progress=progress,
        conditions=conditions, guidance_scale=guidance_scale)
    # recorded by the FP reference, which may be another dtype (an SVDQuant base quantized with dtype=bfloat16):
    # the network takes its states in its own dtype and device, as its single ranges were calibrated
    parameter = next(qmodel.model.parameters())
    fsc_set = calibration_on(fsc_set, parameter.device, parameter.dtype)

    def run_model(step: int) -> None:
        chosen = fsc_set.step_index == step
        qmodel(fsc_set.x[chosen], fsc_set.t[chosen], None if fsc_set.cond is None else fsc_set.cond.rows(chosen))

    return activation_quantizers(qmodel.model), run_model


@torch.no_grad()
def temporal_features_per_step(tib: TemporalInformationBlock, timesteps: Tensor,
                               correction: TFMQCorrection | None = None,
                               steps: range | None = None) -> dict[str, Tensor]:
    """Time projection → its feature at every grid step, (S, C) or (S, K, C) for K class labels.

    With a prepared ``correction``, each step is evaluated at its own step index (FSC ranges, cache).
    ``steps``: only these grid steps, one row each in that order (all by default).
    """
    t, labels, step_of = grid_inputs(timesteps, tib.num_labels)
    rows: list[list[Tensor]] = []
    for step in range(len(timesteps)) if steps is None else steps:
        chosen = step_of == step
        prepared = correction is not None and correction.state is not None
        with correction.at_step(step) if prepared else contextlib.nullcontext():
            rows.append(tib(t[chosen], None if labels is None else labels[chosen]))
    features = {}
    for position, feature in enumerate(tib.features):
        stacked = torch.stack([row[position] for row in rows])  # (S, K or 1, C)
        features[feature.layer] = stacked if tib.num_labels else stacked[:, 0]
    return features


FEATURE_CHUNK_STEPS = 1  # grid steps whose FP and quantized temporal features ``_choose`` holds at once


def _choose(fp_tib: TemporalInformationBlock, q_tib: TemporalInformationBlock, timesteps: Tensor,
            correction: TFMQCorrection, config: TFMQConfig) -> dict[str, Any]:
    """Per feature: disturbance of each strategy against FP and the maintenance choice (docs/methods/tfmq.md), and
    ``cached``: time projection → what the cache stores of each chosen feature (its FP features (S, [K,] C) for
    ``cache_fp``, else ``quantize_cache``'s (codes, Δ, z)).

    The features are computed ``FEATURE_CHUNK_STEPS`` grid steps at a time: every step's FP and quantized
    features at once were ≈ 39 GB each for DiT-XL/2 (1001 labels × 50 steps × 28 blocks of 6912 channels). The
    quantized cache has one (Δ, z) per step and the disturbances are means of per-row terms, so the numbers are
    those of the whole grid at once; what stays is one chunk of features and the cache being built (codes, or
    float32 for ``cache_fp``)."""
    metric = "cosine_distance" if config.select_metric == "cosine" else "relative_l2"
    terms: dict[str, dict[str, list[tuple[Tensor, Tensor]]]] = {}
    kept: dict[str, list] = {}  # time projection → its cache chunks (nothing with maintenance "tib")
    chunk_steps = FEATURE_CHUNK_STEPS
    for start in range(0, len(timesteps), chunk_steps):
        steps = range(start, min(start + chunk_steps, len(timesteps)))
        q_features = temporal_features_per_step(q_tib, timesteps, correction, steps)
        for layer, reference in temporal_features_per_step(fp_tib, timesteps, steps=steps).items():
            channels = reference.shape[-1]
            flat = reference.reshape(-1, channels)
            codes = quantize_cache(reference, config.cache_bits)
            layer_terms = terms.setdefault(layer, {"tib": [], "cache_quantized": []})
            layer_terms["tib"].append(disturbance_rows(q_features[layer].reshape(-1, channels), flat))
            layer_terms["cache_quantized"].append(
                disturbance_rows(dequantize_cache(*codes).reshape(-1, channels), flat))
            if config.maintenance != "tib":
                kept.setdefault(layer, []).append(reference if config.maintenance == "cache_fp" else codes)
        del q_features
    report, cached = {}, {}
    for layer, layer_terms in terms.items():
        scores = {name: {"cosine_distance": float(torch.cat([c for c, _ in rows]).mean()),
                         "relative_l2": float(torch.cat([r for _, r in rows]).mean())}
                  for name, rows in layer_terms.items()}
        if config.maintenance == "select":
            choice = "cache" if scores["cache_quantized"][metric] < scores["tib"][metric] else "tib"
        else:
            choice = "tib" if config.maintenance == "tib" else "cache"
        chunks = kept.pop(layer, [])
        if choice == "cache":
            cached[layer] = (torch.cat(chunks) if config.maintenance == "cache_fp"
                             else tuple(torch.cat(part) for part in zip(*chunks, strict=True)))
        del chunks
        report[layer] = {**scores, "choice": choice}
    return {"report": report, "cached": cached}
