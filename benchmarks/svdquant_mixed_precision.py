"""Sensitivity-based mixed precision on the SVDQuant base of ``tadq run`` (shipped digits model, DDIM 50 η = 0).

Loads the ``svdquant`` row's base network from a ``tadq run`` models folder (built there if absent), measures
every quantized layer's sensitivity (final-image MSE vs FP with only that layer quantized, on ``--sens-samples``
samples from the calibration seed), then for each budget raises the most sensitive layers to 8 bits and samples
``--samples`` images from the evaluation seed against the FP model (docs/methods/svdquant.md). Budgets are
fractions of the extra bit-operations of raising every layer (0 = the base, 1 = every layer at 8 bits):

    python benchmarks/svdquant_mixed_precision.py --samples 256 --threads 1 --models runs/svdquant-main/models \
        --out runs/bench/svdquant-mp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from arguments import count, float_list, preset_name
from common import add_common_flags, add_setting_flag, main_run_setup, write_rows

from tadq import api
from tadq.corrections.attach import fit_corrections
from tadq.experiments.rows.recipes import recipes_for_row
from tadq.metrics import psnr_per_sample
from tadq.recipe_presets import correction_configs
from tadq.svdquant.sensitivity import (
    LayerSensitivity,
    apply_mixed_precision,
    choose_high_precision,
    layer_sensitivities,
)
from tadq.utils import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=256, out="runs/bench/svdquant-mp")
    add_setting_flag(parser)
    parser.add_argument("--models", default="runs/svdquant-main/models", help="tadq run's base-model folder")
    parser.add_argument("--preset", type=preset_name, default="W4A4")
    parser.add_argument("--sens-samples", type=count, default=8, help="samples of each sensitivity run")
    parser.add_argument("--sens-seed", type=int, default=0, help="noise seed of the sensitivity runs (calibration)")
    parser.add_argument("--budgets", type=float_list, default="0,0.1,0.25,0.5",
                        help="fractions of the all-8-bit extra bit-ops")
    parser.add_argument("--tac-budgets", type=float_list, default="",
                        help="budgets (same units) also measured with TAC fitted on top")
    parser.add_argument("--sensitivities", default="", help="reuse a sensitivities.json of an earlier run")
    args = parser.parse_args()
    if args.sensitivities and not Path(args.sensitivities).is_file():
        parser.error(f"--sensitivities {args.sensitivities}: no such file (a sensitivities.json of an earlier run)")
    out, config, model, scheduler, bases = main_run_setup(args)
    sampler = config.sampler
    base = recipes_for_row("svdquant", args.preset, config).base()
    start = time.perf_counter()
    qmodel = bases.get(base)
    if args.sensitivities:
        sensitivities = [LayerSensitivity(**s) for s in json.loads(open(args.sensitivities).read())]
    else:
        sensitivities = layer_sensitivities(qmodel, scheduler, sampler, num_samples=args.sens_samples,
                                            seed=args.sens_seed, batch_size=args.sens_samples)
    sensitivity_s = time.perf_counter() - start
    atomic_write_text(json.dumps([s.__dict__ for s in sensitivities], indent=2), out / "sensitivities.json")
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed, batch_size=args.samples,
                    progress=False).images.clamp(-1, 1)
    rows = []
    runs = [(f, False) for f in args.budgets] + [(f, True) for f in args.tac_budgets]
    for fraction, tac in runs:
        probe = choose_high_precision(qmodel, sensitivities, 10**30)
        budget = int(probe.base_bitops + fraction * (probe.all_high_bitops - probe.base_bitops))
        plan = choose_high_precision(qmodel, sensitivities, budget)
        network = apply_mixed_precision(bases.get(base), plan)  # a fresh load: raising is in place
        if tac:
            network = fit_corrections(network, model, scheduler, sampler, correction_configs(("tac",), 0))
        images = api.sample(network, scheduler, sampler, num_samples=args.samples, seed=args.seed,
                            batch_size=args.samples, progress=False).images.clamp(-1, 1)
        psnr = psnr_per_sample(images, fp)
        row = {"budget_fraction": fraction, "tac": tac, "psnr": float(psnr.mean()),
               "psnr_sem": float(psnr.std() / len(psnr) ** 0.5), "high_layers": list(plan.high_layers),
               "gemm_gbitops_per_sample": plan.bitops * sampler.num_steps / 1e9,
               "base_gbitops_per_sample": plan.base_bitops * sampler.num_steps / 1e9,
               "all_high_gbitops_per_sample": plan.all_high_bitops * sampler.num_steps / 1e9,
               "sensitivity_s": round(sensitivity_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(json.dumps(rows, indent=2), out / "results.json")
    write_rows(rows, out, "| budget (share of all-8-bit extra) | layers at 8 bits | GEMM Gbit-ops / sample "
                          "| PSNR vs FP (dB) |",
               lambda r: f"| {r['budget_fraction']:g}{' + TAC' if r.get('tac') else ''} | {len(r['high_layers'])} | "
                         f"{r['gemm_gbitops_per_sample']:.0f} | {r['psnr']:.2f} ± {r['psnr_sem']:.2f} |")


if __name__ == "__main__":
    main()
