"""tadq's own sampling loop: DDIM/DDPM steps with a controllable noise std and four correction hook points."""

from tadq.sampling.config import SAMPLER_KINDS, SamplerConfig, make_scheduler
from tadq.sampling.context import StepContext, step_contexts
from tadq.sampling.hooks import IdentityHooks, NoiseStd, SamplingHooks
from tadq.sampling.loop import Denoiser, SamplingResult, Trajectory, hooked_step, sample
from tadq.sampling.noise import initial_noise, sample_generator, step_noise
from tadq.sampling.steps import ddim_step, ddpm_step, predict_x0, sampler_step

__all__ = [
    "SAMPLER_KINDS",
    "Denoiser",
    "IdentityHooks",
    "NoiseStd",
    "SamplerConfig",
    "SamplingHooks",
    "SamplingResult",
    "StepContext",
    "Trajectory",
    "ddim_step",
    "ddpm_step",
    "hooked_step",
    "initial_noise",
    "make_scheduler",
    "predict_x0",
    "sample",
    "sample_generator",
    "sampler_step",
    "step_contexts",
    "step_noise",
]
