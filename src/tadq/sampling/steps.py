"""tadq's own DDIM and DDPM update rules, with the noise std as an explicit input.

diffusers' ``DDPMScheduler.step`` draws its noise internally and ``DDIMScheduler.step`` derives σ_t from η, so
neither lets a correction change the sampler variance (PTQD's variance schedule calibration, docs/methods/ptqd.md).
These functions are the same maths written against a ``StepContext``; without an override they reproduce
``DDIMScheduler.step(..., eta=η, variance_noise=z)`` and ``DDPMScheduler.step`` (given the same z) bit for bit
on CPU float32, because the coefficients are evaluated in float32 in diffusers' operation order.

Notation (docs/methods/notation.md; ᾱ_prev is ``step.alpha_prod_t_prev``, σ the noise std, possibly overridden to σ'):

    x̂_0    = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t, clipped to [-r, r] when clip_sample is on        (DDIM eq. 12, DDPM eq. 15)
    DDIM:   x_prev = √ᾱ_prev x̂_0 + √(1-ᾱ_prev-σ²) ε + σ z                                        (DDIM eq. 12)
    DDPM:   x_prev = √ᾱ_prev β_t/(1-ᾱ_t) x̂_0 + √α_t (1-ᾱ_prev)/(1-ᾱ_t) x_t + σ z    (posterior mean, Ho eq. 7)
            with α_t = ᾱ_t/ᾱ_prev and β_t = 1-α_t; without clipping this equals Ho's eq. 11,
            (x_t - β_t/√(1-ᾱ_t) ε)/√α_t + σ z.

A std override σ' enters DDIM in both the direction term and the noise term, as PTQD's full code does, so the
total variance of x_prev keeps DDIM's marginal; for DDPM it replaces σ in the noise term only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tadq.sampling.config import PREDICTION_TYPES
from tadq.sampling.context import StepContext

__all__ = ["check_supported", "ddim_step", "ddpm_step", "predict_x0", "sampler_step"]

# A direction radicand 1-ᾱ_prev-σ'² below this is an error, not float rounding.
_RADICAND_TOLERANCE = 1e-6


def check_supported(step: StepContext) -> None:
    """Raise ``NotImplementedError`` for a prediction type the walker cannot convert to ε.

    The steps below always take ε: ``tadq.sampling.prediction.to_epsilon`` converts v- and x₀-predictions first.
    """
    if step.prediction_type not in PREDICTION_TYPES:
        raise NotImplementedError(
            f"prediction_type={step.prediction_type!r} is not supported; tadq converts {PREDICTION_TYPES} to ε."
        )


def _scalar(value: float, like: Tensor) -> Tensor:
    # float32 0-d tensor on x's device: diffusers keeps scheduler constants in float32 whatever x's dtype.
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _resolve_std(step: StepContext, std: Tensor | float | None, like: Tensor) -> Tensor:
    if std is None:
        return _scalar(step.std_dev_t, like)
    if isinstance(std, Tensor):
        return std.to(device=like.device)
    return _scalar(float(std), like)


def _add_noise(x_mean: Tensor, std: Tensor, noise: Tensor | None) -> Tensor:
    if noise is None:
        if bool((std != 0).any()):
            raise ValueError("The step has a non-zero noise std but no noise z was given; pass noise=z.")
        return x_mean
    return x_mean + std * noise


def predict_x0(x_t: Tensor, eps: Tensor, step: StepContext) -> Tensor:
    """x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t, clipped as the scheduler would (DDIM eq. 12).

    Args:
        x_t: Current state, (B, C, H, W).
        eps: Noise prediction ε used by the step (already converted from the model's prediction type), (B, C, H, W).
        step: The step's constants.

    Returns:
        The predicted clean sample, (B, C, H, W).
    """
    alpha_prod_t = _scalar(step.alpha_prod_t, x_t)
    beta_prod_t = 1 - alpha_prod_t
    x0 = (x_t - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
    if step.clip_sample_range is not None:
        x0 = x0.clamp(-step.clip_sample_range, step.clip_sample_range)
    return x0


def ddim_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None,
) -> Tensor:
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12) with an optional noise-std override.

    Args:
        x_t: Current state, (B, C, H, W).
        eps: Noise prediction ε, (B, C, H, W).
        step: The step's constants (``step.kind == "ddim"``).
        noise: Standard normal z, (B, C, H, W); may be ``None`` only when the std is zero.
        std: σ' replacing ``step.std_dev_t``: a float or a tensor broadcastable to x_t (0-d, or (B, 1, 1, 1) per
            sample). Used in both the direction and the noise term (PTQD's full code, docs/methods/ptqd.md).
        direction_std: σ used in the direction term instead of ``std`` (PTQD's "key code" form); ``None``: ``std``.

    Returns:
        x_prev, (B, C, H, W).
    """
    sigma = _resolve_std(step, std, x_t)
    alpha_prod_t_prev = _scalar(step.alpha_prod_t_prev, x_t)
    x0 = predict_x0(x_t, eps, step)
    sigma_direction = sigma if direction_std is None else _resolve_std(step, direction_std, x_t)
    radicand = 1 - alpha_prod_t_prev - sigma_direction**2  # 1 - ᾱ_prev - σ²
    if bool((radicand < -_RADICAND_TOLERANCE).any()):
        raise ValueError(
            f"DDIM step {step.index} (t={step.t}): noise std {float(sigma.max()):.4g} exceeds "
            f"√(1-ᾱ_prev)={(1 - step.alpha_prod_t_prev) ** 0.5:.4g}, so the direction term √(1-ᾱ_prev-σ²) is "
            "undefined; a noise_std hook may only lower σ this far."
        )
    direction = radicand.clamp(min=0) ** (0.5) * eps  # "direction pointing to x_t"
    x_mean = alpha_prod_t_prev ** (0.5) * x0 + direction
    return _add_noise(x_mean, sigma, noise)


def ddpm_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None,
) -> Tensor:
    """One DDPM ancestral step x_t -> x_prev through the posterior mean (Ho et al. 2020, eqs. 6-7).

    The mean is written in diffusers' x̂_0 form so that clip_sample acts on x̂_0 exactly as in
    ``DDPMScheduler.step``; for skipping grids α_t = ᾱ_t/ᾱ_prev.

    Args:
        x_t: Current state, (B, C, H, W).
        eps: Noise prediction ε, (B, C, H, W).
        step: The step's constants (``step.kind == "ddpm"``).
        noise: Standard normal z, (B, C, H, W); may be ``None`` only when the std is zero.
        std: σ' replacing ``step.std_dev_t`` in the noise term; a float or a tensor broadcastable to x_t.
        direction_std: ignored (DDPM has no direction term); accepted so both steps share one signature.

    Returns:
        x_prev, (B, C, H, W).
    """
    sigma = _resolve_std(step, std, x_t)
    alpha_prod_t = _scalar(step.alpha_prod_t, x_t)
    alpha_prod_t_prev = _scalar(step.alpha_prod_t_prev, x_t)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev  # α_t
    current_beta_t = 1 - current_alpha_t  # β_t
    x0 = predict_x0(x_t, eps, step)
    x0_coef = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t  # √ᾱ_prev β_t / (1-ᾱ_t)
    x_t_coef = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t  # √α_t (1-ᾱ_prev) / (1-ᾱ_t)
    x_mean = x0_coef * x0 + x_t_coef * x_t
    return _add_noise(x_mean, sigma, noise)


_STEPS: dict[str, Callable[..., Tensor]] = {"ddim": ddim_step, "ddpm": ddpm_step}


def sampler_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None,
) -> Tensor:
    """Take the step with the update rule named by ``step.kind`` (see ``ddim_step`` / ``ddpm_step``)."""
    return _STEPS[step.kind](x_t, eps, step, noise=noise, std=std, direction_std=direction_std)
