"""Block reconstruction (docs/methods/qdiffusion.md#block-reconstruction), streamed unit by unit and resumable.

Phase 1 (weights, B3): for each unit U in forward order, with activation quantization off, learn AdaRound
variables so that U_q(X̂) ≈ Y, where X̂ are U's inputs in the network whose earlier units are already
weight-quantized and Y are the FP network's outputs of U. Loss: ``mean_batch Σ (U_q(X̂) − Y)² + λ·Σ(1 − |2h − 1|^β)``,
β held at ``beta_start`` with λ off during warm-up, then annealed linearly to ``beta_end``; finally rounding is made
hard and baked into the weight (an on-grid weight re-quantizes to itself, so the result saves as integers).
A unit whose learned rounding does worse over the whole calibration set than nearest rounding keeps nearest rounding.

Phase 2 (activations, B4): with activation quantization on, learn each unit's activation steps Δ (zero point
fixed, straight-through rounding) on FP inputs, loss ``mean_batch Σ |U_q(X) − Y|^p``, Adam with cosine decay.
The learned steps are kept only if they lower the unit's loss over the whole calibration set (Q-Diffusion issue #2
reports activation reconstruction ending worse than its initialisation; tadq falls back instead of regressing).

Each unit runs both phases before the next unit starts (the activation phase reads only FP inputs and targets, so
the order changes no result) and both share one FP capture. After each phase the model state is checkpointed, so
an interrupted run resumes where it stopped. Every phase leaves a ``UnitReport`` with the diagnostics of
docs/methods/qdiffusion.md ("Carrying over to natural images"); ``write_unit_report`` writes them as JSON.

Layers named in ``frozen_layers`` keep their weights and activation steps in both phases (they still run inside their
unit, so the unit learns around them); TFMQ-DM freezes the temporal layers this way after reconstructing them
against the temporal features (docs/methods/tfmq.md#tiar).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from tadq.calibration.capture import UnitIO, capture_unit_io, capture_units_io, unit_output
from tadq.calibration.data import CalibrationSet
from tadq.config import ReconstructionConfig, config_to_dict
from tadq.device import wide_dtype
from tadq.progress import progress_bar, show_next
from tadq.quant.adaround import AdaRound
from tadq.quant.fake_quant import quantize_to_int
from tadq.quant.gptq import HessianAccumulator, gptq_round, matmul_columns, moment
from tadq.quant.modules import QuantLayer
from tadq.quant.quantizer import Quantizer, bypassing, quantizers_bypassed
from tadq.quant.ranges import estimate_range
from tadq.safefiles import DamagedFileError, load_checked, require_finite, save_checked
from tadq.sampling import Conditioning
from tadq.utils import atomic_write_text, eval_mode

__all__ = ["UnitReport", "attach_adaround", "bake_adaround", "quantizers_bypassed", "reconstruct", "weight_pairs",
           "with_rounding_penalty", "write_unit_report"]

logger = logging.getLogger(__name__)

FROZEN_ATTRIBUTE = "_tadq_reconstruction_frozen"  # set only inside ``reconstruct(..., frozen_layers=...)``


@dataclass(frozen=True)
class UnitReport:
    """Reconstruction loss of one unit before (nearest rounding / initial steps) and after learning.

    The diagnostic fields say why a unit did or did not gain (docs/methods/qdiffusion.md, "Carrying over to
    natural images"): ``loss_learned`` is the loss of the learned result before the keep-initialisation guard,
    ``guard_rejected`` whether the guard threw it away, ``flipped`` the share of weights whose learned rounding
    differs from nearest rounding, ``moved`` the mean |h(V) − frac(W/Δ)| of the soft rounding at the end,
    ``unsettled`` its mean distance min(h, 1 − h) from a hard 0/1 just before it is made hard, ``iters`` the
    iterations run and ``seconds`` the wall time of the phase (capture included).
    """

    unit: str
    phase: str
    loss_before: float
    loss_after: float
    loss_learned: float | None = None
    guard_rejected: bool = False
    flipped: float | None = None
    moved: float | None = None
    unsettled: float | None = None
    iters: int = 0
    seconds: float = 0.0


def write_unit_report(reports: Sequence[UnitReport], path: str | Path) -> None:
    """Write the per-unit records as JSON (the opt-in reconstruction report; one object per unit and phase)."""
    atomic_write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2), path)  # never a half file


def weight_pairs(module: nn.Module) -> list[tuple[Quantizer, Tensor]]:
    """(weight quantizer, the weight tensor it quantizes) for every quantized layer inside ``module``."""
    pairs = []
    for layer in module.modules():
        if getattr(layer, FROZEN_ATTRIBUTE, False):
            continue
        if hasattr(layer, "quantized_weights"):
            pairs.extend((q, w) for q, w in layer.quantized_weights().values() if q.enabled)
        elif hasattr(layer, "weight_quantizer") and layer.weight_quantizer.enabled:
            pairs.append((layer.weight_quantizer, layer.weight))
    return pairs


def _unit_activation_quantizers(module: nn.Module) -> list[Quantizer]:
    frozen = {id(q) for layer in module.modules() if getattr(layer, FROZEN_ATTRIBUTE, False) for q in layer.modules()}
    return [m for m in module.modules() if isinstance(m, Quantizer) and m.kind == "activation" and m.enabled
            and bool(m.initialized) and id(m) not in frozen]


@contextlib.contextmanager
def _frozen(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Mark ``names`` as frozen for the duration of one ``reconstruct`` call (explicit and scoped)."""
    modules = [model.get_submodule(name) for name in names]  # raises AttributeError on an unknown name
    for module in modules:
        setattr(module, FROZEN_ATTRIBUTE, True)
    try:
        yield
    finally:
        for module in modules:
            delattr(module, FROZEN_ATTRIBUTE)


def _run_unit(module: nn.Module, io: UnitIO, index: Tensor) -> Tensor:
    args, kwargs = io.batch(index)
    return unit_output(module(*args, **kwargs))


def _eval_loss(module: nn.Module, io: UnitIO, batch_size: int, p: float) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, io.output.shape[0], batch_size):
            index = torch.arange(start, min(start + batch_size, io.output.shape[0]))
            diff = _run_unit(module, io, index) - io.output[index]
            total += diff.abs().pow(p).flatten(1).sum(1).sum().item()
    return total / io.output.shape[0]


