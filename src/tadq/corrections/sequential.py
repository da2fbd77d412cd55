"""Sequential fitting: per-step tables fitted from the noisiest step down, each step's statistics gathered with the
corrections of every earlier step already active (TAC, docs/methods/tac.md; TCEC, docs/methods/tcec.md).

A ``TrajectoryPair`` is recorded before its correction exists, so it cannot show the states a corrected sampler
would visit. ``fit_sequentially`` instead walks the FP and the quantized trajectories from the same noise side by
side, step-major over all N samples at once (network calls batched): at step i it lets the correction fit its
input row from (x̂_i, x_i), applies it, fits its output row from (ε̂, ε), applies it and takes the step. Every
state is computed once, so calibration is O(S) network calls per sample — not O(S²) as re-running a trajectory
per step would be. Processing all samples per step also keeps stateful hooks (TCEC's cached previous output)
consistent.

Candidates: a correction may offer settings to choose between (``candidates``); each is fitted on the calibration
seed and scored by the final-state MSE against FP on a held-out selection seed, and the best one is kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from tadq.corrections.base import Correction, TableKey
from tadq.corrections.context import FitContext
from tadq.corrections.fp_cache import FPTrajectory, trajectory_key
from tadq.corrections.pair import TrajectoryPair
from tadq.device import wide_dtype
from tadq.progress import progress_bar
from tadq.sampling import SamplingHooks, StepContext, WalkBatch, Walker
from tadq.sampling.hooks import apply_before_model, check_hooks

__all__ = ["SELECTION_SCORES", "SequentialCorrection", "StepTargets", "check_selection_score", "choose_candidate",
           "final_state_score", "fit_sequentially", "paired_final_error"]

logger = logging.getLogger(__name__)


class StepTargets:
    """The FP predictions a step's output row may be fitted against, both (N, C, H, W); ``same_input`` is computed
    on first use (one more FP call per sample), so a correction that does not need it does not pay for it.

    Attributes:
        same_input: ε_θ(x̃_i), FP on the quantized model's own input: isolates the quantization error.
        fp_trajectory: ε_θ(x_i), FP on the FP trajectory: also absorbs the propagated state error.
        x_in: x̃_i, the quantized model's input (after the earlier corrections); x_fp: x_i, the FP state.
    """

    def __init__(self, same_input: Tensor | Callable[[], Tensor], fp_trajectory: Tensor, x_in: Tensor,
                 x_fp: Tensor) -> None:
        self._same_input = same_input
        self.fp_trajectory = fp_trajectory
        self.x_in, self.x_fp = x_in, x_fp

    @property
    def same_input(self) -> Tensor:
        if callable(self._same_input):
            self._same_input = self._same_input()
        return self._same_input


class SequentialCorrection(Correction):
    """A correction whose rows are fitted step by step with its earlier rows active.

    Subclasses implement ``reset_tables`` (identity rows) and the row fits; the generic ``fit_tables(pair)`` fits
    every row from a pair recorded without the correction (the one-shot approximation, used when the config
    says ``sequential=False``).
    """

    sequential_fit: ClassVar[bool] = True

    def reset_tables(self, steps: Sequence[StepContext], sample_shape: tuple[int, ...]) -> None:
        """Set every table to S identity rows (so a partly fitted correction acts only where fitted)."""
        raise NotImplementedError

    def fit_input_row(self, index: int, x_in: Tensor, x_fp: Tensor) -> None:
        """Fit row ``index`` of the input tables from the quantized input x̂_i and the FP state x_i (N, C, H, W)."""

    def fit_output_row(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext) -> None:
        """Fit row ``index`` of the output tables from ε̂ (after earlier corrections) and the FP targets."""

    def refit_per_candidate(self) -> bool:
        """Whether each candidate gets its own sequential fit (exact) or reuses the first one's tables (cheap)."""
        return True

    def fit_tables(self, pair: TrajectoryPair) -> None:
        if pair.fp_states is None or pair.eps_fp_trajectory is None:
            raise ValueError(f"{type(self).__name__} needs the FP trajectory in the pair (a quantized-mode pair)")
        self.reset_tables(pair.steps, tuple(pair.eps_fp.shape[2:]))
        for step in pair.steps:
            i = step.index
            self.fit_input_row(i, pair.model_inputs[i], pair.fp_states[i])
            targets = StepTargets(same_input=pair.eps_fp[i], fp_trajectory=pair.eps_fp_trajectory[i],
                                  x_in=pair.model_inputs[i], x_fp=pair.fp_states[i])
            self.fit_output_row(i, pair.eps_q[i], targets, step)


