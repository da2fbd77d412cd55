"""Tiny saved artefacts for the damage tests: quantized with min/max ranges (10x faster than MSE) on a short
calibration, so a module fixture costs seconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tadq
from tadq.config import CalibrationConfig, QuantConfig
from tadq.io import save_quantized
from tadq.sampling import SamplerConfig

CALIB = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=4, num_steps_kept=2,
                          samples_per_step=4, batch_size=8)


def save_tiny_artefact(path: Path, preset: str, *, layer_bits: tuple = (), corrections: tuple = ()) -> Path:
    """Quantize the tests' tiny UNet at ``preset`` (``corrections`` fitted on top) and save it to ``path``."""
    from diffusers import DDPMScheduler
    from tests.conftest import build_tiny_unet

    from tadq.recipe import Recipe

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    config = QuantConfig.from_preset(preset, calibration=CALIB, layer_bits=layer_bits)
    minmax = {name: dataclasses.replace(getattr(config, name), range_method="minmax")
              for name in ("weights", "activations")}
    config = dataclasses.replace(config, **minmax)
    recipe = dataclasses.replace(Recipe.from_quant_config(config), corrections=corrections) if corrections else config
    save_quantized(tadq.quantize(build_tiny_unet(), scheduler, recipe, progress=False), path, scheduler)
    return path