def _beta(config: ReconstructionConfig, step: int, iters: int | None = None) -> float | None:
    """β at ``step`` of ``iters`` (default ``config.weight_iters``); ``None`` during warm-up (regulariser off)."""
    iters = config.weight_iters if iters is None else iters
    warmup = int(config.warmup * iters)
    if step < warmup:
        return None
    progress = (step - warmup) / max(1, iters - warmup)
    return config.beta_start + (config.beta_end - config.beta_start) * progress


def attach_adaround(pairs: Sequence[tuple[Quantizer, Tensor]]) -> list[AdaRound]:
    """Give every weight quantizer a learnable AdaRound initialised at its weight; returns the roundings."""
    roundings = []
    for quantizer, weight in pairs:
        quantizer.rounding = AdaRound(weight, quantizer._broadcast(quantizer.scale, weight))
        roundings.append(quantizer.rounding)
    return roundings


def with_rounding_penalty(loss: Tensor, roundings: Sequence[AdaRound], config: ReconstructionConfig, step: int,
                          iters: int | None = None) -> Tensor:
    """``loss`` plus λ Σ (1 − |2h(V) − 1|^β) once the warm-up is over (AdaRound's regulariser)."""
    beta = _beta(config, step, iters)
    if beta is not None and config.rounding_weight > 0:
        loss = loss + config.rounding_weight * sum(r.regularizer(beta) for r in roundings)
    return loss


@torch.no_grad()
def bake_adaround(pairs: Sequence[tuple[Quantizer, Tensor]]) -> None:
    """Hard-round the learned AdaRound into the weights (they end on the grid) and detach it."""
    for quantizer, weight in pairs:
        quantizer.rounding.hard = True
        weight.copy_(quantizer(weight))
        quantizer.rounding = None


