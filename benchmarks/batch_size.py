"""What the sampling batch size changes: the same indices sampled at batch 1 and at larger batches, compared.

Batched float kernels sum in a different order at different batch sizes (about 1e-7 relative); in a quantized
model a value at an activation quantizer's rounding boundary then lands on the neighbouring integer, a full step Δ,
and later layers and steps carry it on. Prints the pixel differences for FP and naive W8A8/W4A8 (shipped model,
DDIM 50, seed 1000, one thread) and, for one ε call, where the first quantized activation differs. Run:

    python benchmarks/batch_size.py [--samples 32]   # about 7 minutes on one core
"""

from __future__ import annotations

import argparse

import torch
from arguments import count

import tadq
from tadq.config import CalibrationConfig, QuantConfig
from tadq.models import load_pipeline_parts
from tadq.quant.quantizer import Quantizer
from tadq.sampling import SamplerConfig


def _compare(denoiser, scheduler, sampler, samples: int, label: str) -> None:
    runs = {bs: tadq.sample(denoiser, scheduler, sampler, num_samples=samples, seed=1000, batch_size=bs,
                            progress=False).images for bs in (1, 8, samples)}
    for bs in (8, samples):
        diff = (runs[bs] - runs[1]).abs()
        print(f"{label} batch {bs} vs 1: max |Δpixel| {diff.max():.3e}, mean {diff.mean():.3e}", flush=True)


def _first_flip(qmodel) -> None:
    """One ε call on 16 inputs, batched vs one by one: how many quantized activations differ, per quantizer."""
    codes: dict[str, list[torch.Tensor]] = {}
    handles = [m.register_forward_hook(lambda mod, inp, out, n=name: codes.setdefault(n, []).append(out.clone()))
               for name, m in qmodel.model.named_modules() if isinstance(m, Quantizer) and m.kind == "activation"]
    x = torch.randn(16, *qmodel.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((16,), 500)
    with torch.no_grad():
        batched = qmodel(x, t)
        single = torch.cat([qmodel(x[i: i + 1], t[i: i + 1]) for i in range(16)])
    for handle in handles:
        handle.remove()
    differing = [(name, int((outs[0] != torch.cat(outs[1:])).sum()), outs[0].numel()) for name, outs in codes.items()]
    differing = [d for d in differing if d[1]]
    print(f"one ε call: mean |Δε| {(batched - single).abs().mean():.2e}; first differing quantizer "
          f"{differing[0] if differing else None}, last {differing[-1] if differing else None}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=count, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, scheduler = load_pipeline_parts(None)
    sampler = SamplerConfig(kind="ddim", num_steps=50, eta=0.0)
    _compare(model, scheduler, sampler, args.samples, "FP")
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=32, num_steps_kept=25, samples_per_step=32)
    for preset in ("W8A8", "W4A8"):
        qmodel = tadq.quantize(model, scheduler, QuantConfig.from_preset(preset, calibration=calibration),
                               progress=False)
        _compare(qmodel, scheduler, sampler, args.samples, f"naive {preset}")
        if preset == "W8A8":
            _first_flip(qmodel)


if __name__ == "__main__":
    main()
