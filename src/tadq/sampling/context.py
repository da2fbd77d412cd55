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

The σ kinds carry their own noise level σ (``sigma_t`` → ``sigma_prev``, read from the diffusers scheduler's
``sigmas``) and, except euler-ancestral, are deterministic (σ_t of the noise term is 0); the state is always what
the network sees:

    euler (ε, VP state x = s/√(σ²+1)):  A_t = √(σ²+1)/√(σ'²+1),  B_t = (σ' - σ)/√(σ'²+1)   (≡ DDIM η=0 on σ's grid;
                                        the last step returns s' itself: √(σ'²+1) → 1 there)
    euler-ancestral: σ_up = √(σ'²(σ² - σ'²)/σ²), σ_down = √(σ'² - σ_up²): A_t as euler, B_t = (σ_down - σ)/√(σ'²+1),
                     noise std σ_t = σ_up/√(σ'²+1)
    dpmsolver++ (VP, α = 1/√(σ²+1), s = σα, λ = log α - log s, h = λ' - λ, c = α'(e^{-h} - 1)):
        order 1:  A_t = s'/s - c/α,  B_t = c s/α
        order 2:  with r = (λ - λ_before)/h, w = 1/(2r): A_t = s'/s - c(1+w)/α, B_t = c(1+w) s/α, and the previous
                  step's (x, ε) enter with coef_prev_x = c w/α_before, coef_prev_eps = -c w s_before/α_before
    flow-euler (velocity v, x = (1-σ) x_0 + σ ε):  A_t = 1,  B_t = σ' - σ      (B multiplies v, not ε)

For these kinds ``alpha_prod_t`` is the ᾱ of the step's noise level: 1/(σ²+1) for euler/dpmsolver++, and for
flow-euler the ᾱ of the same signal-to-noise ratio, (1-σ)²/((1-σ)² + σ²).

The constants are computed in float32 with the same operations as diffusers' ``step`` so that tadq's own steps
reproduce diffusers to the last bit; ``coef_x``/``coef_eps`` are float64 and only describe the maths.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import Tensor

from tadq.sampling.config import FLOW_KINDS, FLOW_PREDICTION, SamplerConfig

__all__ = ["DDPM_VARIANCE_TYPES", "GuidanceBranches", "StepContext", "require_one_step", "step_contexts"]

logger = logging.getLogger(__name__)

DDPM_VARIANCE_TYPES: tuple[str, ...] = ("fixed_small", "fixed_small_log", "fixed_large")
_SCHEDULER_FOR_KIND: dict[str, type] = {
    "ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}


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
        t: Timestep fed to the denoiser: an int on integer grids, a float where diffusers feeds fractional ones
            (euler's linspace or Karras grids, flow-euler's σ·N).
        t_prev: Training timestep the step lands on; -1 after the last step.
        alpha_prod_t: ᾱ_t.
        alpha_prod_t_prev: ᾱ_prev; at the end 1.0, or DDIM's ``final_alpha_cumprod`` (ᾱ_0 when
            ``set_alpha_to_one=False``), as diffusers does.
        std_dev_t: The sampler's noise std σ_t for this step, before any correction.
        coef_x: A_t, the coefficient on x_t in the linear form x_prev = A_t x_t + B_t ε + σ_t z.
        coef_eps: B_t, the coefficient on ε in that form (per kind, see the module notation; for flow-euler the
            coefficient on the velocity v, which is what the walker hands the step for a flow model).
        prediction_type: The scheduler's ``prediction_type``; the walker converts the model output to ε with it
            (``tadq.sampling.prediction.to_epsilon``), so every step and hook works on ε.
        sampler_key: ``SamplerConfig.key``; corrections key their per-step tables by it.
        kind: The ``SamplerConfig.kind`` whose update rule takes the step.
        clip_sample_range: Clip x_0 to ``[-r, r]`` with this r; ``None`` when clipping is off.
        guidance_scale: Classifier-free guidance scale w of the plan (1.0: no guidance); tables are keyed by it.
        sigma_t: The ODE kinds' noise level σ of x_t (``None`` for ddim/ddpm).
        sigma_prev: σ' of the state the step lands on (0 after the last step when the grid ends at 0).
        sigma_before: σ of the previous step (dpmsolver++ 2M's λ_before); ``None`` at the first step.
        order: 2 when the step also uses the previous step's x̂_0 (dpmsolver++ 2M), else 1.
        coef_prev_x: Coefficient on the previous step's state in the multistep linear form (0 for one-step kinds).
        coef_prev_eps: Coefficient on the previous step's ε in that form (0 for one-step kinds).
        branches: Both guidance branches of the current call, only inside ``after_model`` of a hook that asks
            for them (not part of equality).
    """

    index: int
    num_steps: int
    t: int | float
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
    sigma_t: float | None = None
    sigma_prev: float | None = None
    sigma_before: float | None = None
    order: int = 1
    coef_prev_x: float = 0.0
    coef_prev_eps: float = 0.0
    branches: GuidanceBranches | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_steps:
            raise ValueError(f"StepContext.index={self.index} must lie in [0, num_steps={self.num_steps}).")
        if self.kind not in _SCHEDULER_FOR_KIND:
            raise ValueError(f"StepContext.kind={self.kind!r}; accepted values: {tuple(_SCHEDULER_FOR_KIND)}.")

    @property
    def is_flow(self) -> bool:
        """Whether the step integrates a flow-matching ODE (its prediction input is the velocity, not ε)."""
        return self.kind in FLOW_KINDS

    @property
    def is_last(self) -> bool:
        """Whether this step produces the final sample x_0."""
        return self.index == self.num_steps - 1


def require_one_step(steps: Sequence[StepContext], who: str, why: str) -> None:
    """Raise ``NotImplementedError`` when a step also uses the previous step (dpmsolver++ 2M).

    A correction whose maths assumes the one-step linear update x_prev = A x + B ε (+ σ z) calls this when it is
    fitted, so a multistep sampler gets a clear refusal instead of wrong tables; ``why`` says which term breaks.
    """
    multistep = [step.index for step in steps if step.order > 1]
    if multistep:
        raise NotImplementedError(
            f"{who} is not implemented for {steps[0].sampler_key}: {len(multistep)} of its steps also use the "
            f"previous step's x̂_0 (x_prev = A x + B ε + C_x x_before + C_ε ε_before), and {why}. Use a one-step "
            "sampler (ddim, ddpm, euler, flow-euler, or dpmsolver++ with order=1).")


def _check_scheduler(scheduler: Any, sampler: SamplerConfig) -> None:
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
    if sampler.clip_sample is not None and bool(scheduler.config.get("clip_sample", False)) != sampler.clip_sample:
        raise ValueError(
            f"SamplerConfig.clip_sample={sampler.clip_sample} but the scheduler has clip_sample="
            f"{scheduler.config.clip_sample}; build it with make_scheduler(model_scheduler, sampler)."
        )
    if scheduler.config.get("thresholding", False):
        raise NotImplementedError(
            "Dynamic thresholding (scheduler.config.thresholding=True) is not implemented in tadq's sampler; "
            "set thresholding=False (use clip_sample instead)."
        )
    if sampler.kind == "ddpm" and scheduler.config.variance_type not in DDPM_VARIANCE_TYPES:
        raise NotImplementedError(
            f"DDPM variance_type={scheduler.config.variance_type!r} is not supported by tadq's sampler; "
            f"accepted values: {DDPM_VARIANCE_TYPES}. Sample it with another kind (ddim, euler, euler-ancestral, "
            "dpmsolver++; tadq sample: --sampler), which steps on the prediction half of a learned-variance output."
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
            "grid timestep for %d of %d steps (first at t=%d). tadq follows diffusers; for a consistent grid use "
            "'leading' spacing, or 'trailing' with a step count that divides num_train_timesteps (%d).",
            scheduler.config.timestep_spacing, ratio, len(off_grid), len(timesteps), off_grid[0],
            scheduler.config.num_train_timesteps,
        )


def _grid_times(values: list[float], flow: bool) -> list[int | float]:
    # ints where diffusers' grid is integral (the denoiser then sees the same long timesteps as on DDIM grids),
    # floats where it is fractional (euler's linspace/Karras grids) and always for flow models (σ·N).
    if not flow and all(value.is_integer() for value in values):
        return [int(value) for value in values]
    return values


def _dpm_lower_order_final(scheduler: DPMSolverMultistepScheduler, index: int, count: int) -> bool:
    # DPMSolverMultistepScheduler.step: the last step falls back to first order for numerical stability.
    config = scheduler.config
    return index == count - 1 and (config.euler_at_final or (config.lower_order_final and count < 15)
                                   or config.final_sigmas_type == "zero")


def _vp(sigma: float) -> tuple[float, float]:
    """(α, s) of a VP state with noise level σ: α = 1/√(σ²+1), s = σα (float64 maths)."""
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _dpm_coefficients(sigma: float, sigma_prev: float, sigma_before: float | None, order: int
                      ) -> tuple[float, float, float, float]:
    """(A, B, C_x, C_ε) of the DPM-Solver++ update x' = A x + B ε + C_x x_before + C_ε ε_before (float64)."""
    alpha_s, s_s = _vp(sigma)
    alpha_t, s_t = _vp(sigma_prev)
    exp_neg_h = 0.0 if s_t == 0.0 else (s_t * alpha_s) / (alpha_t * s_s)  # e^{-h}, h = λ' - λ
    c = alpha_t * (exp_neg_h - 1.0)
    if order == 1:
        return s_t / s_s - c / alpha_s, c * s_s / alpha_s, 0.0, 0.0
    assert sigma_before is not None
    alpha_b, s_b = _vp(sigma_before)
    h = math.log(alpha_t / s_t) - math.log(alpha_s / s_s)
    h_before = math.log(alpha_s / s_s) - math.log(alpha_b / s_b)
    w = h / (2.0 * h_before)  # 1/(2 r), r = h_before / h
    return (s_t / s_s - c * (1.0 + w) / alpha_s, c * (1.0 + w) * s_s / alpha_s, c * w / alpha_b,
            -c * w * s_b / alpha_b)


def _sigma_up(sigma: float, sigma_next: float) -> float:
    """Euler ancestral's noise std in σ-space, √(σ'²(σ² - σ'²)/σ²), evaluated in float32 as diffusers does."""
    sigma_from, sigma_to = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
    return float((sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)


def _ode_contexts(scheduler: Any, sampler: SamplerConfig, guidance_scale: float) -> list[StepContext]:
    """Step constants of euler, euler-ancestral, dpmsolver++ and flow-euler from the scheduler's own σ grid."""
    sigmas = [float(v) for v in scheduler.sigmas.to(torch.float32)]  # (S+1,), float32 values
    flow = sampler.kind in FLOW_KINDS
    times = _grid_times([float(v) for v in scheduler.timesteps.to(torch.float64)], flow)
    count = len(times)
    prediction = FLOW_PREDICTION if flow else str(scheduler.config.prediction_type)
    contexts = []
    for index, t in enumerate(times):
        sigma, sigma_prev = sigmas[index], sigmas[index + 1]
        sigma_before = sigmas[index - 1] if index > 0 else None
        order = 1
        if sampler.kind == "dpmsolver++" and sampler.order == 2 and index > 0 \
                and not _dpm_lower_order_final(scheduler, index, count):
            order = 2
        prev_x = prev_eps = std = 0.0
        if flow:
            alpha_prod, alpha_prod_prev = ((1 - v) ** 2 / ((1 - v) ** 2 + v**2) for v in (sigma, sigma_prev))
            coef_x, coef_eps = 1.0, sigma_prev - sigma
        else:
            alpha_prod, alpha_prod_prev = (float(1 / (torch.tensor(v, dtype=torch.float32) ** 2 + 1))
                                           for v in (sigma, sigma_prev))
            if sampler.kind in ("euler", "euler-ancestral"):  # the last step returns s' unscaled (steps.py)
                scale_next = 1.0 if index == count - 1 else math.sqrt(sigma_prev**2 + 1)
                sigma_up = _sigma_up(sigma, sigma_prev) if sampler.kind == "euler-ancestral" else 0.0
                sigma_down = math.sqrt(max(sigma_prev**2 - sigma_up**2, 0.0))  # σ' when there is no noise
                coef_x = math.sqrt(sigma**2 + 1) / scale_next
                coef_eps = (sigma_down - sigma) / scale_next
                std = float(torch.tensor(sigma_up / scale_next, dtype=torch.float32))  # float32, as the walker uses
            else:
                coef_x, coef_eps, prev_x, prev_eps = _dpm_coefficients(sigma, sigma_prev, sigma_before, order)
        t_prev = times[index + 1] if index + 1 < count else -1
        contexts.append(StepContext(
            index=index, num_steps=count, t=t, t_prev=t_prev, alpha_prod_t=alpha_prod,
            alpha_prod_t_prev=alpha_prod_prev, std_dev_t=std, coef_x=coef_x, coef_eps=coef_eps,
            prediction_type=prediction, sampler_key=sampler.key, kind=sampler.kind, clip_sample_range=None,
            guidance_scale=float(guidance_scale), sigma_t=sigma, sigma_prev=sigma_prev, sigma_before=sigma_before,
            order=order, coef_prev_x=prev_x, coef_prev_eps=prev_eps,
        ))
    return contexts


def step_contexts(scheduler: Any, sampler: SamplerConfig, guidance_scale: float = 1.0) -> list[StepContext]:
    """Freeze the per-step constants of a scheduler configured by ``make_scheduler``.

    Args:
        scheduler: The diffusers scheduler of ``sampler.kind`` (``make_scheduler``) with ``set_timesteps`` called.
        sampler: The sampler config the scheduler was built for.
        guidance_scale: Classifier-free guidance scale w recorded in every context.

    Returns:
        One ``StepContext`` per step, noisiest first.
    """
    _check_scheduler(scheduler, sampler)
    if sampler.kind not in ("ddim", "ddpm"):
        return _ode_contexts(scheduler, sampler, guidance_scale)
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # (N_train,)
    timesteps = [int(t) for t in scheduler.timesteps]
    zero = [t for t in timesteps if float(alphas_cumprod[t]) == 0.0]
    if zero:  # a zero-terminal-SNR schedule (rescale_betas_zero_snr) visiting its last timestep
        raise NotImplementedError(
            f"ᾱ_t = 0 at t={zero[0]} of the {sampler.key} grid (a zero-terminal-SNR schedule, rescale_betas_zero_snr="
            f"{scheduler.config.get('rescale_betas_zero_snr')}): tadq's {sampler.kind} step recovers x̂_0 from ε, "
            "which is undefined there; sample it with euler, euler-ancestral or dpmsolver++ (their σ grid stays "
            "finite), or with 'leading' spacing, which does not visit that timestep")
    if sampler.kind == "ddim":
        final_alpha_cumprod = scheduler.final_alpha_cumprod.to(torch.float32)
        _warn_off_grid(scheduler, timesteps)
    else:
        final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float32)  # DDPMScheduler.one: DDPM has no set_alpha_to_one
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
