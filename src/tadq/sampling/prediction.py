"""The one place that turns a model's output into ε: it knows ᾱ_t of the step (``StepContext.alpha_prod_t``).

With x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022):

    epsilon        ε = output                                    (returned as is: no arithmetic, bit-identical)
    v_prediction   ε = √ᾱ_t v + √(1-ᾱ_t) x_t                      (diffusers' ``pred_epsilon`` for v)
    sample         ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)                (diffusers' ``pred_epsilon`` for x₀)

Every sampler step, correction hook and calibration record downstream works on ε only. The constants are float32
0-d tensors on x's device, in diffusers' operation order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tadq.sampling.context import StepContext
from tadq.sampling.steps import check_supported

__all__ = ["to_epsilon"]


def to_epsilon(output: Tensor, x_t: Tensor, step: StepContext) -> Tensor:
    """ε from the model's output in the scheduler's ``prediction_type`` (module docstring).

    Args:
        output: The denoiser's output (ε, v or x₀), (B, C, H, W).
        x_t: The state the denoiser saw, (B, C, H, W).
        step: The step's constants (its ``prediction_type`` and ᾱ_t).

    Returns:
        ε, (B, C, H, W).
    """
    check_supported(step)
    if step.prediction_type == "epsilon":
        return output
    alpha_prod_t = torch.tensor(step.alpha_prod_t, dtype=torch.float32, device=x_t.device)
    beta_prod_t = 1 - alpha_prod_t
    if step.prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * output + (beta_prod_t**0.5) * x_t
    return (x_t - alpha_prod_t ** (0.5) * output) / beta_prod_t ** (0.5)