def _reconstruct_weights(module: nn.Module, io: UnitIO, config: ReconstructionConfig, seed: int) -> dict[str, float]:
    pairs = weight_pairs(module)
    roundings = attach_adaround(pairs)
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=config.weight_lr)
    generator = torch.Generator().manual_seed(seed)
    n = io.output.shape[0]
    for step in range(config.weight_iters):
        index = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
        with torch.enable_grad():
            loss = _weight_loss(_run_unit(module, io, index) - io.output[index], config)
            loss = with_rounding_penalty(loss, roundings, config, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
    stats = _rounding_stats(roundings)
    bake_adaround(pairs)
    return stats


def _gptq_layers(module: nn.Module) -> list[nn.Module]:
    """The unit's weight-quantized layers GPTQ rounds, in registration (≈ forward) order; frozen ones left out."""
    return [layer for layer in module.modules() if isinstance(layer, QuantLayer)
            and not getattr(layer, FROZEN_ATTRIBUTE, False)
            and any(q.enabled for q, _ in layer.quantized_weights().values())]


def _column_quantizers(layer: nn.Module) -> list[tuple[int, int, Quantizer]]:
    """(first column, end column, quantizer) of each weight view in ``weight.flatten(1)``'s column order.

    A layer's views are its whole weight or slices along the input channels (a split shortcut's halves), so each
    covers a contiguous run of columns; anything else is refused rather than rounded on the wrong grid.
    """
    weight = layer.weight
    spans = []
    for quantizer, view in layer.quantized_weights().values():
        start = view.storage_offset() - weight.storage_offset()
        width = view[0].numel()
        if (view.shape[0] != weight.shape[0] or view.stride() != weight.stride()
                or not 0 <= start <= weight[0].numel() - width):
            raise ValueError(f"GPTQ rounding: a weight view of {type(layer).__name__} is not an input-channel slice")
        spans.append((start, start + width, quantizer))
    spans.sort(key=lambda span: span[0])
    if sum(stop - start for start, stop, _ in spans) != weight[0].numel():
        raise ValueError(f"GPTQ rounding: the weight views of {type(layer).__name__} do not cover its weight once")
    return spans


def _column_quantizer(spans: list[tuple[int, int, Quantizer]]):
    def quantize_column(column: Tensor, index: int) -> Tensor:
        for start, stop, quantizer in spans:
            if start <= index < stop:
                if not quantizer.enabled:
                    return column
                scale, zero_point = quantizer.scale, quantizer.zero_point
                if quantizer.scheme.granularity == "per_block":  # the block of the column within its view's row
                    block = (index - start) // quantizer.scheme.group_size
                    scale, zero_point = scale[:, block], zero_point[:, block]
                scale, zero_point = scale.reshape(-1), zero_point.reshape(-1)
                codes = quantize_to_int(column, scale, zero_point, quantizer.scheme.qmin, quantizer.scheme.qmax)
                return (codes - zero_point) * scale
        raise IndexError(index)

    return quantize_column


@torch.no_grad()
def _gptq_weights(module: nn.Module, io: UnitIO, config: ReconstructionConfig, seed: int,
                  compensated: bool = False, fp_unit: nn.Module | None = None,
                  fp_io: UnitIO | None = None) -> dict[str, float]:
    """Round every weight of the unit with GPTQ, layer after layer: each layer's Hessian is taken from its inputs
    in the unit whose earlier layers are already rounded (activation quantizers are bypassed by the caller).

    ``compensated``: leave each layer at GPTQ's compensated float weight (whose nearest rounding is the GPTQ
    result) for AdaRound to start from; the next layer's Hessian is still taken with this layer rounded.
    ``fp_unit``/``fp_io`` (``gptq_target = "fp_output"``): round W* (``_fp_output_weight``) instead of W."""
    n = io.output.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: config.gptq_inputs or n].sort().values
    batch = 2 * config.batch_size
    flipped, count = 0.0, 0
    names = {id(m): name for name, m in module.named_modules()}
    for layer in _gptq_layers(module):
        groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
        fp_layer = None if fp_unit is None else fp_unit.get_submodule(names[id(layer)])
        accumulators, cross = _layer_hessians(module, layer, groups, io, rows, batch, fp_layer, fp_unit, fp_io)
        spans = _column_quantizers(layer)
        quantize_column = _column_quantizer(spans)
        weight = layer.weight
        nearest = layer.quantized_weight()
        targets = []
        for group, accumulator in enumerate(accumulators):
            rows_out = weight.chunk(groups, dim=0)[group]
            hessian = accumulator.hessian()
            if cross is not None:
                rows_out = _fp_output_weight(rows_out, hessian, cross[group], config.fp_output_damp,
                                              config.gptq_target_prior)
            targets.append((rows_out, hessian))
        if cross is not None:
            _fit_block_ranges(spans, torch.cat([target for target, _ in targets], 0))
        rounded = []
        for group, (rows_out, hessian) in enumerate(targets):
            offset = group * rows_out.shape[0]
            rounded.append(gptq_round(rows_out, hessian,
                                      _group_rows(quantize_column, offset, rows_out.shape[0], weight.shape[0]),
                                      damp=config.gptq_damp, act_order=config.gptq_act_order,
                                      compensated=compensated))
        result = torch.cat(rounded, 0)
        weight.copy_(result)
        rounded_weight = layer.quantized_weight()  # = result unless compensated
        flipped += (rounded_weight != nearest).sum().item()
        count += result.numel()
    return {"flipped": flipped / max(count, 1)}


