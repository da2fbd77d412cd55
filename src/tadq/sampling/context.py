"""Per-step constants of a configured sampler, frozen into ``StepContext`` records.

Corrections must not reach into a diffusers scheduler (docs/architecture.md): everything they need about step i
(timesteps, ᾱ values, the sampler's noise std and its linear-form coefficients) is computed here once.

Notation (docs/methods/notation.md#sampler-update). For a step from grid timestep t to t_prev:

    ᾱ_t, ᾱ_prev        cumulative alpha products (ᾱ_prev = final value when t_prev < 0)
    α_t = ᾱ_t / ᾱ_prev  the "current" alpha of a (possibly skipping) step, β_t = 1 - α_t
    DDIM (eq. 12/16):  σ_t = η √((1-ᾱ_prev)/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_prev)
                       x_prev = A_t x_t + B_t ε + σ_t z,
                       A_t = √(ᾱ_prev/ᾱ_t),  B_t = √(1-ᾱ_prev-σ_t²) - √(ᾱ_prev (1-ᾱ_t)/ᾱ_t)
    DDPM (Ho eq. 7):   σ_t² = (1-ᾱ_prev)/(1-ᾱ_t) β_t ("fixed_small", clamped at 1e-20) or β_t ("fixed_large")
                       A_t = 1/√α_t,  B_t = -β_t / (√α_t √(1-ᾱ_t))

The linear form ignores x_0 clipping; with ``clip_sample`` on, it holds only where no pixel is clipped.

The constants are computed in float32 with the same operations as diffusers' ``step`` so that tadq's own steps
reproduce diffusers to the last bit; ``coef_x``/``coef_eps`` are float64 and only describe the maths.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from tadq.sampling.config import SamplerConfig

__all__ = ["DDPM_VARIANCE_TYPES", "GuidanceBranches", "StepContext", "step_contexts"]

logger = logging.getLogger(__name__)

DDPM_VARIANCE_TYPES: tuple[str, ...] = ("fixed_small", "fixed_small_log", "fixed_large")
_SCHEDULER_FOR_KIND = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


@dataclass(frozen=True)
class GuidanceBranches:
    """Both classifier-free guidance branches of one step, already converted to ε, (B, C, H, W) each.

    The loop hands them to a correction that asks for them (``wants_guidance_branches = True``) in
    ``StepContext.branches`` of its ``after_model`` call; every other hook sees the guided ε only.
    """

    unconditional: Tensor
    conditional: Tensor


@dataclass(frozen=True)
class StepContext:
    """Everything a correction may know about one sampler step.

    Args:
        index: Position on the sampling grid; 0 is the first, noisiest step.
        num_steps: Number S of steps on the grid.
        t: Training timestep fed to the denoiser.
        t_prev: Training timestep the step lands on; -1 after the last step.
        alpha_prod_t: ᾱ_t.
        alpha_prod_t_prev: ᾱ_prev; at the end 1.0, or DDIM's ``final_alpha_cumprod`` (ᾱ_0 when
            ``set_alpha_to_one=False``), as diffusers does.
        std_dev_t: The sampler's noise std σ_t for this step, before any correction.
        coef_x: A_t, the coefficient on x_t in the linear form x_prev = A_t x_t + B_t ε + σ_t z.
        coef_eps: B_t, the coefficient on ε in that form (DDIM or DDPM formula, see the module notation).
        prediction_type: The scheduler's ``prediction_type``; the walker converts the model output to ε with it
            (``tadq.sampling.prediction.to_epsilon``), so every step and hook works on ε.
        sampler_key: ``SamplerConfig.key``; corrections key their per-step tables by it.
        kind: ``"ddim"`` or ``"ddpm"``: which update rule takes the step.
        clip_sample_range: Clip x_0 to ``[-r, r]`` with this r; ``None`` when clipping is off.
        guidance_scale: Classifier-free guidance scale w of the plan (1.0: no guidance); tables are keyed by it.
        branches: Both guidance branches of the current call, only inside ``after_model`` of a hook that asks
            for them (not part of equality).
    """

    index: int
    num_steps: int
    t: int
    t_prev: int
    alpha_prod_t: float
    alpha_prod_t_prev: float
    std_dev_t: float
    coef_x: float
    coef_eps: float
    prediction_type: str
    sampler_key: str
    kind: str
    clip_sample_range: float | None = None
    guidance_scale: float = 1.0
    branches: GuidanceBranches | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_steps:
            raise ValueError(f"StepContext.index={self.index} must lie in [0, num_steps={self.num_steps}).")
        if self.kind not in _SCHEDULER_FOR_KIND:
            raise ValueError(f"StepContext.kind={self.kind!r}; accepted values: {tuple(_SCHEDULER_FOR_KIND)}.")

    @property
    def is_last(self) -> bool:
        """Whether this step produces the final sample x_0."""
        return self.index == self.num_steps - 1


def _check_scheduler(scheduler: DDIMScheduler | DDPMScheduler, sampler: SamplerConfig) -> None:
    expected = _SCHEDULER_FOR_KIND[sampler.kind]
    if not isinstance(scheduler, expected):
        raise TypeError(
            f"SamplerConfig(kind={sampler.kind!r}) needs a {expected.__name__}, got {type(scheduler).__name__}; "
            "build it with tadq.sampling.make_scheduler(model_scheduler, sampler)."
        )
    if scheduler.num_inference_steps != sampler.num_steps or len(scheduler.timesteps) != sampler.num_steps:
        raise ValueError(
            f"The scheduler is set to {scheduler.num_inference_steps} steps but the sampler asks for "
            f"{sampler.num_steps}; build it with make_scheduler(model_scheduler, sampler)."
        )
    if sampler.clip_sample is not None and bool(scheduler.config.clip_sample) != sampler.clip_sample:
        raise ValueError(
            f"SamplerConfig.clip_sample={sampler.clip_sample} but the scheduler has clip_sample="
            f"{scheduler.config.clip_sample}; build it with make_scheduler(model_scheduler, sampler)."
        )
    if scheduler.config.thresholding:
        raise NotImplementedError(
            "Dynamic thresholding (scheduler.config.thresholding=True) is not implemented in tadq's sampler; "
            "set thresholding=False (use clip_sample instead)."
        )
    if sampler.kind == "ddpm" and scheduler.config.variance_type not in DDPM_VARIANCE_TYPES:
        raise NotImplementedError(
            f"DDPM variance_type={scheduler.config.variance_type!r} is not supported by tadq's sampler; "
            f"accepted values: {DDPM_VARIANCE_TYPES}."
        )


def _ddim_prev_timestep(scheduler: DDIMScheduler, t: int) -> int:
    # DDIMScheduler.step always steps back by N // S, whatever the timestep spacing (see _warn_off_grid).
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def _ddpm_prev_timestep(timesteps: list[int], index: int) -> int:
    # DDPMScheduler.previous_timestep: the next grid point, or -1 after the last one.
    return timesteps[index + 1] if index + 1 < len(timesteps) else -1


def _ddim_std(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    # σ_t = η √((1-ᾱ_prev)/(1-ᾱ_t) · (1-ᾱ_t/ᾱ_prev)), DDIM eq. 16, in diffusers' float32 operation order.
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    return eta * variance ** (0.5)


def _ddpm_std(alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor, t: int, variance_type: str) -> torch.Tensor:
    # σ_t² = (1-ᾱ_prev)/(1-ᾱ_t) β_t (Ho et al. eq. 7), clamped at 1e-20 as diffusers does before its logs.
    if t == 0:  # diffusers adds noise only while t > 0
        return torch.zeros((), dtype=torch.float32)
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type == "fixed_large":
        return current_beta_t ** (0.5)
    return variance ** (0.5)


def _linear_coefficients(kind: str, alpha_prod_t: float, alpha_prod_t_prev: float, std: float) -> tuple[float, float]:
    """(A_t, B_t) of the linear form x_prev = A_t x_t + B_t ε + σ_t z (docs/methods/notation.md), in float64."""
    if kind == "ddim":
        coef_x = math.sqrt(alpha_prod_t_prev / alpha_prod_t)
        direction = math.sqrt(max(1.0 - alpha_prod_t_prev - std**2, 0.0))
        coef_eps = direction - math.sqrt(alpha_prod_t_prev * (1.0 - alpha_prod_t) / alpha_prod_t)
        return coef_x, coef_eps
    alpha_t = alpha_prod_t / alpha_prod_t_prev
    coef_x = 1.0 / math.sqrt(alpha_t)
    coef_eps = -(1.0 - alpha_t) / (math.sqrt(alpha_t) * math.sqrt(1.0 - alpha_prod_t))
    return coef_x, coef_eps


def _warn_off_grid(scheduler: DDIMScheduler, timesteps: list[int]) -> None:
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    off_grid = [t for t, nxt in zip(timesteps[:-1], timesteps[1:], strict=True) if t - ratio != nxt]
    if off_grid:
        logger.warning(
            "DDIM with timestep_spacing=%r: diffusers' DDIMScheduler.step moves t -> t - %d, which is not the next "
            "grid timestep for %d of %d steps (first at t=%d). tadq follows diffusers; use 'leading' or 'trailing' "
            "spacing for a consistent grid.",
            scheduler.config.timestep_spacing, ratio, len(off_grid), len(timesteps), off_grid[0],
        )


def step_contexts(scheduler: DDIMScheduler | DDPMScheduler, sampler: SamplerConfig, guidance_scale: float = 1.0
                  ) -> list[StepContext]:
    """Freeze the per-step constants of a scheduler configured by ``make_scheduler``.

    Args:
        scheduler: A ``DDIMScheduler`` (for ``kind="ddim"``) or ``DDPMScheduler`` with ``set_timesteps`` called.
        sampler: The sampler config the scheduler was built for.
        guidance_scale: Classifier-free guidance scale w recorded in every context.

    Returns:
        One ``StepContext`` per step, noisiest first.
    """
    _check_scheduler(scheduler, sampler)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # (N_train,)
    timesteps = [int(t) for t in scheduler.timesteps]
    if sampler.kind == "ddim":
        final_alpha_cumprod = scheduler.final_alpha_cumprod.to(torch.float32)
        _warn_off_grid(scheduler, timesteps)
    else:
        final_alpha_cumprod = torch.tensor(1.0)  # DDPMScheduler.one: DDPM has no set_alpha_to_one
    clip_range = float(scheduler.config.clip_sample_range) if scheduler.config.clip_sample else None

    contexts = []
    for index, t in enumerate(timesteps):
        if sampler.kind == "ddim":
            t_prev = _ddim_prev_timestep(scheduler, t)
        else:
            t_prev = _ddpm_prev_timestep(timesteps, index)
        t_prev = t_prev if t_prev >= 0 else -1
        alpha_prod_t = alphas_cumprod[t]
        alpha_prod_t_prev = alphas_cumprod[t_prev] if t_prev >= 0 else final_alpha_cumprod
        if sampler.kind == "ddim":
            std = float(_ddim_std(alpha_prod_t, alpha_prod_t_prev, sampler.eta))
        else:
            std = float(_ddpm_std(alpha_prod_t, alpha_prod_t_prev, t, scheduler.config.variance_type))
        coef_x, coef_eps = _linear_coefficients(sampler.kind, float(alpha_prod_t), float(alpha_prod_t_prev), std)
        contexts.append(
            StepContext(
                index=index, num_steps=len(timesteps), t=t, t_prev=t_prev,
                alpha_prod_t=float(alpha_prod_t), alpha_prod_t_prev=float(alpha_prod_t_prev), std_dev_t=std,
                coef_x=coef_x, coef_eps=coef_eps, prediction_type=str(scheduler.config.prediction_type),
                sampler_key=sampler.key, kind=sampler.kind, clip_sample_range=clip_range,
                guidance_scale=float(guidance_scale),
            )
        )
    return contexts
