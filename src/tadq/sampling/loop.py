"""tadq's sampling loop: diffusers' DDIM/DDPM pipeline loop with four correction hook points.

tadq owns the loop (architecture.md §7) because diffusers pipelines rebuild their scheduler and each pipeline's
loop differs, and because DDPM's ``step`` gives no control over the noise. Per batch and step s:

    x_T ~ initial_noise(seed, i)                   per-sample noise, independent of batching (noise.py)
    x̃   = before_model(x_t)
    ε   = after_model(denoiser(x̃, t), x̃)
    σ'  = noise_std(σ_t)
    x_prev = after_step(sampler_step(x̃, ε, σ', z_s))   DDIM eq. 12 / DDPM eq. 7 (steps.py)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from tadq.sampling.config import SamplerConfig
from tadq.sampling.context import StepContext, step_contexts
from tadq.sampling.hooks import (
    NoiseStd,
    SamplingHooks,
    apply_after_model,
    apply_after_step,
    apply_before_model,
    apply_noise_std,
    check_hooks,
)
from tadq.sampling.noise import initial_noise, step_noise
from tadq.sampling.steps import check_supported, sampler_step

__all__ = ["Denoiser", "SamplingResult", "Trajectory", "hooked_step", "sample", "step_contexts"]

logger = logging.getLogger(__name__)

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``(x (B, C, H, W), t (B,) long) -> ε (B, C, H, W)``: a model adapter's ``predict_eps`` bound to its model."""


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
    """

    states: Tensor
    model_inputs: Tensor
    eps: Tensor
    timesteps: Tensor
    steps: tuple[StepContext, ...]


@dataclass
class SamplingResult:
    """Output of ``sample``.

    Args:
        images: Final x_0, (N, C, H, W) on the CPU, not clamped (clamp to [-1, 1] for display).
        indices: Sample index of each row, (N,) long; the noise of a row depends only on (seed, index).
        seed: Run seed.
        sampler: The sampler that produced them.
        trajectory: Recorded trajectory when ``record_trajectory=True``, else ``None``.
    """

    images: Tensor
    indices: Tensor
    seed: int
    sampler: SamplerConfig
    trajectory: Trajectory | None = None


@dataclass
class _BatchRecord:
    states: list[Tensor]
    model_inputs: list[Tensor]
    eps: list[Tensor]


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


def _denoise(denoiser: Denoiser, x: Tensor, step: StepContext) -> Tensor:
    t = torch.full((x.shape[0],), step.t, dtype=torch.long, device=x.device)  # (B,)
    eps = denoiser(x, t)
    if eps.shape != x.shape:
        raise ValueError(
            f"The denoiser returned shape {tuple(eps.shape)} for input {tuple(x.shape)}; it must return ε of the "
            "input's shape (split off learned-variance channels in the model adapter)."
        )
    return eps


def hooked_step(hooks: Sequence[SamplingHooks], x: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None
                ) -> Tensor:
    """One sampler update with the hooks' ``noise_std`` and ``after_step``: x_prev from x̃_t and the corrected ε.

    Every loop that follows a corrected trajectory (sampling, trajectory pairs, sequential fits) takes its step
    here, so a ``NoiseStd`` result and the hook order are handled in one place.
    """
    std = apply_noise_std(hooks, torch.tensor(step.std_dev_t, dtype=torch.float32, device=x.device), step)
    direction = None
    if isinstance(std, NoiseStd):
        std, direction = std.noise, std.direction
    x_prev = sampler_step(x, eps, step, noise=noise, std=std, direction_std=direction)
    return apply_after_step(hooks, x_prev, step)


def _sample_batch(
    denoiser: Denoiser,
    steps: Sequence[StepContext],
    hooks: Sequence[SamplingHooks],
    x: Tensor,
    noise: Tensor,
    record: _BatchRecord | None,
    bar: tqdm,
) -> Tensor:
    """Run all steps on one batch: x is x_T (B, C, H, W), noise the step noises (S, B, C, H, W)."""
    if record is not None:
        record.states.append(x.cpu())
    for step in steps:
        x = apply_before_model(hooks, x, step)
        eps = apply_after_model(hooks, _denoise(denoiser, x, step), x, step)
        x_prev = hooked_step(hooks, x, eps, step, noise[step.index])
        if record is not None:
            record.model_inputs.append(x.cpu())
            record.eps.append(eps.cpu())
            record.states.append(x_prev.cpu())
        x = x_prev
        bar.update(1)
    return x


def sample(
    denoiser: Denoiser,
    scheduler: DDIMScheduler | DDPMScheduler,
    sampler: SamplerConfig,
    *,
    num_samples: int | None = None,
    indices: Sequence[int] | None = None,
    seed: int,
    sample_shape: tuple[int, int, int],
    batch_size: int = 128,
    hooks: Sequence[SamplingHooks] = (),
    record_trajectory: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> SamplingResult:
    """Sample with tadq's loop, applying ``hooks`` (corrections) at their four points in list order.

    Runs under ``torch.no_grad`` rather than ``inference_mode`` so that recorded trajectories can feed later
    autograd (block reconstruction). Results are gathered on the CPU batch by batch, so N may exceed what fits
    on the device; a recorded trajectory costs about 3 (S+1) N C H W floats of CPU memory.

    Args:
        denoiser: ``(x (B, C, H, W), t (B,) long) -> ε``, in eval mode, on ``device``.
        scheduler: Built by ``make_scheduler(model_scheduler, sampler)``.
        sampler: The sampler config; its ``kind`` picks tadq's DDIM or DDPM step.
        num_samples: Sample indices 0..N-1 (exclusive with ``indices``).
        indices: Explicit sample indices, e.g. one shard of a large run (exclusive with ``num_samples``).
        seed: Run seed; with the index it fixes x_T and every step noise of a sample.
        sample_shape: Per-sample shape (C, H, W).
        batch_size: Samples per denoiser call; changes only speed and memory, not the samples.
        hooks: Objects implementing ``SamplingHooks`` (e.g. subclasses of ``IdentityHooks``), applied in order.
        record_trajectory: Also return states, model inputs and ε of every step.
        progress: Show a tqdm bar over batches x steps.
        device: Where the denoiser and the state live.

    Returns:
        A ``SamplingResult`` with final x_0 of shape (N, C, H, W).
    """
    sample_indices = _resolve_indices(num_samples, indices)
    _check_shapes(sample_shape, batch_size)
    hooks = tuple(hooks)
    check_hooks(hooks)
    steps = step_contexts(scheduler, sampler)
    check_supported(steps[0])
    device = torch.device(device)
    num_batches = -(-len(sample_indices) // batch_size)
    logger.info("Sampling %d samples with %s in %d batches.", len(sample_indices), sampler.key, num_batches)

    record = _BatchRecord(states=[], model_inputs=[], eps=[]) if record_trajectory else None
    images = []
    with torch.no_grad(), tqdm(total=num_batches * len(steps), disable=not progress, desc="sampling") as bar:
        for start in range(0, len(sample_indices), batch_size):
            batch = sample_indices[start : start + batch_size]
            x = initial_noise(seed, batch, sample_shape).to(device)  # (B, C, H, W)
            noise = step_noise(seed, batch, len(steps), sample_shape).to(device)  # (S, B, C, H, W)
            images.append(_sample_batch(denoiser, steps, hooks, x, noise, record, bar).cpu())

    trajectory = None
    if record is not None:
        trajectory = Trajectory(
            states=_stack_batches(record.states, len(steps) + 1),
            model_inputs=_stack_batches(record.model_inputs, len(steps)),
            eps=_stack_batches(record.eps, len(steps)),
            timesteps=torch.tensor([step.t for step in steps], dtype=torch.long),
            steps=tuple(steps),
        )
    return SamplingResult(
        images=torch.cat(images),
        indices=torch.tensor(sample_indices, dtype=torch.long),
        seed=seed,
        sampler=sampler,
        trajectory=trajectory,
    )


def _stack_batches(per_step: list[Tensor], steps_per_batch: int) -> Tensor:
    """[batch0 step0, batch0 step1, ..., batch1 step0, ...] -> (steps_per_batch, N, C, H, W)."""
    batches = [per_step[i : i + steps_per_batch] for i in range(0, len(per_step), steps_per_batch)]
    return torch.cat([torch.stack(batch) for batch in batches], dim=1)