def _layer_hessians(module: nn.Module, layer: nn.Module, groups: int, io: UnitIO, rows: Tensor, batch: int,
                    fp_layer: nn.Module | None = None, fp_unit: nn.Module | None = None,
                    fp_io: UnitIO | None = None) -> tuple[list[HessianAccumulator], list[Tensor] | None]:
    """Per group of ``layer``: the Hessian E[x̂ x̂ᵀ] of the vectors its weight multiplies while ``module`` runs on
    ``rows``, and with ``fp_layer`` the cross moment E[x x̂ᵀ] with the FP layer's vectors x (the FP unit run on the
    same rows of ``fp_io``; both in the quantized layer's input basis)."""
    width = layer.weight[0].numel()
    accumulators = [HessianAccumulator(width, layer.weight.device) for _ in range(groups)]
    # beside the Hessians, on the layer's device: a CPU sum could not add a GPU layer's moments
    cross = None if fp_layer is None else [torch.zeros(width, width, dtype=wide_dtype(layer.weight.device),
                                                       device=layer.weight.device) for _ in range(groups)]
    # every call of the layer in one unit run: a feed-forward chunked along the tokens (``set_chunk_feed_forward``,
    # ``enable_forward_chunking``) calls it once per chunk, and the Hessian used to hold the last chunk's rows only
    seen: dict[str, list[Tensor]] = {"quantized": [], "fp": []}

    def columns(x: Tensor) -> list[Tensor]:
        x = layer.transform_input(x) if hasattr(layer, "transform_input") else x
        return [matmul_columns(layer, x if groups == 1 else x.chunk(groups, dim=1)[g]) for g in range(groups)]

    def hook(_layer: nn.Module, args: tuple) -> None:
        seen["quantized"].append(args[0])

    def fp_hook(_layer: nn.Module, args: tuple) -> None:
        seen["fp"].append(args[0])

    handles = [layer.register_forward_pre_hook(hook)]
    if fp_layer is not None:
        handles.append(fp_layer.register_forward_pre_hook(fp_hook))
    try:
        for start in range(0, len(rows), batch):
            index = rows[start:start + batch]
            _run_unit(module, io, index)
            calls = [columns(x) for x in seen["quantized"]]
            seen["quantized"].clear()
            for quantized in calls:
                for accumulator, part in zip(accumulators, quantized, strict=True):
                    accumulator.add(part)
            if fp_layer is not None:  # the FP unit calls its layer as often, on the same rows in the same order
                _run_unit(fp_unit, fp_io, index)
                fp_calls = [columns(x) for x in seen["fp"]]
                seen["fp"].clear()
                for fp_columns, quantized in zip(fp_calls, calls, strict=True):
                    for total, fp_part, part in zip(cross, fp_columns, quantized, strict=True):
                        total += moment(fp_part, part)
    finally:
        for handle in handles:
            handle.remove()
    if cross is not None:
        cross = [total / accumulator.count for total, accumulator in zip(cross, accumulators, strict=True)]
    return accumulators, cross


def _fp_output_weight(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float, prior: str = "weight") -> Tensor:
    """W* = W E[x x̂ᵀ] (E[x̂ x̂ᵀ] + λI)⁻¹: the float weight whose output on the quantized path's inputs x̂ best
    reproduces the FP layer's output W x (least squares); GPTQ then rounds W* instead of W.

    The ridge λ = ``damp`` × the Hessian's mean diagonal pulls W* toward ``prior`` along the input directions the
    calibration inputs barely cover: ``"zero"`` solves the plain ridge above, deleting W's response to those
    directions for every input that has them (a few calibration trajectories on the shipped DiT: −7 dB at W8A8, unseen
    by the unit-loss guard, which reads the same inputs); ``"weight"`` pulls toward W,
    W* = (W E[x x̂ᵀ] + λW)(E[x̂ x̂ᵀ] + λI)⁻¹ = W + W (E[x x̂ᵀ] − E[x̂ x̂ᵀ])(E[x̂ x̂ᵀ] + λI)⁻¹: only the drift of x̂
    from x is undone, and W* = W where there is none.

    A column whose input is zero on every calibration vector (a dead channel) has no data to fit: the zero-prior ridge
    set it to 0. It keeps W's column (what the weight prior gives anyway), as GPTQ's own rounding keeps a dead column's
    nearest rounding."""
    wide = wide_dtype(weight.device)  # float64 (float32 on MPS, which has no float64)
    flat = weight.detach().reshape(weight.shape[0], -1).to(wide)
    h = hessian.to(wide).clone()
    dead = torch.diagonal(h) <= 0
    ridge = damp * h.diagonal().mean().clamp_min(1e-12)
    h.diagonal().add_(ridge)
    right = cross.to(wide).T @ flat.T  # (W C)ᵀ
    if prior == "weight":
        right = right + ridge * flat.T
    elif prior != "zero":
        raise ValueError(f"prior must be 'zero' or 'weight', got {prior!r}")
    solved = torch.linalg.solve(h, right).T  # (H⁻¹ (W C + λ·prior)ᵀ)ᵀ
    solved[:, dead] = flat[:, dead]
    return solved.to(weight.dtype).reshape(weight.shape)


def _fit_block_ranges(spans: list[tuple[int, int, Quantizer]], target: Tensor) -> None:
    """Block-wise (``per_block``) weight ranges searched again on ``target``, the W* that GPTQ rounds onto the FP
    outputs: a block holds a few weights, so W*'s shift from W moves many of them outside the range searched on W,
    where they clip (on the digits model at W4A8, 3-weight blocks lost 6 dB to per-channel steps with W's ranges).
    Per-channel and per-tensor ranges are left as they are (measured with W's ranges)."""
    flat = target.reshape(target.shape[0], -1)
    for start, stop, quantizer in spans:
        if quantizer.enabled and quantizer.scheme.granularity == "per_block":
            quantizer.set_range(*estimate_range(flat[:, start:stop].contiguous(), quantizer.scheme))


