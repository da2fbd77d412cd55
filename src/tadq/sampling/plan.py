"""``SamplingPlan``: the step grid of one deployment, built once from (training scheduler, sampler, guidance).

Everything that walks a trajectory — the sampling loop, trajectory-pair collection, sequential fits, calibration
— takes a plan instead of rebuilding the diffusers scheduler and its ``StepContext``s itself, so they cannot
disagree about a timestep, a coefficient or the guidance scale the per-step tables are keyed by.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin
from torch import Tensor

from tadq.sampling.config import SamplerConfig, make_scheduler
from tadq.sampling.context import StepContext, step_contexts
from tadq.sampling.steps import check_supported

__all__ = ["SamplingPlan", "check_guidance_scale"]


def check_guidance_scale(guidance_scale: float) -> float:
    """The scale as a float; ``ValueError`` unless it is finite and ≥ 0 (1.0 means no guidance)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite float >= 0 (1.0: no guidance), got {guidance_scale!r}")
    return float(guidance_scale)


@dataclass(frozen=True)
class SamplingPlan:
    """The frozen per-step constants of one (sampler, guidance scale) on one model's training schedule.

    Args:
        sampler: The deployment sampler (kind, S, η, clipping).
        steps: One ``StepContext`` per step, noisiest first.
        guidance_scale: Classifier-free guidance scale w; 1.0 runs the conditional (or unconditional) model alone.
    """

    sampler: SamplerConfig
    steps: tuple[StepContext, ...]
    guidance_scale: float = 1.0

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
        steps = tuple(step_contexts(make_scheduler(scheduler, sampler), sampler, scale))
        check_supported(steps[0])
        return cls(sampler=sampler, steps=steps, guidance_scale=scale)

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
        """The training timestep of every step, (S,) long on the CPU."""
        return torch.tensor([step.t for step in self.steps], dtype=torch.long)
