"""Analytic denoisers for correction tests: an exact FP ε for Gaussian data, and a quantized one with a known error.

For data x_0 ~ N(0, σ_d²) per element and x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε, the optimal noise prediction is linear:

    ε_FP(x, t) = a_t x,   a_t = √(1−ᾱ_t) / (ᾱ_t σ_d² + 1 − ᾱ_t)

so every element stays independent along any trajectory, which keeps the tolerances of the tests derivable.
The injected "quantized" prediction is ε̂ = (1 + k(t)) ε_FP + b_c + s·n with n ~ N(0, 1) drawn fresh per call from
the denoiser's own generator (a fresh instance replays the same draws). ``Scaled`` and ``Shifted`` inject one
exact, deterministic error each (a per-channel scale, a per-channel output bias) around any FP prediction.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from tadq.corrections.context import FitContext
from tadq.sampling import SamplerConfig, SamplingPlan

SAMPLE_SHAPE = (2, 8, 8)  # C, H, W: two channels so that μ is tested per channel
DATA_STD = 0.5
BIAS = (0.08, -0.04)  # b_c
NOISE_STD = 0.05  # s


def analytic_scheduler() -> DDPMScheduler:
    """Linear betas without x_0 clipping, so the sampler is linear in ε (the tolerances assume it)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=False)


def injected_k(t: Tensor) -> Tensor:
    """k(t) = 0.05 + 0.2 t / 1000: a correlation coefficient that differs per step."""
    return 0.05 + 0.2 * t.double() / 1000.0


class AnalyticDenoiser:
    """ε_FP(x, t) = a_t x (module docstring)."""

    def __init__(self, scheduler: DDPMScheduler, data_std: float = DATA_STD) -> None:
        alpha_prod = scheduler.alphas_cumprod.double()
        self.coefficient = (1 - alpha_prod).sqrt() / (alpha_prod * data_std**2 + 1 - alpha_prod)  # a_t, (N_train,)

    def __call__(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        a = self.coefficient[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        return a * x


class InjectedError:
    """ε̂ = (1 + k(t)) ε_FP + b_c + s·n, with a seeded generator for n."""

    def __init__(self, fp: AnalyticDenoiser, bias: tuple[float, ...] = BIAS, noise_std: float = NOISE_STD,
                 k_scale: float = 1.0, seed: int = 123) -> None:
        self.fp, self.noise_std, self.k_scale = fp, noise_std, k_scale
        self.bias = torch.tensor(bias, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        k = (self.k_scale * injected_k(t)).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        noise = torch.randn(x.shape, generator=self.generator)
        return (1 + k) * self.fp(x, t) + self.bias.view(1, -1, 1, 1) + self.noise_std * noise


SCALE = torch.tensor([1.25, 0.8])  # injected per-channel scale of the prediction
SHIFT = torch.tensor([0.1, -0.05])  # injected per-channel output bias


class Scaled:
    """prediction = s_c × FP prediction: e = (1 − 1/s_c) ε̂ exactly, which TCEC's error model represents."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def __call__(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.fp(x, t) * SCALE.view(1, -1, 1, 1)


class Shifted:
    """prediction = FP prediction + c_c: a deterministic state bias builds up along the trajectory."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def __call__(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        return self.fp(x, t) + SHIFT.view(1, -1, 1, 1)


def fit_context(fp, quantized, scheduler, sampler: SamplerConfig, *, shape=SAMPLE_SHAPE, bits: str = "W4A8",
                **options) -> FitContext:
    """The ``FitContext`` of an analytic pair on ``sampler`` (options: conditions, batch_size, device)."""
    return FitContext(fp, quantized, SamplingPlan.build(scheduler, sampler), tuple(shape), bits, **options)
