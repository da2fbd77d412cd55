"""One shared activation range for both guidance branches vs separate ones (``QuantConfig.branch_ranges``), on the
shipped text-to-image digits model: same calibration prompts, evaluation prompts, noise and guidance for every row.

    python benchmarks/guidance_ranges.py --threads 1 --num-samples 128 --out runs/guidance_ranges.json

Prints and writes, per (method, preset, ranges): PSNR and SSIM of the decoded images vs FP from the same noise and
prompt, the share of samples the digit classifier reads as the prompted digit, and the range ratios that motivate
the option (largest conditional / unconditional Δ over the branch quantizers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, output_file, preset_names, write_report

import tadq
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig
from tadq.evaluation import quality_metrics
from tadq.experiments.workload import load_workload
from tadq.guidance_ranges import branch_quantizers
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", type=preset_names, default="W8A8,W4A8,W4A4")
    parser.add_argument("--methods", default="naive", help="naive and/or qdiffusion")
    parser.add_argument("--num-samples", type=count, default=128)
    parser.add_argument("--steps", type=count, default=50)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's (2)")
    parser.add_argument("--seed", type=int, default=1000, help="evaluation noise seed (not --calib-seed)")
    parser.add_argument("--calib-seed", type=int, default=0)
    parser.add_argument("--calib-trajectories", type=count, default=128)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/guidance_ranges.json"))
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    if args.seed == args.calib_seed:  # as tadq run refuses it: the model would be scored on its calibration noise
        parser.error(f"--seed {args.seed} is the calibration seed (--calib-seed): evaluate on other noise")
    unknown = [method for method in args.methods.split(",") if method not in ("naive", "qdiffusion")]
    if unknown:  # any other name ran naive PTQ under that label
        parser.error(f"--methods: unknown {unknown}; choose naive and/or qdiffusion")
    output_file(args.out, force_foreign=args.force_foreign)  # before any work: a user's file is not replaced
    torch.set_num_threads(args.threads)

    workload = load_workload("t2i", guidance_scale=args.guidance)
    sampler = SamplerConfig("ddim", num_steps=args.steps)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=args.calib_trajectories,
                                    num_steps_kept=min(25, args.steps),
                                    samples_per_step=min(64, args.calib_trajectories), seed=args.calib_seed)
    model, scheduler, scale = workload.model, workload.scheduler, workload.guidance_scale
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration,
                                    conditions=workload.calibration_conditions, guidance_scale=scale)

    def run(denoiser):
        result = tadq.sample(denoiser, scheduler, sampler, num_samples=args.num_samples, seed=args.seed,
                             conditions=workload.evaluation_conditions, guidance_scale=scale,
                             record_trajectory=True, progress=False)
        return workload.images(result.images), result.trajectory.states

    fp_images, fp_states = run(model)
    labels = workload.expected_labels(args.seed, args.num_samples)  # (seed, count): it took the count as the seed
    fp_accuracy = workload.features.prompted_accuracy(fp_images, labels)
    rows = [{"method": "FP", "preset": "W32A32", "ranges": "–", "prompt_accuracy": fp_accuracy}]
    print(f"FP: prompt accuracy {fp_accuracy:.3f}")
    for method in args.methods.split(","):
        for preset in args.presets.split(","):
            for separate in (False, True):
                recipe = tadq.Recipe.from_preset(
                    preset, calibration=calibration, branch_ranges=separate,
                    deployments=(tadq.Deployment(sampler, guidance_scale=scale),),
                    method=tadq.QDiffusionMethod() if method == "qdiffusion" else tadq.NaiveMethod(),
                    **({"split_shortcut": True, "quantize_attention": True} if method == "qdiffusion" else {}))
                t0 = time.perf_counter()
                qmodel = tadq.quantize(model, scheduler, recipe, calibration=calib, progress=False,
                                       conditions=workload.calibration_conditions)
                quantize_s = time.perf_counter() - t0
                images, states = run(qmodel)
                metrics = quality_metrics(images, states, fp_images, fp_states, workload.features, labels)
                row = {"method": method, "preset": preset, "ranges": "separate" if separate else "shared",
                       "psnr": metrics.psnr, "ssim": metrics.ssim, "prompt_accuracy": metrics.prompt_accuracy,
                       "agreement": metrics.agreement, "quantize_s": quantize_s}
                if separate:
                    main = branch_quantizers(qmodel.model)
                    ratios = [float(main[name].scale) / float(qmodel.branch_ranges.scale[i])
                              for i, name in enumerate(qmodel.branch_ranges.names)]
                    row["max_cond_over_uncond_scale"] = max(ratios)
                    row["min_cond_over_uncond_scale"] = min(ratios)
                rows.append(row)
                print(json.dumps(row))
    payload = {"command": "python benchmarks/guidance_ranges.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"), "guidance_scale": scale,
        "sampler": sampler.key, "rows": rows}
    write_report(payload, args.out)
    for row in rows:
        print(" | ".join(str(row.get(k, "")) for k in ("method", "preset", "ranges", "psnr", "prompt_accuracy")))


if __name__ == "__main__":
    main()
