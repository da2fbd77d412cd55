"""Block reconstruction on both shipped pixel models at a reduced budget: ablation, per-unit report, unit sensitivity.

Why: the reconstruction defaults were chosen on the 1-channel digits and buy little on natural images
(issue 19). This script runs the same settings on the digits and the photos model from the same seeds, so one
default can be chosen for both, and writes the per-unit reconstruction records (loss before/after, guard
rejections, how far the rounding moved) next to the PSNR. Run (one thread, a few minutes per configuration):

    python benchmarks/recon_diagnose.py --model photos --configs "base:;lr1e-3:weight_lr=1e-3" --threads 1
    python benchmarks/recon_diagnose.py --model digits --sensitivity --threads 1

``--configs`` is ``name:field=value,field=value;...`` over ``ReconstructionConfig`` fields (``name:`` alone is the
reduced-budget base). The photos model is sampled and calibrated unconditionally (every sample gets the null
label 8).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import json
import pstats
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, count_or_zero, evaluation_seed, output_folder, preset_name

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.calibration.reconstruction import write_unit_report
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.metrics import psnr_per_sample
from tadq.models import load_pipeline_parts
from tadq.quant.quantizer import Quantizer
from tadq.registry import adapter_for
from tadq.sampling import ClassLabels, SamplerConfig
from tadq.utils import atomic_write_text

MODELS = {"digits": None, "photos": "src/tadq/zoo/weights/photos-ddpm"}
PHOTOS_NULL_LABEL = 8


def parse_configs(text: str, base: ReconstructionConfig) -> list[tuple[str, ReconstructionConfig]]:
    """``"a:weight_lr=1e-3,objective=output;b:"`` → named configs derived from ``base`` (types follow the field)."""
    configs = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, _, assignments = entry.partition(":")
        overrides = {}
        for item in filter(None, (a.strip() for a in assignments.split(","))):
            field, _, value = item.partition("=")
            current = getattr(base, field)
            overrides[field] = (value.lower() in ("1", "true", "yes")) if isinstance(current, bool) \
                else type(current)(value)
        configs.append((name, dataclasses.replace(base, **overrides)))
    return configs


def unconditional(model: torch.nn.Module, count: int) -> ClassLabels | None:
    """Null-label conditions for a class-conditional model (``None`` for an unconditional one)."""
    if getattr(model, "class_embedding", None) is None:
        return None
    return ClassLabels((PHOTOS_NULL_LABEL,) * count)


def unit_sensitivity(qmodel, fp_images: torch.Tensor, scheduler, sampler: SamplerConfig, args,
                     conditions) -> list[dict]:
    """PSNR vs FP when only one unit is (naively) quantized: which units carry the final error."""
    quantizers = {name: m for name, m in qmodel.model.named_modules() if isinstance(m, Quantizer) and m.enabled}
    rows = []
    for unit in qmodel.adapter.blocks(qmodel.model):
        inside = [n for n in quantizers if n.startswith(unit + ".")]
        if not inside:
            continue
        for name, quantizer in quantizers.items():
            quantizer.bypass = name not in inside
        out = api.sample(qmodel, scheduler, sampler, num_samples=args.samples, seed=args.seed, progress=False,
                         conditions=conditions)
        psnr = float(psnr_per_sample(out.images.clamp(-1, 1), fp_images.clamp(-1, 1)).mean())
        params = sum(p.numel() for p in qmodel.model.get_submodule(unit).parameters())
        rows.append({"unit": unit, "psnr": psnr, "params": params})
        print(json.dumps(rows[-1]), flush=True)
    for quantizer in quantizers.values():
        quantizer.bypass = False
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="digits")
    parser.add_argument("--preset", type=preset_name, default="W4A8")
    parser.add_argument("--steps", type=count, default=20, help="DDIM steps (deployment and calibration)")
    parser.add_argument("--samples", type=count, default=32)
    parser.add_argument("--seed", type=evaluation_seed, default=1000, help="evaluation noise seed")
    parser.add_argument("--trajectories", type=count, default=64)
    parser.add_argument("--kept", type=count, default=10, help="calibration steps kept")
    parser.add_argument("--per-step", type=count, default=32, help="calibration inputs per kept step")
    parser.add_argument("--weight-iters", type=count_or_zero, default=200)
    parser.add_argument("--activation-iters", type=count_or_zero, default=80)
    parser.add_argument("--configs", default="base:")
    parser.add_argument("--sensitivity", action="store_true", help="also quantize one unit at a time (naive)")
    parser.add_argument("--profile", action="store_true", help="cProfile the first configuration's quantize")
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", default="runs/recon_diagnose")
    add_force_foreign_flag(parser)
    args = parser.parse_args()
    # the diagnosis' base is AdaRound at the reduced budget (the docs' "base:" rows); GPTQ is a --configs entry
    base = ReconstructionConfig(weight_iters=args.weight_iters, activation_iters=args.activation_iters,
                                rounding="adaround")
    try:  # before the calibration data, the FP samples and the naive row (a typo failed after all three)
        configs = parse_configs(args.configs, base)
    except (AttributeError, TypeError, ValueError) as error:
        parser.error(f"--configs {args.configs!r}: {error}")
    torch.set_num_threads(args.threads)
    out = output_folder(Path(args.out) / args.model, force_foreign=args.force_foreign)

    model, scheduler = load_pipeline_parts(MODELS[args.model])
    sampler = SamplerConfig(kind="ddim", num_steps=args.steps)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=args.trajectories, num_steps_kept=args.kept,
                                    samples_per_step=args.per_step)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration,
                                    cache_dir=".cache/tadq", progress=False,
                                    conditions=unconditional(model, args.trajectories))
    conditions = unconditional(model, args.samples)
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed, progress=False,
                    conditions=conditions)
    params = sum(p.numel() for p in model.parameters())
    pixels = int(torch.tensor(calib.x.shape[2:]).prod())
    rows = []
    naive = api.quantize(model, scheduler, QuantConfig.from_preset(args.preset, calibration=calibration),
                         calibration=calib, progress=False)
    q = api.sample(naive, scheduler, sampler, num_samples=args.samples, seed=args.seed, progress=False,
                   conditions=conditions)
    naive_psnr = float(psnr_per_sample(q.images.clamp(-1, 1), fp.images.clamp(-1, 1)).mean())
    rows.append({"model": args.model, "config": "naive", "psnr": naive_psnr})
    print(json.dumps(rows[-1]), flush=True)
    if args.sensitivity:
        sens = unit_sensitivity(naive, fp.images, scheduler, sampler, args, conditions)
        atomic_write_text(json.dumps(sens, indent=2), out / f"sensitivity-{args.preset}.json")
    for index, (name, recon) in enumerate(configs):
        config = QuantConfig.from_preset(args.preset, method="qdiffusion", calibration=calibration,
                                         reconstruction=recon)
        profiler = cProfile.Profile() if args.profile and index == 0 else None
        t0, c0 = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        qmodel = api.quantize(model, scheduler, config, calibration=calib, progress=False)
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(str(out / f"profile-{name}.prof"))
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        quantize_s = time.perf_counter() - t0
        quantize_cpu_s = time.process_time() - c0  # CPU time: the wall time on a shared machine measures its load
        q = api.sample(qmodel, scheduler, sampler, num_samples=args.samples, seed=args.seed, progress=False,
                       conditions=conditions)
        reports = qmodel.reconstruction_report
        units = len({r.unit for r in reports})
        row = {
            "model": args.model, "config": name, "settings": dataclasses.asdict(recon),
            "psnr": float(psnr_per_sample(q.images.clamp(-1, 1), fp.images.clamp(-1, 1)).mean()),
            "quantize_s": round(quantize_s, 1), "quantize_cpu_s": round(quantize_cpu_s, 1), "units": units,
            "calib_inputs": len(calib),
            "cpu_s_per_unit": round(quantize_cpu_s / max(units, 1), 2),
            "cpu_s_per_mparam_pixel": round(quantize_cpu_s / (params / 1e6 * pixels), 4),
            "weight_guard_rejects": sum(r.guard_rejected for r in reports if r.phase == "weights"),
            "activation_guard_rejects": sum(r.guard_rejected for r in reports if r.phase == "activations"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_unit_report(reports, out / f"units-{args.preset}-{name}.json")
        atomic_write_text(json.dumps(rows, indent=2), out / f"results-{args.preset}.json")
    atomic_write_text(json.dumps(rows, indent=2), out / f"results-{args.preset}.json")


if __name__ == "__main__":
    main()
