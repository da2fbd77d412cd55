"""``SamplingPlan``: the step grid of one deployment, built once from (training scheduler, sampler, guidance).

Everything that walks a trajectory — the sampling loop, trajectory-pair collection, sequential fits, calibration
— takes a plan instead of rebuilding the diffusers scheduler and its ``StepContext``s itself, so they cannot
disagree about a timestep, a coefficient or the guidance scale the per-step tables are keyed by.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from torch import Tensor

from tadq.sampling.config import FLOW_KINDS, SamplerConfig, make_scheduler
from tadq.sampling.context import StepContext, step_contexts
from tadq.sampling.steps import check_supported, initial_state

__all__ = ["SamplingPlan", "check_guidance_scale"]


def check_guidance_scale(guidance_scale: float) -> float:
    """The scale as a float; ``ValueError`` unless it is finite and ≥ 0 (1.0 means no guidance)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite float >= 0 (1.0: no guidance), got {guidance_scale!r}")
    return float(guidance_scale)


def _repeated_timesteps(timesteps: Tensor) -> list[float]:
    """The timesteps a grid visits more than once, in order."""
    return sorted(t for t, count in Counter(timesteps.tolist()).items() if count > 1)


def _check_distinct_timesteps(timesteps: Tensor, sampler: SamplerConfig) -> None:
    """Refuse a grid that visits a timestep twice: at as many steps as training timesteps diffusers' spacing
    repeats one, and a step between equal times has zero length (DPM-Solver++ divides by it; diffusers' own loop
    turns the sample to NaN there)."""
    repeated = _repeated_timesteps(timesteps)
    if repeated:
        shown = ", ".join(f"{t:g}" for t in repeated[:5]) + (", ..." if len(repeated) > 5 else "")
        raise ValueError(f"the {sampler.kind} grid of {sampler.num_steps} steps visits timestep(s) {shown} twice "
                         "(more steps than the training schedule has distinct times at this spacing): use fewer "
                         "steps")


def _grid_fault(timesteps: Tensor, sampler: SamplerConfig, train: int, indices: bool = True) -> str | None:
    """What is wrong with diffusers' grid of ``sampler`` on a schedule of ``train`` timesteps, or ``None``.

    Two grids diffusers builds wrong at some step counts: 'trailing' spacing's float ``arange`` yields one
    timestep too many (a last t = -1) at 62 of the counts 1-1000 (61, 103, ...); 'leading' spacing with
    ``steps_offset`` lifts the top of the grid to t = N_train at as many steps as training timesteps (DPM-Solver:
    one fewer). ᾱ_t there is out of range: ddim and ddpm raised IndexError, dpmsolver++ ZeroDivisionError, and
    euler ran a zero-length first step on a timestep the network was never trained at. Only a grid of training
    indices (``indices``) is checked for range: not a flow grid (t = σ·N_train reaches N_train) nor Euler's
    ``timestep_type="continuous"`` (t = ¼ log σ)."""
    if len(timesteps) != sampler.num_steps:
        return (f"diffusers' grid has {len(timesteps)} timesteps for {sampler.num_steps} steps (a float rounding "
                f"of its spacing; the last t={float(timesteps[-1]):g})")
    if not indices:
        return None
    outside = sorted({float(t) for t in timesteps if not 0 <= float(t) <= train - 1})
    if outside:
        return (f"the grid visits timestep(s) {', '.join(f'{t:g}' for t in outside[:3])}, outside the model's "
                f"{train} training timesteps (0 to {train - 1})")
    return None


