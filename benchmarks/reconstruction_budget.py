"""How many reconstruction iterations (and which rounding learning rate) the shipped model needs.

Quantizes the shipped model with Q-Diffusion-style reconstruction at several budgets and measures, against the FP
model from the same noise: PSNR, final-state MSE, and calibration wall time. Also times one full W4A8 calibration
at the default budget (the issue's ≤ 10 minute target on 2 cores). Run:

    python benchmarks/reconstruction_budget.py [--samples 256] [--preset W4A8] [--out runs/bench/reconstruction]
        [--loss-reductions sum,channel_sum] [--roundings adaround,gptq,gptq_adaround] [--fp-layers first_last]

A ``gptq`` rounding has no weight iterations: it runs once per distinct activation-iteration count of the budgets.
Every row is paired with the first one on the same noise (mean per-sample PSNR difference, 95 % interval).

(an unconditional model only; the class-conditional photos model runs in ``benchmarks/recon_diagnose.py``)
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from arguments import preset_name
from common import add_common_flags, shipped_setup, write_rows

from tadq import api
from tadq.config import QuantConfig, ReconstructionConfig, fp_layer_roles
from tadq.experiments.tfmq_measure import paired_difference
from tadq.metrics import per_step_mse, psnr_per_sample
from tadq.utils import atomic_write_text


def paired_with_first(first: dict, row: dict) -> dict[str, float]:
    """The row's mean per-sample PSNR difference from the first row (same noise) and its 95 % interval."""
    difference, interval = paired_difference(*(torch.tensor(r["psnr_per_sample"], dtype=torch.float64)
                                               for r in (row, first)))
    return {"vs_first": round(difference, 4), "vs_first_interval": round(interval, 4)}


def budget_pair(text: str) -> tuple[int, int]:
    """``weight_iters:activation_iters`` of ``--budgets`` as two counts of 0 or more."""
    parts = text.split(":")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"--budgets: {text!r} is not weight_iters:activation_iters (two whole numbers >= 0)")
    return int(parts[0]), int(parts[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=256, out="runs/bench/reconstruction")
    parser.add_argument("--preset", type=preset_name, default="W4A8")
    parser.add_argument("--budgets", default="0:0,500:200,1000:400,2000:800",
                        help="comma list of weight_iters:activation_iters")
    parser.add_argument("--lrs", default="3e-2", help="comma list of rounding learning rates")
    parser.add_argument("--model", default=None, help="diffusers folder (default: the shipped model)")
    parser.add_argument("--loss-reductions", default="channel_sum",
                        help="comma list of ReconstructionConfig.loss_reduction values (sum: tadq before issue 19)")
    parser.add_argument("--roundings", default="adaround",
                        help="comma list of ReconstructionConfig.rounding values (adaround, gptq, gptq_adaround)")
    parser.add_argument("--fp-layers", default=None,
                        help="a key of tadq.config.FP_LAYER_PRESETS kept in float in every row (default: none)")
    args = parser.parse_args()
    try:  # before the calibration data and the FP samples: a typo in a list used to surface after both
        grid = [(lr, reduction, rounding) for lr in (float(v) for v in args.lrs.split(","))
                for reduction in args.loss_reductions.split(",") for rounding in args.roundings.split(",")]
        budgets = [budget_pair(budget) for budget in args.budgets.split(",")]
        for _, reduction, rounding in grid:
            ReconstructionConfig(loss_reduction=reduction, rounding=rounding)
        if args.fp_layers is not None:
            fp_layer_roles(args.fp_layers)
    except ValueError as error:
        parser.error(str(error))
    setup = shipped_setup(args, args.model)
    model, scheduler, sampler, calibration, calib = (setup.model, setup.scheduler, setup.sampler, setup.calibration,
                                                     setup.calib)
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed, record_trajectory=True,
                    progress=False)
    rows = []
    for lr, reduction, rounding in grid:
        gptq_budgets = list(dict.fromkeys((0, a) for _, a in budgets))  # GPTQ has no rounding iterations
        for w_iters, a_iters in (gptq_budgets if rounding == "gptq" else budgets):
            method = "naive" if w_iters == 0 and a_iters == 0 and rounding != "gptq" else "qdiffusion"
            config = QuantConfig.from_preset(
                args.preset, fp_layers=args.fp_layers, method=method, calibration=calibration,
                reconstruction=ReconstructionConfig(weight_iters=w_iters, activation_iters=a_iters, weight_lr=lr,
                                                    loss_reduction=reduction, rounding=rounding))
            t0, c0 = time.perf_counter(), time.process_time()
            qmodel = api.quantize(model, scheduler, config, calibration=calib, progress=False)
            quantize_s = time.perf_counter() - t0
            quantize_cpu_s = time.process_time() - c0  # CPU seconds: wall time on a shared machine measures its load
            q = api.sample(qmodel, scheduler, sampler, num_samples=args.samples, seed=args.seed,
                           record_trajectory=True, progress=False)
            psnr = psnr_per_sample(q.images.clamp(-1, 1), fp.images.clamp(-1, 1)).double()
            row = {
                "preset": args.preset, "rounding": rounding if method != "naive" else "nearest",
                "fp_layers": args.fp_layers or "none", "weight_iters": w_iters, "activation_iters": a_iters,
                "weight_lr": lr,
                "loss_reduction": reduction, "quantize_cpu_s": round(quantize_cpu_s, 1),
                "psnr": float(psnr.mean()),
                "final_mse": float(per_step_mse(fp.trajectory.states, q.trajectory.states)[-1]),
                "quantize_s": round(quantize_s, 1), "threads": torch.get_num_threads(),
                "psnr_per_sample": [round(float(v), 4) for v in psnr],
            }
            row.update(paired_with_first(rows[0] if rows else row, row))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "psnr_per_sample"}), flush=True)
            atomic_write_text(json.dumps(rows, indent=2), setup.out / "results.json")  # nothing lost if interrupted
    write_rows(rows, setup.out,
               "| rounding | weight iters | act iters | rounding lr | loss | PSNR vs FP (dB) | vs first row (dB) "
               "| final MSE | quantize (s) | CPU (s) |",
               lambda r: f"| {r['rounding']} | {r['weight_iters']} | {r['activation_iters']} | {r['weight_lr']:g} | "
                         f"{r['loss_reduction']} | {r['psnr']:.2f} | "
                         f"{r['vs_first']:+.2f} ± {r['vs_first_interval']:.2f} | "
                         f"{r['final_mse']:.2e} | {r['quantize_s']:.0f} | "
                         f"{r['quantize_cpu_s']:.0f} |")


if __name__ == "__main__":
    main()
