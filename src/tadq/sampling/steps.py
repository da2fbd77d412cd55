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

The ODE kinds (docs/sampling.md#the-ode-samplers). Their state is what the network sees, as for DDIM: a VP state
x = s/√(σ²+1) for euler (s the σ-space sample of ``EulerDiscreteScheduler``) and dpmsolver++, and the flow state
x = (1-σ) x_0 + σ ε for flow-euler. Each update is written as the diffusers ``step`` computes it, on the same
float32 0-d constants, so from the same inputs the native part is bit-identical:

    euler:        s = x·√(σ²+1);  x̂_0 = s - σ ε;  d = (s - x̂_0)/σ;  s' = s + d (σ' - σ);  x' = s'/√(σ'²+1)
                  (the last step returns s' itself, diffusers' output, also when the grid ends at σ_min > 0)
    euler-ancestral: as euler with σ' replaced by σ_down in dt, then s' += σ_up z
                  (σ_up = √(σ'²(σ² - σ'²)/σ²), σ_down = √(σ'² - σ_up²)); a noise_std hook's σ'' (VP units) replaces
                  σ_up/√(σ'²+1), the noise std of the state
    dpmsolver++:  x̂_0 = (x - s_σ ε)/α_σ  (α_σ = 1/√(σ²+1), s_σ = σ α_σ, λ = log α - log s, h = λ' - λ)
                  order 1:  x' = (s_σ'/s_σ) x - α_σ'(e^{-h} - 1) x̂_0
                  order 2:  r = (λ - λ_before)/h, D = (x̂_0 - x̂_0,before)/r,
                            x' = (s_σ'/s_σ) x - α_σ'(e^{-h} - 1) x̂_0 - ½ α_σ'(e^{-h} - 1) D      (2M, midpoint)
    flow-euler:   x' = x + (σ' - σ) v

Only euler's x·√(σ²+1) round trip (the state is the network input s/√(σ²+1), not s) departs from diffusers: one
rounding of relative size ≤ 2⁻²³ per step (docs/sampling.md#what-is-tested).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tadq.sampling.config import FLOW_PREDICTION, PREDICTION_TYPES
from tadq.sampling.context import StepContext

__all__ = ["check_supported", "data_prediction", "ddim_step", "ddpm_step", "dpmsolver_step", "euler_ancestral_step",
           "euler_step", "flow_euler_step", "initial_state", "predict_x0", "sampler_step"]

# A direction radicand 1-ᾱ_prev-σ'² below this is an error, not float rounding.
_RADICAND_TOLERANCE = 1e-6


def check_supported(step: StepContext) -> None:
    """Raise ``NotImplementedError`` for a prediction type the walker cannot convert to ε.

    The steps below always take ε: ``tadq.sampling.prediction.to_epsilon`` converts v- and x₀-predictions first.
    """
    if step.is_flow != (step.prediction_type == FLOW_PREDICTION):
        raise NotImplementedError(
            f"prediction_type={step.prediction_type!r} cannot be sampled with {step.kind!r}: a flow-matching model "
            f"({FLOW_PREDICTION!r}) is driven by flow-euler only, and flow-euler drives nothing else."
        )
    if step.prediction_type not in PREDICTION_TYPES + (FLOW_PREDICTION,):
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


def _require_deterministic(step: StepContext, std: Tensor | float | None, direction_std: Tensor | float | None
                           ) -> None:
    # The ODE kinds have no noise term, so a noise_std hook (PTQD's variance calibration) has nothing to act on.
    for value in (std, direction_std):
        if value is not None and bool((torch.as_tensor(value) != 0).any()):
            raise ValueError(f"{step.kind} step {step.index} is deterministic (no noise term); a noise_std hook may "
                             "not give it a non-zero std (PTQD's variance calibration applies to ddim η>0, ddpm and "
                             "euler-ancestral).")


def initial_state(z: Tensor, step: StepContext, init_noise_sigma: float = 1.0) -> Tensor:
    """x_T from standard normal z: z itself, except for the euler kinds, whose state is the network input
    (z · init_noise_sigma)/√(σ_0²+1) (diffusers' ``prepare_latents`` then ``scale_model_input``)."""
    if step.kind not in ("euler", "euler-ancestral"):
        return z
    sigma = _scalar(float(step.sigma_t), z)  # type: ignore[arg-type]
    return (z * _scalar(init_noise_sigma, z)) / ((sigma**2 + 1) ** 0.5)


def euler_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None, previous: Tensor | None = None,
) -> Tensor:
    """One Euler step on σ (Karras et al. 2022, Alg. 1 without churn) from the VP state x_t = s/√(σ²+1).

    Args:
        x_t: The network input (VP state), (B, C, H, W).
        eps: ε, (B, C, H, W).
        step: The step's constants (``kind == "euler"``).
        noise, std, direction_std, previous: accepted for one shared signature; the step is deterministic.

    Returns:
        x_prev, the next network input s'/√(σ'²+1), (B, C, H, W); after the last step the sample s' itself.
    """
    _require_deterministic(step, std, direction_std)
    sigma = _scalar(float(step.sigma_t), x_t)  # type: ignore[arg-type]
    sigma_next = _scalar(float(step.sigma_prev), x_t)  # type: ignore[arg-type]
    sample = x_t.to(torch.float32) * ((sigma**2 + 1) ** 0.5)  # back to diffusers' σ-space sample s, upcast as it does
    sigma_hat = sigma * (0.0 + 1)  # churn γ = 0, as diffusers writes it
    pred_original_sample = sample - sigma_hat * eps
    derivative = (sample - pred_original_sample) / sigma_hat
    dt = sigma_next - sigma_hat
    prev_sample = sample + derivative * dt
    if step.is_last:  # the sample itself, as diffusers returns it (differs from the VP state when σ' = σ_min > 0)
        return prev_sample.to(x_t.dtype)
    return (prev_sample / ((sigma_next**2 + 1) ** 0.5)).to(x_t.dtype)  # the state keeps the model's dtype


def euler_ancestral_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None, previous: Tensor | None = None,
) -> Tensor:
    """One Euler ancestral step (``EulerAncestralDiscreteScheduler.step``) from the VP state x_t = s/√(σ²+1).

    Args:
        x_t: The network input (VP state), (B, C, H, W).
        eps: ε, (B, C, H, W).
        step: The step's constants (``kind == "euler-ancestral"``; ``std_dev_t`` = σ_up/√(σ'²+1)).
        noise: Standard normal z, (B, C, H, W); may be ``None`` only when the std is zero.
        std: The state's noise std replacing ``step.std_dev_t`` (PTQD's VSC); unchanged, the noise is added in
            σ-space as diffusers does (σ_up z before the division by √(σ'²+1)).
        direction_std, previous: accepted for one shared signature (no direction term, one step).

    Returns:
        x_prev, the next network input, (B, C, H, W); after the last step the sample s' itself.
    """
    sigma = _scalar(float(step.sigma_t), x_t)  # type: ignore[arg-type]
    sigma_to = _scalar(float(step.sigma_prev), x_t)  # type: ignore[arg-type]
    sample = x_t.to(torch.float32) * ((sigma**2 + 1) ** 0.5)  # diffusers' σ-space sample, upcast as it does
    pred_original_sample = sample - sigma * eps
    sigma_up = (sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    derivative = (sample - pred_original_sample) / sigma
    prev_sample = sample + derivative * (sigma_down - sigma)
    scale_next = _scalar(1.0, x_t) if step.is_last else (sigma_to**2 + 1) ** 0.5
    unchanged = std is None or (not isinstance(std, Tensor) or std.ndim == 0) and float(std) == step.std_dev_t
    if unchanged:
        if noise is not None:
            prev_sample = prev_sample + noise * sigma_up
        elif step.std_dev_t != 0:
            raise ValueError("The step has a non-zero noise std but no noise z was given; pass noise=z.")
        return (prev_sample / scale_next).to(x_t.dtype)
    return _add_noise(prev_sample / scale_next, _resolve_std(step, std, x_t), noise).to(x_t.dtype)


def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    # VP (α, s) of noise level σ, in diffusers' _sigma_to_alpha_sigma_t order.
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def data_prediction(x_t: Tensor, eps: Tensor, step: StepContext) -> Tensor:
    """DPM-Solver++'s x̂_0 = (x_t - s_σ ε)/α_σ of the step, as ``convert_model_output`` computes it for ε.

    The sampling loop hands it to the next step as ``previous`` (the 2M update's second point).
    """
    alpha, sigma = _alpha_sigma(_scalar(float(step.sigma_t), x_t))  # type: ignore[arg-type]
    return (x_t - sigma * eps) / alpha


def dpmsolver_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None, previous: Tensor | None = None,
) -> Tensor:
    """One DPM-Solver++ step (Lu et al. 2022, eqs. 8 and 9 with the midpoint 2M rule).

    Args:
        x_t: The VP state (the network input), (B, C, H, W).
        eps: ε, (B, C, H, W).
        step: The step's constants (``kind == "dpmsolver++"``); ``step.order == 2`` uses ``previous``.
        noise, std, direction_std: accepted for one shared signature; the step is deterministic.
        previous: The previous step's ``data_prediction`` x̂_0, (B, C, H, W); required when ``step.order == 2``.

    Returns:
        x_prev, (B, C, H, W).
    """
    _require_deterministic(step, std, direction_std)
    if step.order == 2 and previous is None:
        raise NotImplementedError(
            f"DPM-Solver++ 2M step {step.index} needs the previous step's x̂_0 (previous=); tadq's sampling loop "
            "passes it, but one-step callers (correction fits, trajectory pairs) support dpmsolver++ with "
            "order=1 only."
        )
    x0 = data_prediction(x_t, eps, step)
    dtype, x_t = x_t.dtype, x_t.to(torch.float32)  # diffusers upcasts the sample for the update, then casts back
    alpha_t, sigma_t = _alpha_sigma(_scalar(float(step.sigma_prev), x_t))  # type: ignore[arg-type]
    alpha_s0, sigma_s0 = _alpha_sigma(_scalar(float(step.sigma_t), x_t))  # type: ignore[arg-type]
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    if step.order == 1:
        return ((sigma_t / sigma_s0) * x_t - (alpha_t * (torch.exp(-h) - 1.0)) * x0).to(dtype)
    alpha_s1, sigma_s1 = _alpha_sigma(_scalar(float(step.sigma_before), x_t))  # type: ignore[arg-type]
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    r0 = (lambda_s0 - lambda_s1) / h
    d1 = (1.0 / r0) * (x0 - previous)
    return ((sigma_t / sigma_s0) * x_t - (alpha_t * (torch.exp(-h) - 1.0)) * x0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1).to(dtype)


