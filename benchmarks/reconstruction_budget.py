"""How many reconstruction iterations (and which rounding learning rate) the shipped model needs.

Quantizes the shipped model with Q-Diffusion-style reconstruction at several budgets and measures, against the FP
model from the same noise: PSNR, final-state MSE, and calibration wall time. Also times one full W4A8 calibration
at the default budget (the issue's ≤ 10 minute target on 2 cores). Run:

    python benchmarks/reconstruction_budget.py [--samples 256] [--preset W4A8] [--out runs/bench/reconstruction]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.metrics import per_step_mse, psnr_per_sample
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--preset", default="W4A8")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--budgets", default="0:0,100:50,250:100,500:200,1000:400",
                        help="comma list of weight_iters:activation_iters")
    parser.add_argument("--lrs", default="1e-2", help="comma list of rounding learning rates")
    parser.add_argument("--out", default="runs/bench/reconstruction")
    parser.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, scheduler = load_pipeline_parts(args.model)
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration, cache_dir=".cache/tadq",
                                    progress=False)
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed, record_trajectory=True,
                    progress=False)
    rows = []
    for lr in (float(v) for v in args.lrs.split(",")):
        for budget in args.budgets.split(","):
            w_iters, a_iters = (int(v) for v in budget.split(":"))
            method = "naive" if w_iters == 0 and a_iters == 0 else "qdiffusion"
            config = QuantConfig.from_preset(
                args.preset, method=method, calibration=calibration,
                reconstruction=ReconstructionConfig(weight_iters=w_iters, activation_iters=a_iters, weight_lr=lr))
            t0 = time.perf_counter()
            qmodel = api.quantize(model, scheduler, config, calibration=calib, progress=False)
            quantize_s = time.perf_counter() - t0
            q = api.sample(qmodel, scheduler, sampler, num_samples=args.samples, seed=args.seed,
                           record_trajectory=True, progress=False)
            row = {
                "preset": args.preset, "weight_iters": w_iters, "activation_iters": a_iters, "weight_lr": lr,
                "psnr": float(psnr_per_sample(q.images.clamp(-1, 1), fp.images.clamp(-1, 1)).mean()),
                "final_mse": float(per_step_mse(fp.trajectory.states, q.trajectory.states)[-1]),
                "quantize_s": round(quantize_s, 1), "threads": torch.get_num_threads(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| weight iters | act iters | rounding lr | PSNR vs FP (dB) | final MSE | quantize (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['weight_iters']} | {r['activation_iters']} | {r['weight_lr']:g} | {r['psnr']:.2f} | "
              f"{r['final_mse']:.2e} | {r['quantize_s']:.0f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
