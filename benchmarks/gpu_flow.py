"""The whole flow on CUDA: quantize (recipe, corrections fitted) → save → sample → evaluate → sample-sharded.

    python benchmarks/gpu_flow.py --recipe recipes/qdiffusion+tac-W4A8.json --samples 1000 --out runs/gpu_flow
    python benchmarks/gpu_flow.py --quick          # tiny budgets: checks that every step runs on the GPU

It refuses to start without CUDA (``tadq.device.resolve_device`` names what is missing). Every step after
``tadq.quantize`` runs through the command line (``tadq sample``, ``tadq evaluate``, and ``torchrun ... tadq
sample-sharded``), each in its own process, so the artefact is also checked to load elsewhere. Writes
``<out>/gpu_flow.json`` (timings, devices, the evaluate metrics) and prints a Markdown table.

Status: it has NOT run on a GPU yet, so no figure from it is in the README. A CPU dry run (this file with the CUDA
check and CUDA calls stubbed out, ``--quick --device cpu --samples 64``) ran every step end to end after fixing the
order of the ``--quick`` overrides, which had refused to start; benchmarks/gpu_check.sh runs it on the next GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, output_folder

from tadq.device import resolve_device, resolve_dtype
from tadq.fsguard import check_output_dir
from tadq.utils import atomic_write_text


def _run(command: list[str], timings: dict[str, float], name: str) -> None:
    print("$", " ".join(command), flush=True)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    timings[name] = round(time.perf_counter() - t0, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/qdiffusion+tac-W4A8.json", help="recipe of the artefact")
    parser.add_argument("--model", default=None, help="diffusers model folder (default: the shipped DDPM)")
    parser.add_argument("--device", default="cuda", help="cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="compute dtype of the FP model")
    parser.add_argument("--samples", type=count, default=1000, help="samples for evaluate and sample-sharded")
    parser.add_argument("--procs", type=count, default=max(1, torch.cuda.device_count()), help="torchrun processes")
    parser.add_argument("--quick", action="store_true", help="tiny calibration/reconstruction/fit budgets")
    parser.add_argument("--out", default="runs/gpu_flow")
    add_force_foreign_flag(parser)
    args = parser.parse_args()

    try:  # no CUDA: a ValueError naming the device, before any work (a usage error, not a traceback)
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except ValueError as error:
        parser.error(str(error))
    if device.type != "cuda":
        parser.error(f"gpu_flow measures the CUDA path; --device {args.device} is not a CUDA device")
    torchrun = shutil.which("torchrun")  # the last step needs it: refused now, not after quantize and evaluate
    if torchrun is None:
        parser.error("torchrun is not on PATH; install torch's launcher to run the sharded step")

    import tadq
    from tadq.models import load_pipeline_parts
    from tadq.recipe import load_recipe, override_recipe

    recipe = load_recipe(args.recipe)
    if args.quick:
        # samples_per_step first: each override is validated on its own, and 64 per step > 32 trajectories
        changes = {"calibration.samples_per_step": 16, "calibration.num_trajectories": 32}
        if hasattr(recipe.method, "reconstruction") and type(recipe.method).__name__ != "NaiveMethod":
            changes |= {"method.reconstruction.weight_iters": 20, "method.reconstruction.activation_iters": 10}
        changes |= {f"corrections.{i}.num_samples": 32 for i in range(len(recipe.corrections))}
        recipe = override_recipe(recipe, changes)
    out = Path(args.out)
    artefact = out / "artefact"
    try:  # an earlier run's artefact is replaced; a folder tadq did not write is refused before any work, not deleted
        check_output_dir(artefact, kind="artefact", what="--out's artefact folder", overwrite=True)
    except ValueError as error:
        parser.error(str(error))
    output_folder(out, force_foreign=args.force_foreign)
    timings: dict[str, float] = {}

    model, scheduler = load_pipeline_parts(args.model)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    qmodel = tadq.quantize(model, scheduler, recipe, device=device, dtype=dtype, cache_dir=out / "cache")
    torch.cuda.synchronize(device)
    timings["quantize_s"] = round(time.perf_counter() - t0, 2)
    qmodel.to("cpu").save_pretrained(artefact, scheduler, overwrite=True)
    del qmodel
    torch.cuda.empty_cache()

    cli = [sys.executable, "-m", "tadq.cli"]
    steps = ["--sampler", recipe.sampler.kind, "--steps", str(recipe.sampler.num_steps), "--eta",
             str(recipe.sampler.eta)]
    _run([*cli, "sample", str(artefact), "--num-samples", "64", "--device", args.device, "--out",
          str(out / "samples.png")], timings, "sample_64_s")
    reference = ["--reference", args.model] if args.model else []
    _run([*cli, "evaluate", str(artefact), *reference, "--num-samples", str(args.samples), "--device", args.device,
          "--dtype", args.dtype, "--out", str(out / "evaluate")], timings, "evaluate_s")
    sharded = out / "sharded"
    env_note = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    _run([torchrun, "--standalone", f"--nproc-per-node={args.procs}", "-m", "tadq.cli", "sample-sharded",
          str(artefact), *steps, "--num-samples", str(args.samples), "--out-dir", str(sharded), "--device", "auto"],
         timings, "sample_sharded_s")

    metrics = json.loads((out / "evaluate" / "results.json").read_text())["rows"]
    report = {"recipe": recipe.name or args.recipe, "quick": args.quick, "device": torch.cuda.get_device_name(device),
              "visible_devices": env_note, "procs": args.procs, "dtype": args.dtype, "samples": args.samples,
              "timings": timings, "evaluate_rows": metrics, "recipe_json": dataclasses.asdict(recipe)}
    atomic_write_text(json.dumps(report, indent=2, default=str) + "\n", out / "gpu_flow.json")
    print("| step | seconds |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in timings.items()))
    for row in metrics:
        print(row)


if __name__ == "__main__":
    main()
