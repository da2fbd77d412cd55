"""TFMQ-DM's per-step activation ranges (model-wide finite-set calibration) on the int8 backend.

Every integer layer is fed the very input its fake-quant twin sees at each sampler step of the real TFMQ model and
must meet the derived bound (bounds.py) with that step's range. Whole samples are not compared here: on this tiny
random UNet a single activation landing within rounding of a code boundary flips one code, and the 8-step DDIM
trajectory amplifies that one sample's difference (observed: one sample off by 1.4 while the others agree to 1e-6),
so sample PSNR would test the toy model's chaos, not the backend; the shipped model's PSNR is in the benchmark.
"""

from __future__ import annotations

import pytest
import torch
from tests.backends.bounds import conv_bound, linear_bound
from tests.tfmq.common import CALIB, SAMPLER, scheduler, tfmq_config

from tadq import api
from tadq.backends import int8_cpu_missing, to_backend
from tadq.config import QuantConfig
from tadq.quant import QuantConv2d, QuantLinear
from tadq.tfmq import quantize_tfmq
from tadq.tfmq.fsc import StepQuantizer

pytestmark = pytest.mark.skipif(int8_cpu_missing() is not None, reason=f"int8 CPU backend: {int8_cpu_missing()}")


def test_per_step_ranges_run_in_integers(tiny_unet):
    sched = scheduler()
    fake = quantize_tfmq(tiny_unet, sched, QuantConfig.from_preset("W8A8", calibration=CALIB),
                         tfmq_config(fsc="model", tiar_iters=0), SAMPLER, progress=False)
    integer = to_backend(fake, "int8")
    assert sum(isinstance(m, StepQuantizer) for m in integer.model.modules()) > 20
    layers = {n: m for n, m in fake.model.named_modules() if type(m) in (QuantConv2d, QuantLinear)}
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in layers.items()]
    correction, x = fake.corrections[0], torch.randn(3, 1, 8, 8)
    try:
        for step in range(SAMPLER.num_steps):
            t = torch.full((3,), int(correction.grid_timesteps[step]))
            with torch.no_grad(), correction.at_step(step), integer.corrections[0].at_step(step):
                fake(x, t)
                for name, layer in layers.items():
                    got, expected = integer.model.get_submodule(name)(inputs[name]), layer(inputs[name])
                    bound_of = conv_bound if isinstance(layer, QuantConv2d) else linear_bound
                    extra = (layer,) if isinstance(layer, QuantConv2d) else ()
                    bound = bound_of(inputs[name], layer.input_quantizer, layer.weight_quantizer, layer.weight,
                                     layer.bias, *extra)
                    assert ((got.double() - expected.double()).abs() <= bound).all(), (name, step)
    finally:
        for hook in hooks:
            hook.remove()
    with pytest.raises(RuntimeError, match="sampler step"):  # no step set: refused, as on the fake model
        integer(x, torch.full((3,), 999))
    images = api.sample(integer, sched, SAMPLER, num_samples=2, seed=3, progress=False).images
    assert torch.isfinite(images).all()
