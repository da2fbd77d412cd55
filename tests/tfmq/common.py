"""Tiny settings shared by the TFMQ tests: an 8-step DDIM grid and a few reconstruction iterations."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.tfmq import TFMQConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=8)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=16, num_steps_kept=4, samples_per_step=8, batch_size=16)
RECON = ReconstructionConfig(weight_iters=40, activation_iters=10, batch_size=16)


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def quant_config(preset: str = "W4A8", **overrides) -> QuantConfig:
    """The Q-Diffusion row's config at tiny sizes."""
    return QuantConfig.from_preset(preset, method="qdiffusion", calibration=CALIB, reconstruction=RECON,
                                   split_shortcut=True, quantize_attention=True, **overrides)


def tfmq_config(**overrides) -> TFMQConfig:
    return TFMQConfig(**{"tiar_iters": 100, "num_samples": 16, "fsc_samples_per_step": 8, **overrides})


def calibration(model, scheduler_):
    torch.set_num_threads(1)
    return collect_calibration_set(model, adapter_for(model), scheduler_.config, CALIB, progress=False)