def _group_rows(quantize_column, offset: int, rows: int, total: int):
    """The column quantizer restricted to output rows [offset, offset + rows) of ``total`` (one group of a grouped
    conv): the column is placed among zeros so each row meets its own per-channel step."""
    if rows == total:
        return quantize_column

    def restricted(column: Tensor, index: int) -> Tensor:
        padded = column.new_zeros(total)
        padded[offset:offset + rows] = column
        return quantize_column(padded, index)[offset:offset + rows]

    return restricted


def _round_unit_weights(module: nn.Module, io: UnitIO, config: ReconstructionConfig, seed: int,
                        before: float, fp_unit: nn.Module | None = None,
                        fp_io: UnitIO | None = None) -> tuple[dict[str, float], int, float, float]:
    """Round the unit's weights as ``config.rounding`` says; (stats, iterations, learned loss, kept loss).

    Of the candidates — nearest rounding (``before``), GPTQ's result when AdaRound starts from it, and the final
    learned rounding — the unit keeps the one with the lowest loss over the inputs it was fitted on (the learned
    one unless it is worse: too few iterations to beat its starting point).

    An error or interrupt part-way (Ctrl-C in a notebook, out of memory) leaves the unit as it found it: GPTQ rewrote
    weights layer by layer and AdaRound's soft rounding stayed attached to the quantizers, so the model sampled with
    a half-rounded unit and no longer loaded the checkpoint it had just written (its state held the AdaRound
    variables)."""
    pairs = weight_pairs(module)
    if not pairs:
        return {}, 0, before, before
    original = [weight.detach().clone() for _, weight in pairs]  # nearest rounds these at run time
    # GPTQ searches block-wise ranges again on what it rounds (_fit_block_ranges): nearest rounding is scored, and
    # kept, with the ranges it had
    ranges = [(quantizer.scale.detach().clone(), quantizer.zero_point.detach().clone()) for quantizer, _ in pairs]
    try:
        best_loss, best = before, original
        stats: dict[str, float] = {}
        iters = 0
        if config.rounding in ("gptq", "gptq_adaround"):
            fp = (fp_unit, fp_io) if config.gptq_target == "fp_output" else (None, None)
            stats = _gptq_weights(module, io, config, seed, config.rounding == "gptq_adaround", *fp)
            if config.rounding == "gptq_adaround":
                gptq_loss = _eval_loss(module, io, 2 * config.batch_size, 2.0)
                stats["gptq_flipped"] = stats.pop("flipped")
                if gptq_loss < best_loss:
                    with torch.no_grad():
                        best_loss, best = gptq_loss, [quantizer(weight).detach().clone()
                                                      for quantizer, weight in pairs]
        if config.rounding in ("adaround", "gptq_adaround") and config.weight_iters > 0:
            stats.update(_reconstruct_weights(module, io, config, seed) or {})
            iters = config.weight_iters
        learned = _eval_loss(module, io, 2 * config.batch_size, 2.0)
    except BaseException:
        _restore_weights(pairs, original, ranges)
        raise
    if learned <= best_loss:
        return stats, iters, learned, learned
    _restore_weights(pairs, best, ranges if best is original else None)
    return stats, iters, learned, best_loss


@torch.no_grad()
def _restore_weights(pairs: Sequence[tuple[Quantizer, Tensor]], saved: Sequence[Tensor],
                     ranges: Sequence[tuple[Tensor, Tensor]] | None = None) -> None:
    """Put ``saved`` back into the weights (and ``ranges``, (Δ, z) of each quantizer, when given), with no AdaRound
    left attached to their quantizers."""
    for index, ((quantizer, weight), value) in enumerate(zip(pairs, saved, strict=True)):
        quantizer.rounding = None
        weight.copy_(value)
        if ranges is not None:
            quantizer.scale.copy_(ranges[index][0])
            quantizer.zero_point.copy_(ranges[index][1])


def _weight_loss(diff: Tensor, config: ReconstructionConfig) -> Tensor:
    """The rounding phase's reconstruction term; its scale against λ decides how hard the regulariser pushes.

    ``"sum"``: Σ over every output element, mean over the batch (grows with the unit's resolution, so a fixed λ
    is weaker on larger images). ``"channel_sum"``: Σ over channels, mean over batch and positions, the loss of
    BRECQ's and Q-Diffusion's code (``lp_loss``), against which λ = 0.01 was set.
    """
    squared = diff.pow(2)
    if config.loss_reduction == "channel_sum" and squared.dim() > 2:
        return squared.sum(1).mean()
    return squared.flatten(1).sum(1).mean()


@torch.no_grad()
def _rounding_stats(roundings: Sequence[AdaRound]) -> dict[str, float]:
    """Share of weights whose learned rounding differs from nearest rounding, and the mean move of h(V)."""
    flipped, moved, unsettled, count = 0.0, 0.0, 0.0, 0
    for rounding in roundings:
        start, h = rounding.start_offset(), rounding.h()
        flipped += ((rounding.v >= 0) != (start >= 0.5)).sum().item()
        moved += (h - start).abs().sum().item()
        unsettled += torch.minimum(h, 1 - h).sum().item()
        count += start.numel()
    count = max(count, 1)
    return {"flipped": flipped / count, "moved": moved / count, "unsettled": unsettled / count}