def _walk(ctx: FitContext, walker: Walker, hooks: Sequence[SamplingHooks], fitting: SequentialCorrection | None,
          start: WalkBatch, seed: int) -> tuple[Tensor, Tensor]:
    """FP and corrected quantized trajectories side by side; ``fitting`` (the last hook) fits its rows on the way.
    The FP side is read from ``ctx.fp_trajectories`` when an earlier fit walked it (``tadq.corrections.fp_cache``).

    Returns the final FP and quantized states.
    """
    earlier = tuple(hooks[:-1]) if fitting is not None else tuple(hooks)
    cond, size, wants = start.cond, ctx.batch_size, walker.wants_branches(hooks)
    cache, key = ctx.fp_trajectories, None
    if cache is not None:
        key = trajectory_key(ctx.plan, ctx.plan.num_steps, ctx.plan.guidance_scale, seed, len(start.indices),
                             size, tuple(ctx.sample_shape), walker.device, walker.dtype, ctx.conditions)
    cached = cache.get(key) if cache is not None else None
    states: list[Tensor] = []
    predictions: list[Tensor] = []
    x_fp, x_hat = start.x, start.x
    carried_hat = carried_fp = None  # each track's previous x̂_0 on a multistep sampler (Walker.carry)
    what = f"fitting {type(fitting).__name__}" if fitting is not None else "scoring corrections"
    with progress_bar(walker.steps, desc=what, leave=False, disable=not ctx.progress) as bar:
        for position, step in enumerate(bar):
            if cached is not None:
                x_fp = cached.states[position]
            x_in = apply_before_model(earlier, x_hat, step)
            if fitting is not None:
                fitting.fit_input_row(step.index, x_in, x_fp)
                x_in = fitting.before_model(x_in, step)
            eps_hat, branches = walker.predict_batched(ctx.q_denoiser, x_in, step, cond, size, wants)
            eps_hat = walker.after_model(earlier, eps_hat, x_in, step, branches)
            if cached is not None:
                eps_fp = cached.predictions[position]
            else:
                eps_fp, _ = walker.predict_batched(ctx.fp_denoiser, x_fp, step, cond, size)
                if cache is not None:  # without a cache nothing holds on to the walk's states
                    states.append(x_fp)
                    predictions.append(eps_fp)
            if fitting is not None:
                targets = StepTargets(
                    same_input=lambda x=x_in, s=step: walker.predict_batched(ctx.fp_denoiser, x, s, cond, size)[0],
                    fp_trajectory=eps_fp, x_in=x_in, x_fp=x_fp)
                fitting.fit_output_row(step.index, eps_hat, targets, step)
                eps_hat = walker.after_model((fitting,), eps_hat, x_in, step, branches)
            x_hat, carried_hat = (walker.advance(x_in, eps_hat, step, start.noise, hooks, carried_hat),
                                  walker.carry(x_in, eps_hat, step))
            if cached is None:
                x_fp, carried_fp = (walker.advance(x_fp, eps_fp, step, start.noise, previous=carried_fp),
                                    walker.carry(x_fp, eps_fp, step))
    if cached is not None:
        return cached.states[-1], x_hat
    if cache is not None:
        cache.put(key, FPTrajectory((*states, x_fp), tuple(predictions), anchors=(ctx.conditions,)))
    return x_fp, x_hat


