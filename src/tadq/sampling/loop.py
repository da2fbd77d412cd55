"""tadq's sampling loop: diffusers' DDIM/DDPM pipeline loop with four correction hook points.

tadq owns the loop (docs/architecture.md) because diffusers pipelines rebuild their scheduler and each pipeline's
loop differs, and because DDPM's ``step`` gives no control over the noise. Per batch and step s (the calls are
the ``Walker``'s, shared with trajectory pairs and sequential fits):

    x_T ~ initial_noise(seed, i), cond_i           per-sample noise and conditions, independent of batching
    x̃   = before_model(x_t)
    ε   = after_model(to_ε(denoiser(x̃, t, cond)), x̃)   guided ε when the plan's guidance scale w ≠ 1
    σ'  = noise_std(σ_t)
    x_prev = after_step(sampler_step(x̃, ε, σ', z_s))   DDIM eq. 12 / DDPM eq. 7 / euler / dpmsolver++ / flow-euler
                                                     (steps.py); a dpmsolver++ 2M step also gets the previous x̂_0
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tadq.progress import progress_bar
from tadq.sampling.conditioning import Conditioning, ConditionSource
from tadq.sampling.config import SamplerConfig
from tadq.sampling.context import StepContext
from tadq.sampling.hooks import SamplingHooks, check_hooks
from tadq.sampling.plan import SamplingPlan
from tadq.sampling.walker import Denoiser, WalkBatch, Walker, hooked_step

if TYPE_CHECKING:
    from tqdm.auto import tqdm

__all__ = ["Denoiser", "SamplingResult", "Trajectory", "hooked_step", "sample"]

logger = logging.getLogger(__name__)


@dataclass
class Trajectory:
    """Everything the loop saw, for calibration and trajectory metrics; all tensors on the CPU.

    Args:
        states: x_T first, then the state after each step (after ``after_step``), (S+1, N, C, H, W).
        model_inputs: The x fed to the denoiser (after ``before_model``), which is also the state the step
            updated, (S, N, C, H, W).
        eps: The ε the step used (after ``after_model``), (S, N, C, H, W).
        timesteps: Training timestep of each step, (S,) long.
        steps: The ``StepContext`` of each step.
        cond: The conditioning of every sample (N rows, both branches), ``None`` for an unconditional run.
    """

    states: Tensor
    model_inputs: Tensor
    eps: Tensor
    timesteps: Tensor
    steps: tuple[StepContext, ...]
    cond: Conditioning | None = None


@dataclass
class SamplingResult:
    """Output of ``sample``.

    Args:
        images: Final x_0, (N, C, H, W) on the CPU, not clamped (clamp to [-1, 1] for display).
        indices: Sample index of each row, (N,) long; the noise of a row depends only on (seed, index).
        seed: Run seed.
        sampler: The sampler that produced them.
        trajectory: Recorded trajectory when ``record_trajectory=True``, else ``None``.
        guidance_scale: The plan's classifier-free guidance scale.
    """

    images: Tensor
    indices: Tensor
    seed: int
    sampler: SamplerConfig
    trajectory: Trajectory | None = None
    guidance_scale: float = 1.0


@dataclass
class _BatchRecord:
    states: list[Tensor]
    model_inputs: list[Tensor]
    eps: list[Tensor]
    cond: list[Conditioning]


def _resolve_indices(num_samples: int | None, indices: Sequence[int] | None) -> list[int]:
    if (num_samples is None) == (indices is None):
        raise ValueError("Pass exactly one of num_samples (samples 0..N-1) or indices (explicit sample indices).")
    if indices is None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
        return list(range(num_samples))
    resolved = [int(i) for i in indices]
    if not resolved or min(resolved) < 0:
        raise ValueError(f"indices must be a non-empty sequence of non-negative ints, got {indices!r}.")
    return resolved


def _check_shapes(sample_shape: tuple[int, int, int], batch_size: int) -> None:
    if len(sample_shape) != 3 or any(int(d) < 1 for d in sample_shape):
        raise ValueError(f"sample_shape must be (C, H, W) with positive sizes, got {sample_shape!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")


def _sample_batch(walker: Walker, denoiser: Denoiser, hooks: Sequence[SamplingHooks], batch: WalkBatch,
                  record: _BatchRecord | None, bar: tqdm) -> Tensor:
    """Run all steps on one batch from x_T; returns the final states (B, C, H, W)."""
    x = batch.x
    if record is not None:
        record.states.append(x.cpu())
        if batch.cond is not None:
            record.cond.append(batch.cond.to("cpu"))
    previous = None  # the previous step's x̂_0, for dpmsolver++ 2M
    for step in walker.steps:
        x_in, eps = walker.model_eps(denoiser, x, step, batch.cond, hooks)
        x_prev = walker.advance(x_in, eps, step, batch.noise, hooks, previous)
        previous = walker.carry(x_in, eps, step)
        if record is not None:
            record.model_inputs.append(x_in.cpu())
            record.eps.append(eps.cpu())
            record.states.append(x_prev.cpu())
        x = x_prev
        bar.update(1)
    return x


def sample(
    denoiser: Denoiser,
    plan: SamplingPlan,
    *,
    num_samples: int | None = None,
    indices: Sequence[int] | None = None,
    seed: int,
    sample_shape: tuple[int, int, int],
    batch_size: int = 128,
    hooks: Sequence[SamplingHooks] = (),
    conditions: ConditionSource | None = None,
    record_trajectory: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SamplingResult:
    """Sample with tadq's loop, applying ``hooks`` (corrections) at their four points in list order.

    Runs under ``torch.no_grad`` rather than ``inference_mode`` so that recorded trajectories can feed later
    autograd (block reconstruction). Results are gathered on the CPU batch by batch, so N may exceed what fits
    on the device; a recorded trajectory costs about 3 (S+1) N C H W floats of CPU memory.

    Args:
        denoiser: ``(x (B, C, H, W), t (B,) long, cond) -> prediction``, in eval mode, on ``device``.
        plan: The step grid and guidance scale (``SamplingPlan.build(model_scheduler, sampler, guidance_scale)``).
        num_samples: Sample indices 0..N-1 (exclusive with ``indices``).
        indices: Explicit sample indices, e.g. one shard of a large run (exclusive with ``num_samples``).
        seed: Run seed; with the index it fixes x_T, every step noise and random conditions of a sample.
        sample_shape: Per-sample shape (C, H, W).
        batch_size: Samples per denoiser call; changes only speed and memory, not the samples.
        hooks: Objects implementing ``SamplingHooks`` (e.g. subclasses of ``IdentityHooks``), applied in order.
        conditions: Per-sample conditions (``None``: unconditional model); guidance needs their null branch.
        record_trajectory: Also return states, model inputs, ε and conditions of every step.
        progress: Show a tqdm bar over batches x steps.
        device: Where the denoiser and the state live (noise is drawn on the CPU, then moved).
        dtype: Floating dtype of the states (the model's); ``None`` keeps float32.

    Returns:
        A ``SamplingResult`` with final x_0 of shape (N, C, H, W).
    """
    sample_indices = _resolve_indices(num_samples, indices)
    _check_shapes(sample_shape, batch_size)
    check_indices = getattr(conditions, "check_indices", None)  # a finite list: every sample has its row
    if check_indices is not None:
        check_indices(sample_indices)
    hooks = tuple(hooks)
    check_hooks(hooks)
    for hook in hooks:  # hooks with per-step tables refuse a grid they were not fitted for before any step runs
        check_plan = getattr(hook, "check_plan", None)
        if callable(check_plan):
            check_plan(plan.steps)
    walker = Walker(plan, device, dtype)
    steps = plan.steps
    num_batches = -(-len(sample_indices) // batch_size)
    logger.info("Sampling %d samples with %s (guidance %g) in %d batches.", len(sample_indices), plan.key,
                plan.guidance_scale, num_batches)

    record = _BatchRecord(states=[], model_inputs=[], eps=[], cond=[]) if record_trajectory else None
    images = []
    with torch.no_grad(), progress_bar(total=num_batches * len(steps), disable=not progress, desc="sampling") as bar:
        for start in range(0, len(sample_indices), batch_size):
            batch = walker.batch(seed, sample_indices[start: start + batch_size], sample_shape, conditions)
            images.append(_sample_batch(walker, denoiser, hooks, batch, record, bar).cpu())

    trajectory = None
    if record is not None:
        trajectory = Trajectory(
            states=_stack_batches(record.states, len(steps) + 1),
            model_inputs=_stack_batches(record.model_inputs, len(steps)),
            eps=_stack_batches(record.eps, len(steps)),
            timesteps=plan.timesteps(),
            steps=tuple(steps),
            cond=Conditioning.cat(record.cond) if record.cond else None,
        )
    return SamplingResult(
        images=torch.cat(images),
        indices=torch.tensor(sample_indices, dtype=torch.long),
        seed=seed,
        sampler=plan.sampler,
        trajectory=trajectory,
        guidance_scale=plan.guidance_scale,
    )


def _stack_batches(per_step: list[Tensor], steps_per_batch: int) -> Tensor:
    """[batch0 step0, batch0 step1, ..., batch1 step0, ...] -> (steps_per_batch, N, C, H, W)."""
    batches = [per_step[i : i + steps_per_batch] for i in range(0, len(per_step), steps_per_batch)]
    return torch.cat([torch.stack(batch) for batch in batches], dim=1)