def _reconstruct_activations(module: nn.Module, io: UnitIO, config: ReconstructionConfig, seed: int) -> None:
    quantizers = _unit_activation_quantizers(module)
    if not quantizers or config.activation_iters == 0:
        return
    scales = [q.scale for q in quantizers]
    for scale in scales:
        scale.requires_grad_(True)
    optimizer = torch.optim.Adam(scales, lr=config.activation_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.activation_iters, eta_min=0.0)
    generator = torch.Generator().manual_seed(seed)
    n = io.output.shape[0]
    try:
        for _ in range(config.activation_iters):
            index = torch.randint(0, n, (min(config.batch_size, n),), generator=generator)
            with torch.enable_grad():
                diff = _run_unit(module, io, index) - io.output[index]
                loss = diff.abs().pow(config.activation_p).flatten(1).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for scale in scales:
                    scale.clamp_(min=1e-8)
    finally:
        for scale in scales:
            scale.requires_grad_(False)
            scale.grad = None


@torch.no_grad()
def _restore_scales(module: nn.Module, initial: Sequence[Tensor]) -> None:
    """Put back the unit's activation steps saved before its activation phase."""
    for quantizer, scale in zip(_unit_activation_quantizers(module), initial, strict=True):
        quantizer.scale.copy_(scale)


def _quantizer_schemes(qmodel: nn.Module) -> dict[str, dict]:
    """Every enabled quantizer's scheme (bits, granularity, symmetry, range method): what the run quantizes how.

    Its JSON data (``config_to_dict``), not ``dataclasses.asdict``: a field added later and written only when set
    (``QScheme.format``) stays out of the key at its default, so a checkpoint of an integer run resumes as before."""
    return {name: {"kind": module.kind, **config_to_dict(module.scheme)["data"]}
            for name, module in qmodel.named_modules() if isinstance(module, Quantizer) and module.enabled}


def _run_fields(qmodel: nn.Module, fp_model: nn.Module, config: ReconstructionConfig, calib: CalibrationSet,
                units: list[str], frozen: Sequence[str] = ()) -> dict:
    """Everything the reconstructed model depends on; a checkpoint is resumed only if all of it matches."""
    from tadq.calibration.data import model_fingerprint

    fields = {"config": config_to_dict(config), "calibration": calib.key, "units": units,
              "quantizers": _quantizer_schemes(qmodel), "fp_model": model_fingerprint(fp_model)}
    if frozen:
        fields["frozen"] = sorted(frozen)
    return fields


def _run_key(fields: dict) -> str:
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _first_difference(saved: dict, expected: dict) -> str:
    """'quantizers (conv1.weight_quantizer: bits 4, this run 8)'-style name of the first field that differs."""
    for name in sorted(set(saved) | set(expected)):
        if saved.get(name) == expected.get(name):
            continue
        old, new = saved.get(name), expected.get(name)
        if isinstance(old, dict) and isinstance(new, dict):
            for inner in sorted(set(old) | set(new)):
                if old.get(inner) != new.get(inner):
                    a, b = old.get(inner), new.get(inner)
                    if isinstance(a, dict) and isinstance(b, dict):
                        detail = ", ".join(f"{k} {a.get(k)!r}, this run {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                           if a.get(k) != b.get(k))
                        return f"{name} ({inner}: {detail})"
                    return f"{name} ({inner}: {a!r}, this run {b!r})"
        return f"{name} ({str(old)[:60]!s}, this run {str(new)[:60]!s})"
    return "unknown field"


def check_checkpoint_settings(checkpoint: str | Path, config: ReconstructionConfig) -> None:
    """Refuse, before calibration, a checkpoint written with other reconstruction settings (read from its
    metadata alone): it was refused only after the calibration trajectories had been sampled. The fields known
    later (calibration data, model, layers) are still checked when it is loaded; an unreadable file is left to that
    load, which names the damage."""
    from safetensors import safe_open

    from tadq.safefiles import META_KEY

    path = Path(checkpoint)
    if not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[META_KEY])["meta"]
        saved = meta["fields"]["config"]
    except Exception:  # noqa: BLE001 - any damage: the full load later raises DamagedFileError naming it
        return
    expected = json.loads(json.dumps(config_to_dict(config)))
    if saved != expected:
        raise ValueError(f"reconstruction checkpoint {path} belongs to another run: "
                         f"{_first_difference({'config': saved}, {'config': expected})} differs; delete it to "
                         "restart or pass another --checkpoint")


