"""Shared fixtures of the correction tests: one tiny W4A8 model per test module, built as a user's would be."""

from __future__ import annotations

import pytest
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.sampling import SamplerConfig

TINY_SAMPLER = SamplerConfig("ddim", 3, eta=0.0)


@pytest.fixture(scope="module")
def tiny_w4a8():
    """(FP model, scheduler, W4A8 model calibrated on ``TINY_SAMPLER``'s trajectories): small enough to build per
    module, so a test that modifies its model cannot leak into another file's."""
    fp = build_tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    calibration = CalibrationConfig(sampler=TINY_SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=8)
    qmodel = api.quantize(fp, scheduler, QuantConfig.from_preset("W4A8", calibration=calibration), progress=False)
    return fp, scheduler, qmodel
