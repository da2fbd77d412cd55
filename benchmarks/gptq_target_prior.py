"""Which way the ridge of GPTQ's FP-output target W* shrinks (``gptq_target_prior``), over the calibration size.

Why: W* = W E[x x̂ᵀ] (E[x̂ x̂ᵀ] + λ·mean diag·I)⁻¹ shrinks W toward zero along the input directions the calibration
inputs barely cover. On the shipped DiT with 16 calibration trajectories (DPM-Solver++ 20, guidance 1.5) that cost
the Q-Diffusion W8A8 base 7 dB against naive PTQ; the unit-loss guard that keeps nearest rounding sees only the
calibration inputs, so it cannot see what the shrinkage does to inputs outside them. Shrinking toward W instead
(``gptq_target_prior="weight"``: W* = (W E[x x̂ᵀ] + λ·mean diag·W)(E[x̂ x̂ᵀ] + λ·mean diag·I)⁻¹) leaves W where
the data say nothing and is W itself when there is no drift to undo.

Each ``--rows`` entry is ``name:field=value,...`` over ``ReconstructionConfig`` (``name:`` alone: the defaults);
``naive`` is naive PTQ. Every row is ``tadq run``'s Q-Diffusion base (split shortcuts, quantized attention, first
and last layers in float) without corrections, calibrated as ``tadq run --calib-trajectories N`` (seed 0, the
model's guidance), sampled from seed 1000 (decoded for a latent model); PSNR vs FP from the same noise and labels.
``--calibration-seed`` draws the calibration trajectories from another seed (never the evaluation's, 1000). Every row
of a (calibration, preset) is sampled from the same noise, so it is also compared with that cell's ``--paired-with``
row sample by sample: ``difference`` is the mean of its per-sample PSNR minus the reference's and ``interval`` its
95 % interval (1.96 standard errors; ``tadq.experiments.tfmq_measure.paired_difference``), far tighter than the
spread of either mean. That interval holds the evaluation noise only: a row's ``seed=`` (which calibration inputs
form GPTQ's Hessians) draws another rounding, which moved the digits' W4A8 PSNR by up to 1.45 dB, so compare
settings over several calibration and reconstruction seeds (docs/methods/qdiffusion.md, "The digits' W4A8 gap is a
rounding draw"). One JSON line per row, all of them in ``--out`` (with the per-sample PSNRs). Run (one
thread)::

    python benchmarks/gptq_target_prior.py --model dit --sampler dpmsolver++ --steps 20 \\
        --trajectory-counts 16,64,256 --presets W8A8,W4A8 --num-samples 64 \\
        --rows "naive;zero:gptq_target_prior=zero;weight:" --out runs/gptq_target_prior/dit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from arguments import (
    add_force_foreign_flag,
    count,
    count_list,
    model_name,
    output_file,
    preset_names,
    seed_apart_from,
    write_report,
)
from common import evaluation_images, unit_summary

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, ReconstructionConfig, fp_layer_roles
from tadq.experiments.tfmq_measure import paired_difference
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

EVALUATION_SEED = 1000

def _value(current, text: str):
    """``text`` as the type of a field whose default is ``current`` (``None``: a number, or None)."""
    if text == "None":
        return None
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, str):
        return text
    return float(text) if current is None else type(current)(text)


def parse_rows(text: str) -> list[tuple[str, ReconstructionConfig | None]]:
    """``"naive;zero:gptq_target_prior=zero"`` → (name, config) pairs; ``None`` for naive PTQ. An unknown field or
    a value the field refuses is a usage error (it was a traceback)."""
    rows: list[tuple[str, ReconstructionConfig | None]] = []
    base = ReconstructionConfig()
    fields = {field.name for field in dataclasses.fields(base)}
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, assignments = entry.partition(":")
        if name == "naive":
            rows.append((name, None))
            continue
        overrides: dict = {}
        for item in filter(None, (a.strip() for a in assignments.split(","))):
            field, _, value = item.partition("=")
            if field not in fields:
                raise argparse.ArgumentTypeError(f"row {entry!r}: {field!r} is not a ReconstructionConfig field")
            try:
                overrides[field] = _value(getattr(base, field), value)
            except ValueError as error:
                raise argparse.ArgumentTypeError(f"row {entry!r}: {field}={value!r}: {error}") from None
        try:
            rows.append((name, dataclasses.replace(base, **overrides)))
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(f"row {entry!r}: {error}") from None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=model_name, default="digits")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=count, default=50)
    parser.add_argument("--trajectory-counts", type=count_list, default=[16, 64, 256])
    parser.add_argument("--presets", type=preset_names, default="W8A8,W4A8")
    parser.add_argument("--rows", type=parse_rows, default="naive;zero:gptq_target_prior=zero;weight:")
    parser.add_argument("--num-samples", type=count, default=64)
    parser.add_argument("--calibration-seed", type=seed_apart_from(EVALUATION_SEED, "--calibration-seed"), default=0,
                        help="noise seed of the calibration trajectories (tadq run's --calib-seed; default 0)")
    parser.add_argument("--paired-with", metavar="ROW",
                        help="the row each other row of its cell is compared with per sample (default: zero, where "
                             "--rows has it)")
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--cache-dir", default=".cache/tadq")
    parser.add_argument("--out", type=Path, required=True)
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    rows = args.rows  # a bad field or value was refused while parsing, before any work
    names = [name for name, _ in rows]
    if args.paired_with is not None and args.paired_with not in names:
        parser.error(f"--paired-with {args.paired_with!r} names no row of --rows ({', '.join(names)})")
    reference = args.paired_with or ("zero" if "zero" in names else None)
    output_file(args.out, force_foreign=args.force_foreign)
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    sampler = SamplerConfig(kind=args.sampler, num_steps=args.steps)

    def draw(model) -> torch.Tensor:
        return evaluation_images(workload, model, sampler, args.num_samples, seed=EVALUATION_SEED,
                                 batch_size=args.num_samples)

    fp = draw(workload.model)
    # the command as given (the parsed flags printed lists and row tuples, which no shell could run again)
    results: dict = {"command": shlex.join(["python", "benchmarks/gptq_target_prior.py", *sys.argv[1:]]),
                     "rows": []}
    for trajectories in args.trajectory_counts:
        calibration = CalibrationConfig(sampler=sampler, num_trajectories=trajectories,  # as tadq run builds it
                                        num_steps_kept=min(25, args.steps), seed=args.calibration_seed,
                                        samples_per_step=min(64, trajectories))
        data = collect_calibration_set(workload.model, adapter_for(workload.model), workload.scheduler.config,
                                       calibration, cache_dir=args.cache_dir, progress=False,
                                       conditions=workload.calibration_conditions,
                                       guidance_scale=workload.guidance_scale)
        for preset in args.presets.split(","):
            scores: dict[str, torch.Tensor] = {}  # this cell's per-sample PSNRs, by row
            for name, reconstruction in rows:
                fields = {"calibration": calibration, "keep_fp_roles": fp_layer_roles("first_last"),
                          "deployments": (Deployment(sampler, workload.guidance_scale),)}
                recipe = Recipe.from_preset(preset, method=NaiveMethod(), **fields) if reconstruction is None \
                    else Recipe.from_preset(preset, method=QDiffusionMethod(reconstruction), split_shortcut=True,
                                            quantize_attention=True, **fields)
                start = time.process_time()
                qmodel = api.quantize(workload.model, workload.scheduler, recipe, calibration=data,
                                      conditions=workload.calibration_conditions, progress=False)
                scores[name] = psnr_per_sample(draw(qmodel), fp).double()
                row = {"model": args.model, "trajectories": trajectories, "calibration_seed": args.calibration_seed,
                       "calibration_inputs": len(data), "preset": preset, "row": name,
                       "quantize_cpu_s": round(time.process_time() - start, 1),
                       "psnr": round(float(scores[name].mean()), 2), **unit_summary(qmodel)}
                if name != reference and reference in scores:
                    difference, interval = paired_difference(scores[name], scores[reference])
                    row.update(paired_with=reference, difference=round(difference, 3),
                               interval=round(interval, 3))
                print(json.dumps(row), flush=True)
                results["rows"].append({**row, "psnr_per_sample": [round(v, 3) for v in scores[name].tolist()]})
    write_report(results, args.out)


if __name__ == "__main__":
    main()
