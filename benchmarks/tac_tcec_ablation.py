"""Ablation of TAC's and TCEC's reconstructed choices on the shipped model (docs/methods/tac.md and tcec.md, [RECON]).

Every variant is fitted on calibration noise (seed 0; TCEC scores its (a, κ) candidates on seed 100000) on top of
the same Q-Diffusion base model and sampled from the evaluation noise (seed 1000) beside FP. The base models are
the ones ``tadq run`` keeps in ``runs/main/models`` (built there if missing). Run:

    python benchmarks/tac_tcec_ablation.py --threads 1 [--presets W4A4,W4A8] [--samples 256] [--variants ...]
"""

from __future__ import annotations

import argparse
import time

from arguments import preset_names
from common import add_common_flags, add_setting_flag, main_run_setup, write_rows

from tadq.api import sample
from tadq.corrections import CorrectionStack, FitContext, TACConfig, TCECConfig, fit_stack
from tadq.corrections.ptqd.experiment import as_denoiser, with_corrections
from tadq.experiments.rows import method_config
from tadq.metrics import per_step_mse, psnr_per_sample
from tadq.registry import correction_for
from tadq.sampling import SamplingPlan

# Every field that was ever a default is spelled out, so a name keeps meaning the same configuration.
CH, FULL = {"ibc_resolution": "channel"}, {"ibc_resolution": "full"}
NER_CH = {"ner_resolution": "channel", "offset": False}
# TCEC as the paper describes it (channel-wise K, every step, a and κ chosen) and the per-element error model
PAPER = {"resolution": "channel", "offset": False, "start_candidates": (0.0,), "include_off": False,
         "error_space": "eps", "target": "same_input"}