def _all_samples(ctx: FitContext, walker: Walker, seed: int, num_samples: int) -> WalkBatch:
    """Samples 0..N-1 as one step-major batch (network calls are still split by ``ctx.batch_size``)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return walker.batch(seed, range(num_samples), ctx.sample_shape, ctx.conditions)


SELECTION_SCORES = ("final_mse", "log_mse")
"""How held-out trajectories are scored (lower is better): ``"final_mse"``, the mean squared error of the final
states over all trajectories; ``"log_mse"``, the mean over trajectories of log10 of each one's MSE — the ranking
of mean PSNR (PSNR = const − 10 log10 MSE per sample), so a few heavy-tailed trajectories do not decide it, and
defined for latents too (no pixel range)."""


def check_selection_score(score: str, where: str = "selection score") -> None:
    """``ValueError`` naming ``SELECTION_SCORES`` unless ``score`` is one of them."""
    if score not in SELECTION_SCORES:
        raise ValueError(f"unknown {where} {score!r}; choose from {SELECTION_SCORES}")


def paired_final_error(ctx: FitContext, hooks: Sequence[SamplingHooks], *, num_samples: int, seed: int,
                       score: str = "final_mse") -> float:
    """The ``score`` (``SELECTION_SCORES``) of the FP and the corrected quantized final states x_0 from the same
    noise: the selection score."""
    check_selection_score(score)  # before the walks
    check_hooks(hooks)
    walker = ctx.walker()
    with torch.no_grad():
        x_fp, x_hat = _walk(ctx, walker, tuple(hooks), None, _all_samples(ctx, walker, seed, num_samples), seed)
    return final_state_score(x_fp, x_hat, score)


def final_state_score(x_fp: Tensor, x_hat: Tensor, score: str) -> float:
    """``score`` (``SELECTION_SCORES``) of final states (N, ...) against FP from the same noise; lower is better."""
    check_selection_score(score)
    wide = wide_dtype(x_hat.device)  # float64 (float32 on MPS, which has no float64)
    squared = (x_hat.to(wide) - x_fp.to(wide)).square()
    if score == "final_mse":
        return float(squared.mean())
    per_trajectory = squared.flatten(1).mean(dim=1)
    # an exact match would be -inf: floor at the smallest positive double so it still ranks first
    return float(per_trajectory.clamp_min(torch.finfo(torch.float64).tiny).log10().mean())


def _check_selection(candidates: list[dict[str, Any]], seed: int, selection_seed: int | None) -> None:
    if len(candidates) > 1 and selection_seed is None:
        raise ValueError("choosing between candidates needs a held-out selection_seed")
    if selection_seed is not None and selection_seed == seed:
        raise ValueError("selection_seed must differ from the fitting seed: a choice scored on its own noise is "
                         "biased")


def _held_out_score(correction: Correction, ctx: FitContext, hooks: Sequence[SamplingHooks],
                    settings: dict[str, Any], selection_seed: int | None, selection_samples: int) -> float:
    """The correction's selection score (``Correction.selection_score``) of ``hooks`` + ``correction`` (in its
    current candidate) on the held-out noise, logged."""
    name = correction.selection_score()
    score = paired_final_error(ctx, (*hooks, correction), num_samples=selection_samples,
                               seed=selection_seed, score=name)  # type: ignore[arg-type]
    logger.info("%s candidate %s: held-out %s %.4g", type(correction).__name__, settings, name, score)
    return score


def _record(correction: Correction, settings: dict[str, Any], score: float) -> dict[str, Any]:
    """One selection record: the candidate's settings and its held-out score under the score's name."""
    return {**settings, correction.selection_score(): score}


def _fit_once(correction: SequentialCorrection, ctx: FitContext, walker: Walker, hooks: tuple[SamplingHooks, ...],
              start: WalkBatch, key: TableKey, seed: int) -> None:
    correction.table_key = None
    correction.reset_tables(ctx.plan.steps, tuple(ctx.sample_shape))
    correction.table_key = key  # provisional: identity rows until fitted, so its hooks already run
    try:
        with torch.no_grad():
            _walk(ctx, walker, (*hooks, correction), correction, start, seed)
    except BaseException:
        correction.table_key = None
        raise


def fit_sequentially(
    correction: SequentialCorrection,
    ctx: FitContext,
    *,
    hooks: Sequence[SamplingHooks] = (),
    num_samples: int,
    seed: int,
    selection_seed: int | None = None,
    selection_samples: int = 64,
) -> list[dict[str, Any]]:
    """Fit ``correction`` step by step behind the already-fitted ``hooks`` (module docstring).

    Args:
        correction: The correction to fit in place; its tables are keyed by the plan's sampler, guidance and bits.
        ctx: The FP and quantized (uncorrected) networks, plan, shape, bit label, conditions and batching.
        hooks: Corrections applied before this one (fitted earlier in a stack).
        num_samples, seed: Calibration trajectories and their noise seed.
        selection_seed: Held-out noise seed scoring the candidates (needed when there is more than one).
        selection_samples: Trajectories of the held-out score.

    Returns:
        One record per candidate: its settings and held-out final MSE (``nan`` when there was nothing to choose).
    """
    hooks = tuple(hooks)
    check_hooks(hooks)
    walker = ctx.walker()
    key = TableKey.from_steps(ctx.plan.steps, ctx.bits)
    start = _all_samples(ctx, walker, seed, num_samples)
    candidates = correction.candidates()
    _check_selection(candidates, seed, selection_seed)
    records: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Tensor], dict[str, Any]] | None = None
    refit = correction.refit_per_candidate()
    for position, settings in enumerate(candidates):
        correction.use_candidate(settings)
        if refit or position == 0:  # otherwise the first candidate's tables are kept and only the setting changes
            _fit_once(correction, ctx, walker, hooks, start, key, seed)
        score = math.nan
        if len(candidates) > 1:
            score = _held_out_score(correction, ctx, hooks, settings, selection_seed, selection_samples)
            if best is None or score < best[0]:
                best = (score, {k: v.clone() for k, v in correction.state_dict().items() if isinstance(v, Tensor)},
                        settings)
        records.append(_record(correction, settings, score))
    if best is not None:
        correction.use_candidate(best[2])
        correction.load_state_dict({**correction.state_dict(), **best[1]})
        correction.table_key = key
    return records


def choose_candidate(
    correction: Correction,
    ctx: FitContext,
    *,
    hooks: Sequence[SamplingHooks] = (),
    seed: int,
    selection_seed: int | None,
    selection_samples: int = 64,
) -> list[dict[str, Any]]:
    """Keep the best of a fitted correction's ``candidates()`` by its held-out selection score (behind ``hooks``).

    For a correction fitted once on a pair (PTQD): each candidate is a switch over the same fitted tables, scored
    by ``paired_final_error`` on ``selection_seed`` (never the fitting ``seed``); the best stays selected.

    Returns:
        One record per candidate: its settings and held-out score under the score's name (``final_mse``,
        ``log_mse``; ``nan`` when there was nothing to choose).
    """
    candidates = correction.candidates()
    if len(candidates) < 2:
        return [_record(correction, settings, math.nan) for settings in candidates]
    _check_selection(candidates, seed, selection_seed)
    records: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any]] | None = None
    for settings in candidates:
        correction.use_candidate(settings)
        score = _held_out_score(correction, ctx, hooks, settings, selection_seed, selection_samples)
        records.append(_record(correction, settings, score))
        if best is None or score < best[0]:
            best = (score, settings)
    correction.use_candidate(best[1])  # type: ignore[index]
    return records
