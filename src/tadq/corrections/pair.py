"""Trajectory pairs: FP and quantized noise predictions at the same states, the data every correction fits on.

Sampler-level corrections (docs/methods/composition.md, step 3) estimate per-step maps from the quantized
prediction ε̂ to the FP prediction ε. Both predictions are recorded at every step of one sampling run, in one of
two modes (``TrajectoryMode``):

    teacher_forced   x_{t-1} = step(x_t, ε(x_t))                    the FP trajectory; the quantized path (with the
                     ε̂ = after_model(q(x̃_t)), x̃_t = before_model(x_t)   hooks already in the stack) is evaluated on
                                                                      the same state (as PTQD, docs/methods/ptqd.md)
    quantized        x_{t-1} = after_step(step(x̃_t, ε̂, noise_std(σ_t)))  the deployed quantized trajectory;
                     ε = fp(x̃_t)                                      FP is evaluated on the quantized input, and
                                                                      the FP trajectory from the same noise is
                                                                      recorded beside it (one more FP call a step)

Noise comes from ``tadq.sampling.initial_noise``/``step_noise``, so a sample's noise depends only on
(seed, sample index) and a pair is O(S) network calls per sample and network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tadq.corrections.context import FitContext, bits_of, shape_of
from tadq.progress import progress_bar
from tadq.sampling import SamplingHooks, StepContext, WalkBatch, Walker
from tadq.sampling.hooks import check_hooks

__all__ = ["TRAJECTORY_MODES", "FitContext", "TrajectoryMode", "TrajectoryPair", "bits_of",
           "collect_trajectory_pair", "shape_of"]

logger = logging.getLogger(__name__)

TrajectoryMode = Literal["teacher_forced", "quantized"]
TRAJECTORY_MODES: tuple[str, ...] = ("teacher_forced", "quantized")


@dataclass
class TrajectoryPair:
    """Per-step FP and quantized noise predictions along one set of trajectories; all tensors on the CPU.

    Args:
        eps_fp: FP prediction ε at each step, (S, N, C, H, W).
        eps_q: Quantized prediction ε̂ after the hooks already active (the earlier corrections), (S, N, C, H, W).
        model_inputs: What the quantized network saw (x̃_t, after ``before_model``), (S, N, C, H, W).
        states: x_T, then the state after each step of the trajectory that was followed, (S+1, N, C, H, W).
        fp_states: The FP trajectory from the same noise, (S+1, N, C, H, W); in ``quantized`` mode it is recorded
            beside the quantized one (input bias correction and error propagation compare the two), in
            ``teacher_forced`` mode it is ``states``.
        eps_fp_trajectory: FP prediction on the FP trajectory, ε_θ(x_t), (S, N, C, H, W); equals ``eps_fp`` in
            ``teacher_forced`` mode.
        steps: The sampler's ``StepContext`` of each step.
        mode: Which trajectory was followed (see the module docstring).
        seed: Noise seed of the run.
        bits: Bit label of the quantized model, e.g. ``"W4A8"`` (tables are keyed by it).
        guidance_scale: Classifier-free guidance scale w of both predictions (1.0: unconditional).
    """

    eps_fp: Tensor
    eps_q: Tensor
    model_inputs: Tensor
    states: Tensor
    steps: tuple[StepContext, ...]
    mode: TrajectoryMode
    seed: int
    bits: str
    guidance_scale: float = 1.0
    fp_states: Tensor | None = None
    eps_fp_trajectory: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in TRAJECTORY_MODES:
            raise ValueError(f"TrajectoryPair.mode={self.mode!r}; accepted values: {TRAJECTORY_MODES}")
        num_steps = len(self.steps)
        if num_steps == 0:
            raise ValueError("a TrajectoryPair needs at least one step")
        shape = tuple(self.eps_fp.shape)
        if len(shape) < 3 or shape[0] != num_steps:
            raise ValueError(f"eps_fp must be (S={num_steps}, N, C, ...), got {shape}")
        for name in ("eps_q", "model_inputs"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, eps_fp has {shape}")
        if tuple(self.states.shape) != (num_steps + 1, *shape[1:]):
            raise ValueError(f"states must be (S+1, N, ...) = {(num_steps + 1, *shape[1:])}, got "
                             f"{tuple(self.states.shape)}")
        if len({step.sampler_key for step in self.steps}) != 1:
            raise ValueError("all steps of a TrajectoryPair must come from one sampler")
        if self.mode == "teacher_forced":
            self.fp_states = self.states if self.fp_states is None else self.fp_states
            self.eps_fp_trajectory = self.eps_fp if self.eps_fp_trajectory is None else self.eps_fp_trajectory
        for name, expected in (("fp_states", self.states.shape), ("eps_fp_trajectory", self.eps_fp.shape)):
            value = getattr(self, name)
            if value is not None and value.shape != expected:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(expected)}")

    @property
    def num_steps(self) -> int:
        """S, the number of sampler steps."""
        return len(self.steps)

    @property
    def num_samples(self) -> int:
        """N, the number of trajectories."""
        return int(self.eps_fp.shape[1])

    @property
    def sampler_key(self) -> str:
        """``SamplerConfig.key`` of the sampler that produced the pair."""
        return self.steps[0].sampler_key

    def error(self, index: int) -> Tensor:
        """Δ = ε̂ − ε at step ``index`` in float64, (N, C, H, W) (docs/methods/ptqd.md#noise-model)."""
        return self.eps_q[index].double() - self.eps_fp[index].double()


def _run_batch(ctx: FitContext, walker: Walker, hooks: Sequence[SamplingHooks], batch: WalkBatch,
               mode: TrajectoryMode) -> tuple[list[Tensor], ...]:
    """One batch from x_T; returns per-step CPU lists (ε, ε̂, x̃, states, and in ``quantized`` mode the FP
    trajectory's states and ε)."""
    x = x_fp = batch.x
    eps_fp, eps_q, inputs, states, fp_states, eps_fp_traj = [], [], [], [x.cpu()], [x.cpu()], []
    carried = carried_fp = None  # each track's previous x̂_0 on a multistep sampler (Walker.carry)
    for step in walker.steps:
        x_in, eps_hat = walker.model_eps(ctx.q_denoiser, x, step, batch.cond, hooks)  # x̃_t, ε̂
        if mode == "teacher_forced":
            eps, _ = walker.predict(ctx.fp_denoiser, x, step, batch.cond)
            x, carried = walker.advance(x, eps, step, batch.noise, previous=carried), walker.carry(x, eps, step)
        else:
            eps, _ = walker.predict(ctx.fp_denoiser, x_in, step, batch.cond)
            x = walker.advance(x_in, eps_hat, step, batch.noise, hooks, previous=carried)
            carried = walker.carry(x_in, eps_hat, step)
            eps_on_fp, _ = walker.predict(ctx.fp_denoiser, x_fp, step, batch.cond)
            x_fp, carried_fp = (walker.advance(x_fp, eps_on_fp, step, batch.noise, previous=carried_fp),
                                walker.carry(x_fp, eps_on_fp, step))
            eps_fp_traj.append(eps_on_fp.cpu())
            fp_states.append(x_fp.cpu())
        eps_fp.append(eps.cpu())
        eps_q.append(eps_hat.cpu())
        inputs.append(x_in.cpu())
        states.append(x.cpu())
    return eps_fp, eps_q, inputs, states, fp_states, eps_fp_traj


def collect_trajectory_pair(
    ctx: FitContext,
    *,
    num_samples: int,
    seed: int,
    mode: TrajectoryMode = "teacher_forced",
    hooks: Sequence[SamplingHooks] = (),
) -> TrajectoryPair:
    """Run the sampler once and record ε and ε̂ at every step (docs/methods/ptqd.md, docs/methods/composition.md).

    Args:
        ctx: The networks (the quantized one *without* the corrections passed as ``hooks``), plan, shape, bit
            label, conditions and batching.
        num_samples: N trajectories (sample indices 0..N-1).
        seed: Noise (and random-condition) seed; use a calibration seed, never the evaluation seed.
        mode: ``"teacher_forced"`` or ``"quantized"`` (module docstring).
        hooks: Corrections already active (fitted earlier in the stack), applied to the quantized path in order.

    Returns:
        The ``TrajectoryPair``, keyed by the plan's sampler and guidance scale.
    """
    if mode not in TRAJECTORY_MODES:
        raise ValueError(f"mode={mode!r}; accepted values: {TRAJECTORY_MODES}")
    hooks = tuple(hooks)
    check_hooks(hooks)
    walker = ctx.walker()
    logger.info("collecting a %s trajectory pair: %d samples, %s, %s", mode, num_samples, ctx.plan.key, ctx.bits)
    counted = isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples > 0
    with torch.no_grad(), progress_bar(ctx.batches(seed, num_samples),
                                       total=-(-num_samples // ctx.batch_size) if counted else None,
                                       desc=f"trajectory pair ({mode})", leave=False,
                                       disable=not ctx.progress) as batches:  # one batch at a time
        per_batch = [_run_batch(ctx, walker, hooks, batch, mode) for batch in batches]

    def gather(position: int) -> Tensor:  # per batch a list over steps -> (steps, N, ...)
        return torch.cat([torch.stack(batch[position]) for batch in per_batch], dim=1)

    extra = {} if mode == "teacher_forced" else {"fp_states": gather(4), "eps_fp_trajectory": gather(5)}
    return TrajectoryPair(eps_fp=gather(0), eps_q=gather(1), model_inputs=gather(2), states=gather(3),
                          steps=ctx.plan.steps, mode=mode, seed=seed, bits=ctx.bits,
                          guidance_scale=ctx.plan.guidance_scale, **extra)