def _load_checkpoint(
    checkpoint: Path, fields: dict, plan_length: int,
) -> tuple[dict[str, Tensor], int, list[UnitReport]]:
    """(model state, steps done, reports) of a checkpoint written by this run's settings; raises naming the field."""
    state, meta = load_checked(checkpoint, "reconstruction checkpoint")
    if not isinstance(meta, dict) or meta.get("kind") != "tadq-reconstruction-checkpoint":
        raise DamagedFileError(f"reconstruction checkpoint {checkpoint} is another kind of tadq file; delete it")
    if meta.get("key") != _run_key(fields) or meta.get("fields") != json.loads(json.dumps(fields)):
        saved = meta.get("fields") if isinstance(meta.get("fields"), dict) else {}
        raise ValueError(f"reconstruction checkpoint {checkpoint} belongs to another run: "
                         f"{_first_difference(saved, json.loads(json.dumps(fields)))} differs; delete it to restart "
                         "or pass another --checkpoint")
    done, reports = meta.get("done"), meta.get("reports")
    if not (isinstance(done, int) and 0 <= done <= plan_length and isinstance(reports, list)
            and len(reports) == done):
        raise DamagedFileError(f"reconstruction checkpoint {checkpoint} has inconsistent progress fields; delete it")
    require_finite(state, f"reconstruction checkpoint {checkpoint}:")
    return state, done, [UnitReport(**r) for r in reports]


def reconstruct(
    qmodel: nn.Module, fp_model: nn.Module, adapter, calib: CalibrationSet, config: ReconstructionConfig,
    checkpoint: str | Path | None = None, progress: bool = True, frozen_layers: Sequence[str] = (),
    capture_budget_bytes: int = 1 << 30,
) -> list[UnitReport]:
    """Reconstruct every unit of ``qmodel`` (a converted copy of ``fp_model``), weights then activations.

    Args:
        qmodel: the fake-quant diffusers model (weight ranges set; activation ranges calibrated if enabled).
        fp_model: the FP model (targets).
        adapter: the model adapter (units and the ε call).
        calib: timestep-aware calibration data.
        config: iterations, batch, λ, β schedule, learning rates.
        checkpoint: file written after each unit; if it exists and matches, finished units are skipped.
        frozen_layers: qualified names of layers whose weights and activation steps are not learned (a unit made
            only of frozen layers is skipped); empty by default, which leaves every result as before.
        capture_budget_bytes: memory for FP targets captured ahead: the FP network's prefix runs once for as many
            consecutive units as fit (at least one), instead of once per unit. Changes no result, only time.
    """
    # both in eval mode (each given back its own mode): dropout left on in either made the FP targets and the
    # learned rounding depend on the global RNG instead of the calibration data
    with _frozen(qmodel, frozen_layers), eval_mode(qmodel), eval_mode(fp_model):
        return _reconstruct_units(qmodel, fp_model, adapter, calib, config, checkpoint, progress, tuple(frozen_layers),
                                  capture_budget_bytes)


class _FPTargets:
    """FP captures (outputs, and inputs when the activation phase needs them) of the units, taken several at a time.

    Each unit's FP target depends only on the FP network, so the prefix up to a group of consecutive units runs
    once for all of them; a group holds as many units as fit in ``budget`` bytes (sizes measured on one input).
    """

    def __init__(self, fp_call, fp_model: nn.Module, units: list[str], calib: CalibrationSet, batch_size: int,
                 keep_inputs: bool, budget: int) -> None:
        self.fp_call, self.fp_model, self.units, self.calib = fp_call, fp_model, units, calib
        self.batch_size, self.keep_inputs, self.budget = batch_size, keep_inputs, budget
        self.cache: dict[str, UnitIO] = {}
        self.sizes: list[int] | None = None

    def _measure(self) -> list[int]:
        probe = capture_units_io(self.fp_call, [self.fp_model.get_submodule(u) for u in self.units],
                                 self.calib.x[:1], self.calib.t[:1], 1, keep_inputs=self.keep_inputs,
                                 cond=None if self.calib.cond is None else self.calib.cond.rows(slice(0, 1)))
        rows = self.calib.x.shape[0]
        sizes = []
        for io in probe:
            tensors = [io.output, *io.args, *io.kwargs.values()]
            sizes.append(rows * sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor)))
        return sizes

    def take(self, unit: str) -> UnitIO:
        if unit not in self.cache:
            if self.sizes is None:
                self.sizes = self._measure()
            first = self.units.index(unit)
            group, total = [unit], self.sizes[first]
            for name, size in zip(self.units[first + 1:], self.sizes[first + 1:], strict=True):
                if total + size > self.budget:
                    break
                group.append(name)
                total += size
            captured = capture_units_io(self.fp_call, [self.fp_model.get_submodule(u) for u in group], self.calib.x,
                                        self.calib.t, self.batch_size, keep_inputs=self.keep_inputs,
                                        cond=self.calib.cond)
            self.cache.update(zip(group, captured, strict=True))
        return self.cache.pop(unit)


