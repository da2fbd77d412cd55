"""Does the held-out selection score what the sampler does, and is its noise like the evaluation's?

For the Q-Diffusion base and the base + TAC (default config, fitted on calibration seed 0), prints the mean final
x_0 MSE against FP on the first N trajectories of each seed, computed twice: by the selection's paired walk
(``tadq.corrections.sequential.paired_final_error``) and by the sampler (``tadq.sample``). The two must agree; the
seeds show how far a mean over N trajectories moves between noise draws, with the median per trajectory and the
share of the mean that the 5 worst trajectories carry. Run:

    python benchmarks/selection_check.py --threads 1 [--preset W4A8] [--samples 128] [--seeds 1000,100000]
"""

from __future__ import annotations

import argparse

from arguments import int_list, preset_name
from common import add_common_flags, add_setting_flag, main_run_setup, write_rows

from tadq.api import sample
from tadq.corrections import CorrectionStack, TACConfig, fit_stack
from tadq.corrections.context import FitContext
from tadq.corrections.ptqd.experiment import as_denoiser, with_corrections
from tadq.corrections.sequential import paired_final_error
from tadq.experiments.rows import method_config
from tadq.metrics import per_step_mse
from tadq.registry import correction_for
from tadq.sampling import SamplingPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=128, out="runs/bench/selection_check")
    add_setting_flag(parser)
    parser.add_argument("--preset", type=preset_name, default="W4A8")
    parser.add_argument("--seeds", type=int_list, default="1000,100000",
                        help="evaluation seed, held-out selection seed, ...")
    parser.add_argument("--models", default="runs/main/models", help="where tadq run keeps its base models")
    args = parser.parse_args()
    out, config, model, scheduler, bases = main_run_setup(args)
    base = bases.get(method_config("qdiffusion", args.preset, config))
    fp = as_denoiser(model)
    tac = CorrectionStack([correction_for(TACConfig())])
    ctx = FitContext.of(fp, base, SamplingPlan.build(scheduler, config.sampler))
    fit_stack(tac, ctx)
    rows = []
    for seed in args.seeds:
        reference = sample(model, scheduler, config.sampler, num_samples=args.samples, seed=seed,
                           record_trajectory=True, progress=False)
        for name, hooks, denoiser in (("Q-Diffusion", (), base), ("+ TAC", tuple(tac), with_corrections(base, tac))):
            walk = paired_final_error(ctx, hooks, num_samples=args.samples, seed=seed)
            result = sample(denoiser, scheduler, config.sampler, num_samples=args.samples, seed=seed,
                            record_trajectory=True, progress=False)
            sampled = float(per_step_mse(reference.trajectory.states, result.trajectory.states)[-1])
            per_trajectory = (result.trajectory.states[-1].double() - reference.trajectory.states[-1].double())
            per_trajectory = per_trajectory.square().flatten(1).mean(1).sort(descending=True).values
            rows.append({"seed": seed, "row": name, "walk": walk, "sampler": sampled,
                         "median": float(per_trajectory.median()),
                         "top5_share": float(per_trajectory[:5].sum() / per_trajectory.sum())})
            print(rows[-1], flush=True)
    write_rows(rows, out, f"| seed | {args.preset} row | final MSE, selection walk | final MSE, sampler | median "
                          "per trajectory | share of the 5 worst |",
               lambda r: f"| {r['seed']} | {r['row']} | {r['walk']:.5f} | {r['sampler']:.5f} | {r['median']:.5f} | "
                         f"{r['top5_share']:.0%} |")


if __name__ == "__main__":
    main()
