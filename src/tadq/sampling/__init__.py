"""tadq's own sampling loop: a plan built once, one step walker (conditioning, guidance, ε conversion), DDIM/DDPM
steps with a controllable noise std, Euler (and ancestral), DPM-Solver++ and flow-matching Euler steps, and four
correction hook points."""

from tadq.sampling.conditioning import (
    ClassLabels,
    Conditioning,
    ConditioningList,
    ConditionSource,
    RandomClassLabels,
    conditions_for,
)
from tadq.sampling.config import (
    DEFAULTED_KEYS,
    DISCRETE_SCHEDULERS,
    FLOW_KINDS,
    FLOW_PREDICTION,
    FLOW_SCHEDULERS,
    PREDICTION_TYPES,
    SAMPLER_KINDS,
    SUPPORTED_SCHEDULERS,
    SamplerConfig,
    check_drivable,
    command_sampler_kind,
    default_sampler,
    make_scheduler,
    scheduler_config_key,
    walk_differences,
)
from tadq.sampling.context import GuidanceBranches, StepContext, require_one_step, step_contexts
from tadq.sampling.hooks import IdentityHooks, NoiseStd, SamplingHooks
from tadq.sampling.loop import SamplingResult, Trajectory, sample
from tadq.sampling.noise import MAX_SEED, check_seed, initial_noise, sample_generator, step_noise
from tadq.sampling.plan import SamplingPlan, check_guidance_scale
from tadq.sampling.prediction import to_epsilon
from tadq.sampling.steps import (
    data_prediction,
    ddim_step,
    ddpm_step,
    dpmsolver_step,
    euler_ancestral_step,
    euler_step,
    flow_euler_step,
    predict_x0,
    sampler_step,
)
from tadq.sampling.walker import Denoiser, StepAware, WalkBatch, Walker, hooked_step

__all__ = [
    "DISCRETE_SCHEDULERS",
    "FLOW_KINDS",
    "FLOW_PREDICTION",
    "FLOW_SCHEDULERS",
    "PREDICTION_TYPES",
    "SAMPLER_KINDS",
    "SUPPORTED_SCHEDULERS",
    "ClassLabels",
    "ConditionSource",
    "Conditioning",
    "ConditioningList",
    "Denoiser",
    "GuidanceBranches",
    "IdentityHooks",
    "NoiseStd",
    "RandomClassLabels",
    "SamplerConfig",
    "SamplingHooks",
    "SamplingPlan",
    "SamplingResult",
    "StepAware",
    "StepContext",
    "Trajectory",
    "WalkBatch",
    "Walker",
    "check_drivable",
    "check_guidance_scale",
    "conditions_for",
    "data_prediction",
    "ddim_step",
    "ddpm_step",
    "command_sampler_kind",
    "default_sampler",
    "dpmsolver_step",
    "euler_ancestral_step",
    "euler_step",
    "flow_euler_step",
    "hooked_step",
    "MAX_SEED",
    "check_seed",
    "initial_noise",
    "make_scheduler",
    "scheduler_config_key",
    "walk_differences",
    "DEFAULTED_KEYS",
    "predict_x0",
    "require_one_step",
    "sample",
    "sample_generator",
    "sampler_step",
    "step_contexts",
    "step_noise",
    "to_epsilon",
]