def _check_grid(scheduler: ConfigMixin | Mapping[str, Any], built: Any, sampler: SamplerConfig) -> None:
    """Refuse a grid ``_grid_fault`` finds wrong, naming the nearest step counts whose grids are right."""
    train = int(built.config.num_train_timesteps)
    indices = sampler.kind not in FLOW_KINDS and built.config.get("timestep_type") != "continuous"
    fault = _grid_fault(built.timesteps, sampler, train, indices)
    if fault is None:
        return

    def fits(count: int) -> bool:  # right, and no timestep twice (_check_distinct_timesteps)
        other = replace(sampler, num_steps=count)
        times = make_scheduler(scheduler, other).timesteps
        return _grid_fault(times, other, train, indices) is None and not _repeated_timesteps(times)

    below = next((n for n in range(sampler.num_steps - 1, max(sampler.num_steps - 9, 0), -1) if fits(n)), None)
    above = next((n for n in range(sampler.num_steps + 1, min(sampler.num_steps + 9, train + 1)) if fits(n)), None)
    counts = " or ".join(str(n) for n in (below, above) if n is not None) or "fewer"
    config = built.config
    raise ValueError(f"{sampler.kind} with {sampler.num_steps} steps on this schedule (timestep_spacing="
                     f"{config.get('timestep_spacing')!r}, steps_offset={config.get('steps_offset')}): {fault}; "
                     f"use {counts} steps")


@dataclass(frozen=True)
class SamplingPlan:
    """The frozen per-step constants of one (sampler, guidance scale) on one model's training schedule.

    Args:
        sampler: The deployment sampler (kind, S, η, clipping).
        steps: One ``StepContext`` per step, noisiest first.
        guidance_scale: Classifier-free guidance scale w; 1.0 runs the conditional (or unconditional) model alone.
        init_noise_sigma: The scheduler's ``init_noise_sigma`` (euler kinds: σ_max or √(σ_max²+1) by spacing; 1
            else);
            ``initial_state`` turns the drawn z into x_T with it.
    """

    sampler: SamplerConfig
    steps: tuple[StepContext, ...]
    guidance_scale: float = 1.0
    init_noise_sigma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_scale", check_guidance_scale(self.guidance_scale))
        if len(self.steps) != self.sampler.num_steps:
            raise ValueError(f"a plan for {self.sampler.key} needs {self.sampler.num_steps} steps, got "
                             f"{len(self.steps)}")
        if any(s.guidance_scale != self.guidance_scale or s.sampler_key != self.sampler.key for s in self.steps):
            raise ValueError("every StepContext of a plan must carry the plan's sampler key and guidance scale")

    @classmethod
    def build(cls, scheduler: ConfigMixin | Mapping[str, Any], sampler: SamplerConfig,
              guidance_scale: float = 1.0) -> SamplingPlan:
        """The plan of ``sampler`` on the training schedule of ``scheduler`` (a diffusers scheduler or config).

        Raises ``NotImplementedError`` for a scheduler class or prediction type tadq cannot drive.
        """
        scale = check_guidance_scale(guidance_scale)
        diffusers_scheduler = make_scheduler(scheduler, sampler)
        _check_grid(scheduler, diffusers_scheduler, sampler)
        _check_distinct_timesteps(diffusers_scheduler.timesteps, sampler)
        steps = tuple(step_contexts(diffusers_scheduler, sampler, scale))
        check_supported(steps[0])
        euler = sampler.kind in ("euler", "euler-ancestral")
        init_noise_sigma = float(diffusers_scheduler.init_noise_sigma) if euler else 1.0
        return cls(sampler=sampler, steps=steps, guidance_scale=scale, init_noise_sigma=init_noise_sigma)

    def initial_state(self, z: Tensor) -> Tensor:
        """x_T from the drawn standard normal z (B, C, H, W): z itself except for the euler kinds
        (``steps.initial_state``)."""
        return initial_state(z, self.steps[0], self.init_noise_sigma)

    @property
    def multistep(self) -> bool:
        """Whether some step uses the previous step's x̂_0 (dpmsolver++ 2M): walks must pass it on."""
        return any(step.order > 1 for step in self.steps)

    @property
    def num_steps(self) -> int:
        """S, the number of steps."""
        return len(self.steps)

    @property
    def key(self) -> str:
        """``SamplerConfig.key``: what per-step tables are stored under (with the guidance scale)."""
        return self.sampler.key

    @property
    def guided(self) -> bool:
        """Whether each step evaluates both guidance branches (w ≠ 1)."""
        return self.guidance_scale != 1.0

    def timesteps(self) -> Tensor:
        """The timestep of every step, (S,) on the CPU: long on integer grids, float32 on fractional ones."""
        times = [step.t for step in self.steps]
        integral = all(isinstance(t, int) for t in times)
        return torch.tensor(times, dtype=torch.long if integral else torch.float32)
