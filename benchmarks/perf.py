"""Performance: sampling-time overhead of each correction as a ratio to the uncorrected quantized sampler, measured
in one run with interleaved repeats; fake-quant vs FP sampling time; calibration time per method.

Fake quantization is a simulation on FP hardware: the quantized sampler is *slower* than FP here, and the ratio says
nothing about deployment speed. The correction overhead ratios do carry over: they are element-wise work beside
the same network calls. Corrections are fitted on few calibration trajectories (timing does not depend on their
quality). Run:

    python benchmarks/perf.py --threads 1 [--samples 64] [--repeats 5] [--preset W4A8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from arguments import count, preset_name
from common import add_common_flags, add_setting_flag, main_run_setup, write_rows

from tadq.api import sample
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.experiments.bench.measure import HookClock, TimedHook
from tadq.experiments.rows import method_config
from tadq.utils import atomic_write_text

STACKS = {
    "PTQD": [PTQDConfig(num_samples=16)],
    "TAC (IBC + NER)": [TACConfig(num_samples=16)],
    "TCEC (delayed, history cached)": [TCECConfig(num_samples=16, select=False, mix=0.0)],
    "TAC + TCEC": [TACConfig(num_samples=16), TCECConfig(num_samples=16, select=False, mix=0.5)],
}


def _timed(denoiser, scheduler, sampler, samples: int, seed: int, hooks=()) -> float:
    t0 = time.perf_counter()
    sample(denoiser, scheduler, sampler, num_samples=samples, seed=seed, batch_size=samples, progress=False,
           hooks=hooks)
    return time.perf_counter() - t0


def _line(row: dict) -> str:
    share = "—" if row["hook_share"] is None else f"{100 * row['hook_share']:.3f} %"
    return (f"| {row['variant']} | {row['median_s']:.3f} | {row['vs_uncorrected']:.4f} | {share} | "
            f"{row['vs_fp']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=64, out="runs/bench/perf")
    add_setting_flag(parser)
    parser.add_argument("--repeats", type=count, default=5)
    parser.add_argument("--preset", type=preset_name, default="W4A8")
    parser.add_argument("--models", default="runs/main/models", help="where tadq run keeps its base models")
    args = parser.parse_args()
    out, config, model, scheduler, bases = main_run_setup(args)
    base = bases.get(method_config("qdiffusion", args.preset, config))
    variants = {"FP": (model, None, None), f"Q-Diffusion {args.preset} (no correction)": (base, None, None)}
    for name, configs in STACKS.items():  # the base network with the stack as timed hooks
        fitted = fit_corrections(base, model, scheduler, config.sampler, configs)
        variants[name] = (base, HookClock(), fitted.corrections)
    times: dict[str, list[float]] = {name: [] for name in variants}
    _timed(base, scheduler, config.sampler, args.samples, args.seed)  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes on the shared machine hit every variant alike
        for name, (denoiser, clock, stack) in variants.items():
            hooks = () if stack is None else (TimedHook(stack, clock),)
            times[name].append(_timed(denoiser, scheduler, config.sampler, args.samples, args.seed, hooks))
    reference = statistics.median(times[f"Q-Diffusion {args.preset} (no correction)"])
    fp_time = statistics.median(times["FP"])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        clock = variants[name][1]
        share = None if clock is None else clock.seconds / sum(values)  # time inside the hooks / total
        rows.append({"variant": name, "median_s": round(median, 3), "vs_uncorrected": round(median / reference, 4),
                     "vs_fp": round(median / fp_time, 3), "hook_share": share, "repeats": values})
    calibration = {}
    for timing in sorted(Path(args.models).glob("*/tadq_run_timing.json")):
        calibration[timing.parent.name] = json.loads(timing.read_text())["quantize_s"]
    atomic_write_text(json.dumps(calibration, indent=2), out / "calibration_times.json")
    write_rows(rows, out, "| variant | median s | ratio to uncorrected quantized | time inside the correction | "
               "ratio to FP |", _line)
    print(f"{args.samples} samples, DDIM 50, {args.repeats} interleaved repeats; calibration times (s): {calibration}")


if __name__ == "__main__":
    main()
