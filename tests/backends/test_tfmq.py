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
from tests.backends.machine import needs_compiled_w8, needs_int8_cpu, needs_int8_w8
from tests.tfmq.common import CALIB, SAMPLER, scheduler, tfmq_config

from tadq import api
from tadq.backends import to_backend
from tadq.config import QuantConfig
from tadq.metrics.image import psnr_per_sample
from tadq.quant import QuantConv2d, QuantLinear
from tadq.tfmq import quantize_tfmq
from tadq.tfmq.fsc import StepQuantizer


@pytest.mark.parametrize("preset", [pytest.param("W8A8", marks=needs_int8_w8),
                                    pytest.param("W4A4", marks=needs_int8_cpu)])
def test_per_step_ranges_run_in_integers(tiny_unet, preset):
    """Every preset whose weights this CPU sums exactly: 4-bit weights run the per-step kernels on AVX2 too (the
    8-bit case alone left them untested there)."""
    sched = scheduler()
    fake = quantize_tfmq(tiny_unet, sched, QuantConfig.from_preset(preset, calibration=CALIB),
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


@pytest.mark.slow
@needs_compiled_w8
def test_per_step_ranges_and_cache_compile_once_and_follow_the_step(tiny_unet):
    """``int8-compiled`` reads the step from a tensor the sampler updates in place: one graph serves every step (no
    recompilation per step; one per batch size), and at each step it computes what the eager ``int8`` model
    computes. The bound: both run the same integer kernels on the same per-step grids; Inductor only reorders
    float ops around them (GroupNorm), so codes may flip at a boundary — compared as in ``test_model``: median
    PSNR of the outputs over the steps ≥ 40 dB, and the outputs must differ between steps (the ranges and the
    cache really change). Slow: two compiles of the tiny UNet."""
    from torch._dynamo.utils import counters

    from tadq.backends.compiled import CompiledIntegerDenoiser

    sched = scheduler()
    fake = quantize_tfmq(tiny_unet, sched, QuantConfig.from_preset("W8A8", calibration=CALIB),
                         tfmq_config(fsc="model", tiar_iters=0, maintenance="cache_fp"), SAMPLER, progress=False)
    eager = to_backend(fake, "int8")
    torch._dynamo.reset()
    counters.clear()
    compiled = to_backend(fake, "int8-compiled")
    assert isinstance(compiled, CompiledIntegerDenoiser)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    correction = fake.corrections[0]
    outputs, references = [], []
    for step in range(SAMPLER.num_steps):
        t = torch.full((3,), int(correction.grid_timesteps[step]))
        with torch.no_grad(), eager.corrections[0].at_step(step), compiled.corrections[0].at_step(step):
            references.append(eager(x, t))
            outputs.append(compiled(x, t))
    assert counters["stats"]["unique_graphs"] == 1
    wider = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(5))  # a second batch size: own graph
    t = torch.full((5,), int(correction.grid_timesteps[0]))
    with torch.no_grad(), eager.corrections[0].at_step(0), compiled.corrections[0].at_step(0):
        outputs.append(compiled(wider, t))
        references.append(eager(wider, t))
    assert counters["stats"]["unique_graphs"] == 2  # static shapes for per-step grids (compiled.py says why)
    psnr = torch.stack([psnr_per_sample(o, r).median() for o, r in zip(outputs, references, strict=True)])
    assert psnr.median() >= 40.0, psnr
    assert not torch.equal(outputs[0], outputs[SAMPLER.num_steps - 1])
    with pytest.raises(RuntimeError, match="sampler step"):  # no step set: refused before the graph runs
        compiled(x, torch.full((3,), 999))
