"""Which ridge damping the least-squares FP-output target of GPTQ rounding needs (``gptq_target_damp``).

Why: GPTQ onto the FP layer outputs first solves W* = W E[x x̂ᵀ] (E[x̂ x̂ᵀ] + λ·mean diag·I)⁻¹. With λ = gptq_damp
(1 %, GPTQ's own damping of its column updates) the ridge pulls W* toward zero along the inputs' weak directions
by more than an 8-bit step, and at W8A8 every unit rejected its GPTQ rounding as worse than nearest; too small a λ
leaves W* ill-conditioned. This script quantizes a shipped model with the default Q-Diffusion base (GPTQ, no
activation phase, input/output convs in float) at each (preset, damping) and reports the units that kept nearest
rounding, the summed unit loss against nearest, and the sampled PSNR against FP from the same noise.

Calibration as ``w8a8_diagnose.py`` (64 FP trajectories, 25 of 50 DDIM steps × 32 inputs, seed 0); evaluation
seed 1000. Rows ``PRESET:DAMP`` with DAMP a number or ``gptq`` (None: solve with gptq_damp, tadq before
2026-12-03). One JSON line per row. Run (one thread)::

    python benchmarks/gptq_target_damp.py --model digits --rows W8A8:gptq,W8A8:1e-3,W8A8:1e-4,W8A8:1e-5,\\
W4A8:gptq,W4A8:1e-3,W4A8:1e-4,W4A8:1e-5,W4A8:1e-6 --num-samples 128
    python benchmarks/gptq_target_damp.py --model photos --rows W8A8:gptq,W8A8:1e-4,W4A8:gptq,W4A8:1e-4 \\
        --num-samples 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from arguments import count
from common import probe_calibration

from tadq import api
from tadq.config import QuantConfig, ReconstructionConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample


def parse_row(row: str) -> tuple[str, float | None]:
    name, _, damp = row.partition(":")
    if not damp:
        raise SystemExit(f"row {row!r}: expected PRESET:DAMP (a number, or gptq for gptq_damp)")
    return name.upper(), None if damp == "gptq" else float(damp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rows", default="W8A8:gptq,W8A8:1e-4,W4A8:gptq,W4A8:1e-4")
    parser.add_argument("--num-samples", type=count, default=128)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--prior", choices=("zero", "weight"), default="zero",
                        help="what W*'s ridge shrinks toward (gptq_target_prior): zero, the solve this table was "
                             "measured with (tadq before 2026-12-07), or weight (today's default)")
    args = parser.parse_args()
    rows = [parse_row(row) for row in args.rows.split(",")]
    for _, damp in rows:  # refuse a bad value before any calibration
        ReconstructionConfig(gptq_target_damp=damp, gptq_target_prior=args.prior)
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    sampler, calibration, data = probe_calibration(workload)

    def draw(model) -> torch.Tensor:
        return api.sample(model, workload.scheduler, sampler, num_samples=args.num_samples, seed=1000,
                          conditions=workload.evaluation_conditions, progress=False).images.clamp(-1, 1)

    fp = draw(workload.model)
    for name, damp in rows:
        reconstruction = ReconstructionConfig(gptq_target_damp=damp, gptq_target_prior=args.prior)
        config = QuantConfig.from_preset(name, calibration=calibration, method="qdiffusion", fp_layers="first_last",
                                         reconstruction=reconstruction)
        start = time.process_time()
        qmodel = api.quantize(workload.model, workload.scheduler, config, calibration=data,
                              conditions=workload.calibration_conditions, progress=False)
        cpu_s = time.process_time() - start
        reports = qmodel.reconstruction_report
        print(json.dumps({
            "model": args.model, "preset": name, "gptq_target_damp": damp, "prior": args.prior, "units": len(reports),
            "kept_nearest": sum(r.guard_rejected for r in reports),
            "loss_vs_nearest": round(sum(r.loss_after for r in reports) / sum(r.loss_before for r in reports), 4),
            "psnr": round(float(psnr_per_sample(draw(qmodel), fp).mean()), 2), "quantize_cpu_s": round(cpu_s, 1)}),
            flush=True)


if __name__ == "__main__":
    main()
