"""The int8-cuda backend ON A GPU (skipped without CUDA; CI has none, a lent GPU machine runs them).

test_layers.py checks the _int_mm arithmetic on CPU; here the same layers run their integer forward on the GPU and
are compared with the fake-quant forward on the CPU (one exact reference), within the same derived bounds; a tiny
UNet samples end to end on the GPU and agrees with the fake-quant model.
"""

from __future__ import annotations

import pytest
import torch
from tests.backends.test_layers import ACTIVATIONS, INT_MM, WEIGHTS, _check, _layers
from torch import nn

from tadq import api
from tadq.backends import int8_cuda_missing, to_backend
from tadq.backends.cuda_int8 import IntMMLinear
from tadq.config import CalibrationConfig, QuantConfig
from tadq.metrics.image import psnr_per_sample
from tadq.quant import QuantLinear
from tadq.sampling import SamplerConfig

pytestmark = pytest.mark.skipif(int8_cuda_missing() is not None, reason=f"int8-cuda: {int8_cuda_missing()}")

SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.mark.parametrize("activations", ["a8", "a4"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_int_mm_layers_on_the_gpu_match_fake_quant(weights, activations):
    for kind, layer, x in _layers(WEIGHTS[weights], ACTIVATIONS[activations]):
        _check(kind, layer, x, INT_MM[kind], device="cuda")


@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_gpu_integer_sampling_agrees_with_fake_quant(tiny_unet, ddpm_scheduler, preset):
    """Same noise → same samples up to float rounding (median PSNR ≥ 40 dB, as test_model.py on the CPU)."""
    fake = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset(preset, calibration=CALIB), progress=False)
    integer = to_backend(fake, "int8-cuda")  # converted and moved to the GPU
    images = api.sample(integer, ddpm_scheduler, SAMPLER, num_samples=6, seed=5, progress=False).images
    reference = api.sample(fake, ddpm_scheduler, SAMPLER, num_samples=6, seed=5, progress=False).images
    assert integer.layers["integer"] and all(b.is_cuda for b in integer.buffers())
    assert psnr_per_sample(images.cpu().float(), reference.cpu().float()).median() >= 40.0


@pytest.mark.parametrize("rows", [1, 17, 4096])
@pytest.mark.parametrize("in_features, out_features", [(32, 128), (16, 32), (8, 8), (40, 24), (288, 64), (1152, 3)])
def test_int_mm_linear_shapes_on_the_gpu(rows, in_features, out_features):
    """Shapes of the shipped models' layers (K = 16 or 32 with few rows made cuBLASLt refuse a row-major weight
    operand on an H200): every one runs, within the derived bound."""
    layer = QuantLinear.from_module(nn.Linear(in_features, out_features), WEIGHTS["w8-asym"], ACTIVATIONS["a8"])
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)) * 2 + 0.5
    layer.input_quantizer.set_range(x.min().reshape(1) * 0.8, x.max().reshape(1) * 0.8)
    _check("linear", layer, x, IntMMLinear, device="cuda")