def flow_euler_step(
    x_t: Tensor, velocity: Tensor, step: StepContext, noise: Tensor | None = None,
    std: Tensor | float | None = None, direction_std: Tensor | float | None = None, previous: Tensor | None = None,
) -> Tensor:
    """One rectified-flow Euler step x' = x + (σ' - σ) v (``FlowMatchEulerDiscreteScheduler.step``).

    Args:
        x_t: The flow state (the network input), (B, C, H, W).
        velocity: The model's velocity v = ε - x_0 (the walker passes a flow model's output through unchanged).
        step: The step's constants (``kind == "flow-euler"``).
        noise, std, direction_std, previous: accepted for one shared signature; the step is deterministic.

    Returns:
        x_prev, (B, C, H, W).
    """
    _require_deterministic(step, std, direction_std)
    dt = _scalar(float(step.sigma_prev), x_t) - _scalar(float(step.sigma_t), x_t)  # type: ignore[arg-type]
    return (x_t.to(torch.float32) + dt * velocity).to(x_t.dtype)  # upcast for the update as diffusers does


def _ddim(x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None,
          std: Tensor | float | None = None, direction_std: Tensor | float | None = None,
          previous: Tensor | None = None) -> Tensor:
    return ddim_step(x_t, eps, step, noise=noise, std=std, direction_std=direction_std)


def _ddpm(x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None,
          std: Tensor | float | None = None, direction_std: Tensor | float | None = None,
          previous: Tensor | None = None) -> Tensor:
    return ddpm_step(x_t, eps, step, noise=noise, std=std, direction_std=direction_std)


_STEPS: dict[str, Callable[..., Tensor]] = {"ddim": _ddim, "ddpm": _ddpm, "euler": euler_step,
                                            "euler-ancestral": euler_ancestral_step,
                                            "dpmsolver++": dpmsolver_step, "flow-euler": flow_euler_step}


def sampler_step(
    x_t: Tensor, eps: Tensor, step: StepContext, noise: Tensor | None = None, std: Tensor | float | None = None,
    direction_std: Tensor | float | None = None, previous: Tensor | None = None,
) -> Tensor:
    """Take the step with the update rule named by ``step.kind``; ``eps`` is the step's prediction input (ε, or the
    velocity for flow-euler) and ``previous`` the previous step's x̂_0 for a dpmsolver++ 2M step."""
    return _STEPS[step.kind](x_t, eps, step, noise=noise, std=std, direction_std=direction_std, previous=previous)