FULL_OFFSET = {"resolution": "full", "offset": True, "error_space": "eps", "target": "same_input"}
VARIANTS = {
    "base": [],
    "IBC (channel)": [TACConfig(ner=False, **CH)],
    "IBC (channel, input only)": [TACConfig(ner=False, ibc_apply="input", **CH)],
    "IBC (full resolution)": [TACConfig(ner=False, **FULL)],
    "NER fp-traj λ=0.5": [TACConfig(ibc=False, ner_target="fp_trajectory", relative_weight=0.5, **NER_CH)],
    "NER fp-traj λ=0": [TACConfig(ibc=False, ner_target="fp_trajectory", relative_weight=0.0, **NER_CH)],
    "NER same-input λ=0.5": [TACConfig(ibc=False, ner_target="same_input", relative_weight=0.5, **NER_CH)],
    "NER same-input λ=0": [TACConfig(ibc=False, ner_target="same_input", relative_weight=0.0, **NER_CH)],
    "NER full same-input λ=0 +offset": [TACConfig(ibc=False, ner_target="same_input", relative_weight=0.0,
                                                  ner_resolution="full", offset=True)],
    "TAC full (IBC full + NER full same-input λ=0 +offset)": [
        TACConfig(ner_target="same_input", relative_weight=0.0, ner_resolution="full", offset=True, **FULL)],
    "TAC (IBC full + NER same-input λ=0)": [TACConfig(ner_target="same_input", relative_weight=0.0, **NER_CH,
                                                      **FULL)],
    "TCEC (select a and κ)": [TCECConfig(**PAPER)],
    "TCEC on-target error model (select a and κ)": [TCECConfig(error_model="on_target", **PAPER)],
    "TCEC immediate": [TCECConfig(select=False, **PAPER)],
    "TCEC delayed": [TCECConfig(select=False, mix=0.0, **PAPER)],
    "TCEC full+offset immediate from 0": [TCECConfig(select=False, start=0.0, **FULL_OFFSET)],
    "TCEC full+offset immediate from 0.25": [TCECConfig(select=False, start=0.25, **FULL_OFFSET)],
    "TCEC full+offset immediate from 0.5": [TCECConfig(select=False, start=0.5, **FULL_OFFSET)],
    "TCEC full+offset immediate from 0.75": [TCECConfig(select=False, start=0.75, **FULL_OFFSET)],
    "TCEC channel+offset immediate from 0.5": [TCECConfig(select=False, start=0.5, resolution="channel",
                                                          offset=True, error_space="eps", target="same_input")],
    "TCEC full+offset state-space immediate from 0": [TCECConfig(select=False, start=0.0,
                                                                 **{**FULL_OFFSET, "error_space": "state"})],
    "TCEC full+offset next-state immediate from 0": [TCECConfig(select=False, start=0.0,
                                                                **{**FULL_OFFSET, "target": "next_state"})],
    "TCEC default (select a κ start; full+offset)": [TCECConfig(**FULL_OFFSET, start_candidates=(0.0, 0.25, 0.5, 0.75),
                                                          include_off=True)],
    "TAC + TCEC (paper-form TCEC)": [TACConfig(), TCECConfig(**PAPER)],
    "TAC + TCEC default": [TACConfig(), TCECConfig(**FULL_OFFSET, start_candidates=(0.0, 0.25, 0.5, 0.75),
                                                   include_off=True)],
    "TAC + TCEC default 128 held-out": [TACConfig(), TCECConfig(**FULL_OFFSET, start_candidates=(0.0, 0.25, 0.5, 0.75),
                                                                include_off=True, selection_samples=128)],
    "TCEC default 128 held-out": [TCECConfig(**FULL_OFFSET, start_candidates=(0.0, 0.25, 0.5, 0.75), include_off=True,
                                             selection_samples=128)],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=256, out="runs/bench/tac_tcec")
    add_setting_flag(parser)
    parser.add_argument("--presets", type=preset_names, default="W4A4,W4A8")
    parser.add_argument("--variants", default=None, help="comma-separated names of VARIANTS (names without commas)")
    parser.add_argument("--variant", action="append", default=[], help="one name of VARIANTS (repeatable; any name)")
    parser.add_argument("--models", default="runs/main/models", help="where tadq run keeps its base models")
    args = parser.parse_args()
    names = [*(args.variants.split(",") if args.variants else []), *args.variant] or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    out, config, model, scheduler, bases = main_run_setup(args)
    fp = sample(model, scheduler, config.sampler, num_samples=args.samples, seed=args.seed, record_trajectory=True,
                progress=False)
    rows = []
    for preset_name in args.presets.split(","):
        base = bases.get(method_config("qdiffusion", preset_name, config))
        for name in names:
            stack = CorrectionStack([correction_for(c) for c in VARIANTS[name]])
            t0 = time.perf_counter()
            fit_stack(stack, FitContext.of(as_denoiser(model), base, SamplingPlan.build(scheduler, config.sampler)))
            fit_s = time.perf_counter() - t0
            denoiser = with_corrections(base, stack)
            result = sample(denoiser, scheduler, config.sampler, num_samples=args.samples, seed=args.seed,
                            record_trajectory=True, progress=False)
            psnr = float(psnr_per_sample(result.images.clamp(-1, 1), fp.images.clamp(-1, 1)).mean())
            final = float(per_step_mse(fp.trajectory.states, result.trajectory.states)[-1])
            chosen = [getattr(m, "selection_records", None) for m in stack]
            row = {"preset": preset_name, "variant": name, "psnr": round(psnr, 2), "final_mse": final,
                   "fit_s": round(fit_s, 1), "selection": chosen}
            print(row, flush=True)
            rows.append(row)
            write_rows(rows, out, "| preset | variant | PSNR vs FP (dB) | final MSE | fit s |",
                       lambda r: f"| {r['preset']} | {r['variant']} | {r['psnr']:.2f} | {r['final_mse']:.2e} | "
                                 f"{r['fit_s']:.0f} |")


if __name__ == "__main__":
    main()
