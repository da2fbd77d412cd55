"""Session fixtures: one tiny UNet, its calibration set, and TFMQ models built once per setting."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.tfmq.common import SAMPLER, calibration, quant_config, scheduler, tfmq_config

from tadq.tfmq import apply_tfmq, quantize_tfmq


@pytest.fixture(scope="session")
def tiny_setup():
    """(FP tiny UNet, its training scheduler, its calibration set)."""
    torch.set_num_threads(1)
    model, sched = build_tiny_unet(), scheduler()
    return model, sched, calibration(model, sched)


@pytest.fixture(scope="session")
def build_tfmq(tiny_setup):
    """``build_tfmq(preset="W4A8", **tfmq_overrides)``: a TFMQ model on the tiny UNet, built once per setting.

    Settings that only change FSC or maintenance are applied (``apply_tfmq``) to a copy of the preset's base
    reconstruction, as the ``tadq run`` rows do. Shared between tests: deep-copy a model before changing it.
    """
    model, sched, calib = tiny_setup
    built = {}

    def build(preset: str = "W4A8", **overrides):
        config = tfmq_config(**overrides)
        key = (preset, tuple(sorted(overrides.items())))
        if key in built:
            return built[key]
        torch.set_num_threads(1)
        if config.weight_fields == tfmq_config().weight_fields and overrides:
            built[key] = apply_tfmq(copy.deepcopy(build(preset)), model, sched, config, SAMPLER, progress=False)
        else:
            built[key] = quantize_tfmq(model, sched, quant_config(preset), config, SAMPLER, calibration=calib,
                                       progress=False)
        return built[key]

    return build