def _reconstruct_units(
    qmodel: nn.Module, fp_model: nn.Module, adapter, calib: CalibrationSet, config: ReconstructionConfig,
    checkpoint: str | Path | None, progress: bool, frozen: tuple[str, ...], capture_budget_bytes: int,
) -> list[UnitReport]:
    units = [u for u in adapter.blocks(qmodel) if weight_pairs(qmodel.get_submodule(u))
             or _unit_activation_quantizers(qmodel.get_submodule(u))]
    fields = _run_fields(qmodel, fp_model, config, calib, units, frozen)
    fields["order"] = "per-unit"  # weights then activations of each unit; older checkpoints ran phase by phase
    key = _run_key(fields)
    # activation_iters = 0 learns no step: skipping the phase saves its capture and its two loss evaluations
    has_activations = config.activation_iters > 0 and any(_unit_activation_quantizers(qmodel.get_submodule(u))
                                                          for u in units)
    # Each unit's activation phase runs right after its weight phase: it reads only FP inputs and FP targets and its
    # own baked weights, and later weight phases run with activation quantizers bypassed, so the order does not
    # change any result; it lets both phases share one FP capture. Seeds stay those of the weights-then-activations
    # order (``offset``), so the result is bit-identical to it.
    plan: list[tuple[str, str, int]] = []
    for index, unit in enumerate(units):
        plan.append(("weights", unit, index))
        if has_activations:
            plan.append(("activations", unit, len(units) + index))
    done, reports = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        state, done, reports = _load_checkpoint(Path(checkpoint), fields, len(plan))
        try:
            qmodel.load_state_dict(state)
        except RuntimeError as error:
            raise DamagedFileError(f"reconstruction checkpoint {checkpoint} does not fit this model "
                                   f"({str(error).splitlines()[0][:120]}); delete it") from error
        logger.info("resuming reconstruction after %d of %d steps", done, len(plan))

    def fp_call(x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        return adapter.predict_eps(fp_model, x, t, cond)

    def q_call(x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        return adapter.predict_eps(qmodel, x, t, cond)

    fp_inputs = config.rounding != "adaround" and config.gptq_target == "fp_output"  # GPTQ reads the FP layers
    fp_targets = _FPTargets(fp_call, fp_model, units, calib, 2 * config.batch_size, has_activations or fp_inputs,
                            capture_budget_bytes)
    # the network's activation quantizers, collected once: walking every module of the network for each unit's
    # weight phase made the bookkeeping grow with units × modules (quadratic in the depth)
    activation_quantizers = [m for m in qmodel.modules() if isinstance(m, Quantizer) and m.kind == "activation"]
    with progress_bar(plan, desc="reconstruct", initial=done, total=len(plan), disable=not progress) as bar:
        shared: tuple[str, UnitIO] | None = None  # (unit, FP capture with inputs) kept from the weight phase
        for position, (phase, unit, offset) in enumerate(plan):
            if position < done:
                continue
            show_next(bar, f"{phase}: {unit}")
            module = qmodel.get_submodule(unit)
            seed = config.seed + offset
            started = time.perf_counter()
            stats: dict[str, float] = {}
            iters = 0
            if shared is not None and shared[0] == unit:
                target = shared[1]
            else:
                target = fp_targets.take(unit)
            shared = (unit, target) if phase == "weights" and has_activations else None
            if phase == "weights":
                with bypassing(activation_quantizers):
                    io = capture_unit_io(q_call, module, calib.x, calib.t, 2 * config.batch_size, keep_output=False,
                                         cond=calib.cond)
                    io.output = target.output
                    before = _eval_loss(module, io, 2 * config.batch_size, 2.0)
                    stats, iters, learned, after = _round_unit_weights(module, io, config, seed, before,
                                                                       fp_model.get_submodule(unit), target)
            else:
                io = target
                before = _eval_loss(module, io, 2 * config.batch_size, config.activation_p)
                initial = [q.scale.clone() for q in _unit_activation_quantizers(module)]
                try:
                    _reconstruct_activations(module, io, config, seed)
                except BaseException:  # interrupted: the unit keeps its calibrated steps, as the checkpoint has them
                    _restore_scales(module, initial)
                    raise
                iters = config.activation_iters if initial else 0
                after = learned = _eval_loss(module, io, 2 * config.batch_size, config.activation_p)
                if after > before:  # learned steps generalise worse over the whole set: keep the calibrated ones
                    _restore_scales(module, initial)
                    after = before
            reports.append(UnitReport(unit, phase, before, after, loss_learned=learned, guard_rejected=learned > after,
                                      flipped=stats.get("flipped"), moved=stats.get("moved"),
                                      unsettled=stats.get("unsettled"), iters=iters,
                                      seconds=round(time.perf_counter() - started, 3)))
            del io, target
            if checkpoint is not None:
                save_checked(qmodel.state_dict(), {"kind": "tadq-reconstruction-checkpoint", "key": key,
                                                   "fields": fields, "done": position + 1,
                                                   "reports": [r.__dict__ for r in reports]},
                             checkpoint)
            bar.update(1)
    return reports
