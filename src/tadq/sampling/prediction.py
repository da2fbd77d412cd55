"""The one place that turns a model's output into ε: it knows ᾱ_t of the step (``StepContext.alpha_prod_t``).

With x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε and v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (Salimans & Ho 2022):

    epsilon        ε = output                                    (returned as is: no arithmetic, bit-identical)
    v_prediction   ε = √ᾱ_t v + √(1-ᾱ_t) x_t                      (diffusers' ``pred_epsilon`` for v)
    sample         ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)                (diffusers' ``pred_epsilon`` for x₀)

Every sampler step, correction hook and calibration record downstream works on ε only — except on a flow-matching
model (``flow_prediction``, velocity v = ε - x_0 of x_t = (1-σ) x_0 + σ ε), whose output is passed through unchanged
as the flow-euler step's input: ε = x_t + (1-σ) v cannot be inverted at σ = 1, where the first step starts, so the
velocity is the step's own prediction (``StepContext.coef_eps`` multiplies it). A flow model is never sampled as an
ε model and an ε-family model never by flow-euler (``check_supported``). The constants are float32 0-d tensors on
x's device, in diffusers' operation order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tadq.sampling.config import FLOW_PREDICTION
from tadq.sampling.context import StepContext
from tadq.sampling.steps import check_supported

__all__ = ["to_epsilon"]


def to_epsilon(output: Tensor, x_t: Tensor, step: StepContext) -> Tensor:
    """ε from the model's output in the scheduler's ``prediction_type``; a flow model's velocity as is (module
    docstring).

    Args:
        output: The denoiser's output (ε, v or x₀), (B, C, H, W).
        x_t: The state the denoiser saw, (B, C, H, W).
        step: The step's constants (its ``prediction_type`` and ᾱ_t).

    Returns:
        ε, or the velocity for flow-euler, (B, C, H, W).

    Raises:
        NotImplementedError: a flow model on an ε sampler kind, or the reverse (``check_supported``).
    """
    check_supported(step)
    if step.prediction_type in ("epsilon", FLOW_PREDICTION):
        return output
    alpha_prod_t = torch.tensor(step.alpha_prod_t, dtype=torch.float32, device=x_t.device)
    beta_prod_t = 1 - alpha_prod_t
    if step.prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * output + (beta_prod_t**0.5) * x_t
    return (x_t - alpha_prod_t ** (0.5) * output) / beta_prod_t ** (0.5)
