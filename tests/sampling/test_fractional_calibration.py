"""Calibration on a fractional timestep grid (Euler's linspace spacing, flow models): the kept inputs carry the
exact timestep the network was called with, not a truncated integer."""

from __future__ import annotations

import torch
from diffusers import EulerDiscreteScheduler
from tests.conftest import build_tiny_unet

from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig, SamplingPlan


def test_calibration_keeps_fractional_timesteps():
    torch.manual_seed(0)
    model = build_tiny_unet()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    config_dict = {**scheduler.config, "_class_name": "EulerDiscreteScheduler"}  # as read from a saved folder
    sampler = SamplerConfig("euler", num_steps=6)
    grid = SamplingPlan.build(config_dict, sampler).timesteps()
    assert grid.dtype == torch.float32 and not all(float(t).is_integer() for t in grid)  # the case under test
    config = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=6, samples_per_step=2,
                               batch_size=4)
    calib = collect_calibration_set(model, adapter_for(model), config_dict, config, progress=False)
    assert calib.t.dtype == torch.float32
    assert torch.equal(calib.t, grid[calib.step_index])
