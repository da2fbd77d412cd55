"""The one step walker: how a batch of samples gets its noise and conditions, how the denoiser is asked for ε at
a step (step-aware networks told the step, both guidance branches in one call, the output converted to ε), and
how the sampler update is taken with the hooks. The sampling loop, trajectory-pair collection and sequential
fitting are all compositions of these calls; none of them builds a grid or takes a step of its own.

Per step, for a hook list H (corrections in application order):

    x̃   = before_model_H(x_t)
    out = denoiser(x̃, t, cond)                        or, with guidance w ≠ 1, one call on [x̃ | x̃] with
                                                       [uncond | cond]: out = out_u + w (out_c - out_u)
    ε   = after_model_H(to_epsilon(out, x̃), x̃)         (hooks asking for the branches get them in step.branches)
    x_prev = after_step_H(step(x̃, ε, noise_std_H(σ_t), z))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from tadq.sampling.conditioning import Conditioning, ConditionSource, conditions_for
from tadq.sampling.context import GuidanceBranches, StepContext
from tadq.sampling.hooks import NoiseStd, SamplingHooks, apply_after_step, apply_before_model, apply_noise_std
from tadq.sampling.noise import initial_noise, step_noise
from tadq.sampling.plan import SamplingPlan
from tadq.sampling.prediction import to_epsilon
from tadq.sampling.steps import data_prediction, sampler_step

__all__ = ["Denoiser", "StepAware", "Walker", "WalkBatch", "hooked_step"]

Denoiser = Callable[[Tensor, Tensor, "Conditioning | None"], Tensor]
"""``(x (B, C, H, W), t (B,) long, cond) -> output (B, C, H, W)``: the model's prediction in its scheduler's
``prediction_type`` (ε, v or x₀); ``cond`` is ``None`` for an unconditional model."""


@runtime_checkable
class StepAware(Protocol):
    """A denoiser whose network depends on the sampler step (TFMQ's per-step ranges and cache).

    The walker calls ``set_step(step)`` before each denoiser call of that step and ``set_step(None)`` after it, so
    a call outside a step raises instead of reusing a stale one.
    """

    def set_step(self, step: StepContext | None) -> None: ...


@dataclass(frozen=True)
class WalkBatch:
    """One batch of samples at its start: x_T (B, C, H, W), step noises (S, B, C, H, W), conditions (B rows)."""

    indices: tuple[int, ...]
    x: Tensor
    noise: Tensor
    cond: Conditioning | None


def hooked_step(hooks: Sequence[SamplingHooks], x: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None,
                previous: Tensor | None = None) -> Tensor:
    """One sampler update with the hooks' ``noise_std`` and ``after_step``: x_prev from x̃_t and the corrected ε
    (``previous``: the previous step's x̂_0, for a dpmsolver++ 2M step)."""
    std = apply_noise_std(hooks, torch.tensor(step.std_dev_t, dtype=torch.float32, device=x.device), step)
    direction = None
    if isinstance(std, NoiseStd):
        std, direction = std.noise, std.direction
    x_prev = sampler_step(x, eps, step, noise=noise, std=std, direction_std=direction, previous=previous)
    return apply_after_step(hooks, x_prev, step)


def _check_output(output: Tensor, expected: tuple[int, ...]) -> None:
    if tuple(output.shape) != expected:
        raise ValueError(
            f"The denoiser returned shape {tuple(output.shape)} for input {expected}; it must return a "
            "prediction of the input's shape (split off learned-variance channels in the model adapter)."
        )


class Walker:
    """Walks batches along one ``SamplingPlan`` (module docstring).

    Args:
        plan: The step grid and guidance scale.
        device: Where the states and the networks live.
        dtype: Floating dtype of the states (the model's); ``None`` keeps the noise's float32.
    """

    def __init__(self, plan: SamplingPlan, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                 ) -> None:
        if not isinstance(plan, SamplingPlan):
            raise TypeError(f"Walker takes a SamplingPlan (SamplingPlan.build), got {type(plan).__name__}")
        self.plan, self.device, self.dtype = plan, torch.device(device), dtype

    @property
    def steps(self) -> tuple[StepContext, ...]:
        return self.plan.steps

    def batch(self, seed: int, indices: Sequence[int], shape: tuple[int, ...],
              conditions: ConditionSource | None = None) -> WalkBatch:
        """x_T, step noises and conditions of ``indices``: drawn on the CPU (same on every device), then moved."""
        indices = tuple(int(i) for i in indices)
        x = self.plan.initial_state(initial_noise(seed, indices, shape))  # (B, C, H, W), drawn on the CPU
        x = x.to(device=self.device, dtype=self.dtype)
        noise = step_noise(seed, indices, self.plan.num_steps, shape).to(device=self.device, dtype=self.dtype)
        cond = conditions_for(conditions, seed, indices)
        if self.plan.guided and (cond is None or cond.unconditional is None):
            raise ValueError(f"guidance_scale={self.plan.guidance_scale} needs conditions with an unconditional "
                             "branch (e.g. RandomClassLabels(K, null_class=K) for a model with a null class); "
                             "this run has " + ("no conditions" if cond is None else "no unconditional branch"))
        return WalkBatch(indices, x, noise, None if cond is None else cond.to(self.device, self.dtype))

    def predict(self, denoiser: Denoiser, x: Tensor, step: StepContext, cond: Conditioning | None,
                branches: bool = False) -> tuple[Tensor, GuidanceBranches | None]:
        """(ε at ``step`` for the batch x, both guidance branches as ε when ``branches`` and guided, else None)."""
        time_dtype = torch.long if isinstance(step.t, int) else torch.float32  # fractional grids: euler, flow
        t = torch.full((x.shape[0],), step.t, dtype=time_dtype, device=x.device)  # (B,)
        aware = isinstance(denoiser, StepAware)
        if aware:
            denoiser.set_step(step)
        try:
            if not self.plan.guided:
                output = denoiser(x, t, cond)
                _check_output(output, tuple(x.shape))
                return to_epsilon(output, x, step), None
            if cond is None:
                raise ValueError("guidance needs conditions; pass a ConditionSource with an unconditional branch")
            both = denoiser(torch.cat([x, x]), torch.cat([t, t]), cond.guidance_batch())
        finally:
            if aware:
                denoiser.set_step(None)
        _check_output(both, (2 * x.shape[0], *x.shape[1:]))
        out_u, out_c = both.chunk(2)
        eps = to_epsilon(out_u + self.plan.guidance_scale * (out_c - out_u), x, step)
        if not branches:
            return eps, None
        return eps, GuidanceBranches(to_epsilon(out_u, x, step), to_epsilon(out_c, x, step))

    def predict_batched(self, denoiser: Denoiser, x: Tensor, step: StepContext, cond: Conditioning | None,
                        batch_size: int, branches: bool = False) -> tuple[Tensor, GuidanceBranches | None]:
        """``predict`` on all N rows of x, ``batch_size`` rows per denoiser call (sequential fits walk step-major)."""
        parts = [self.predict(denoiser, x[start: start + batch_size], step,
                              None if cond is None else cond.rows(slice(start, start + batch_size)), branches)
                 for start in range(0, x.shape[0], batch_size)]
        eps = torch.cat([part[0] for part in parts])
        if parts[0][1] is None:
            return eps, None
        return eps, GuidanceBranches(torch.cat([p[1].unconditional for p in parts]),  # type: ignore[union-attr]
                                     torch.cat([p[1].conditional for p in parts]))  # type: ignore[union-attr]

    @staticmethod
    def wants_branches(hooks: Sequence[SamplingHooks]) -> bool:
        """Whether a hook asks for both guidance branches (``wants_guidance_branches = True``)."""
        return any(getattr(hook, "wants_guidance_branches", False) for hook in hooks)

    @staticmethod
    def after_model(hooks: Sequence[SamplingHooks], eps: Tensor, x_in: Tensor, step: StepContext,
                    branches: GuidanceBranches | None = None) -> Tensor:
        """Every hook's ``after_model`` in order; a hook that asks for the guidance branches finds them in
        ``step.branches``."""
        for hook in hooks:
            sees = branches is not None and getattr(hook, "wants_guidance_branches", False)
            eps = hook.after_model(eps, x_in, dataclasses.replace(step, branches=branches) if sees else step)
        return eps

    def model_eps(self, denoiser: Denoiser, x: Tensor, step: StepContext, cond: Conditioning | None,
                  hooks: Sequence[SamplingHooks] = ()) -> tuple[Tensor, Tensor]:
        """(x̃, ε): the hooks' ``before_model``, the guided ε of x̃, then their ``after_model`` in order."""
        x_in = apply_before_model(hooks, x, step)
        eps, both = self.predict(denoiser, x_in, step, cond, branches=self.wants_branches(hooks))
        return x_in, self.after_model(hooks, eps, x_in, step, both)

    def carry(self, x_in: Tensor, eps: Tensor, step: StepContext) -> Tensor | None:
        """What the next step needs from this one: its x̂_0 on a multistep plan (dpmsolver++ 2M), else ``None``.

        Pass it as ``previous`` to the next ``advance`` of the same track (FP and quantized tracks each keep theirs).
        """
        return data_prediction(x_in, eps, step) if self.plan.multistep else None

    def advance(self, x_in: Tensor, eps: Tensor, step: StepContext, noise: Tensor,
                hooks: Sequence[SamplingHooks] = (), previous: Tensor | None = None) -> Tensor:
        """x_prev from the model input x̃ and the corrected ε, with the hooks' ``noise_std`` and ``after_step``;
        ``previous`` is the previous step's x̂_0 (``steps.data_prediction``), needed by a dpmsolver++ 2M step."""
        return hooked_step(hooks, x_in, eps, step, noise[step.index], previous)
