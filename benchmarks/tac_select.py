"""TAC's held-out NER switch ablated: full TAC, IBC alone and TAC with ``select_ner`` on one saved Q-Diffusion base.

    python benchmarks/tac_select.py --models runs/tac-digits/models --out runs/tac-digits/tac_select.json
    python benchmarks/tac_select.py --model photos --models runs/tac-photos/models --num-samples 64 \
        --out runs/tac-photos/tac_select.json
    python benchmarks/tac_select.py --model dit --models runs/dit-dpm/models --sampler dpmsolver++ --steps 20 \
        --presets W4A8,W4A4 --out runs/dit-dpm/tac_select.json

Why: on the DiT at W4A4 (and on the text-to-image model at W4A4) TAC fell below its base; ``select_ner`` is off by
default until this ablation holds on more than one shipped model (docs/methods/tac.md#config). Each variant is
fitted on the base that ``tadq run`` saved (``--models``: its ``models/`` folder; the Q-Diffusion base of each
preset) of the same ``--model`` (a shipped name or a folder, as ``tadq run --model``), with the run's calibration
seed 0 and guidance, then sampled from the run's evaluation seed 1000 (and labels); PSNR vs the FP samples from the
same noise, as the main table, and the pooled MSE of those samples (``mse``, the statistic the held-out score
pools). ``select_ner`` scores NER on against NER off on held-out calibration noise (seed
100000), never on the evaluation seed. Defaults: ``tadq run``'s (digits, DDIM 50, W8A8,W4A8,W4A4). Each row records
the fit's seconds (``fit_s``, FP walks included: no trajectory cache is shared between variants) apart from the
sampling's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, evaluation_seed, output_file, preset_names, write_report

from tadq.api import load, sample
from tadq.corrections import TACConfig
from tadq.corrections.attach import fit_corrections
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.sampling import SamplerConfig

VARIANTS = {
    "base": (),
    "tac": (TACConfig(seed=0),),
    "ibc": (TACConfig(seed=0, ner=False),),
    "tac-select": (TACConfig(seed=0, select_ner=True),),
}


def base_folder(models: Path, preset: str) -> Path:
    """The Q-Diffusion base (no corrections, QDiffusionMethod) of ``preset`` among ``tadq run``'s saved models."""
    for folder in sorted(models.glob(f"qdiffusion-{preset}-*")):
        recipe = json.loads((folder / "tadq_recipe.json").read_text())
        plain = not (folder / "corrections.safetensors").exists()
        if recipe["data"]["method"]["type"] == "QDiffusionMethod" and plain:
            return folder
    raise FileNotFoundError(f"no Q-Diffusion base for {preset} under {models} (qdiffusion-{preset}-* without "
                            "corrections; --models is the models/ folder of a tadq run of the same model)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits")
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=count, default=50)
    parser.add_argument("--presets", type=preset_names, default="W8A8,W4A8,W4A4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--num-samples", type=count, default=256)
    parser.add_argument("--seed", type=evaluation_seed, default=1000)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", type=Path, required=True)
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    try:  # before the FP samples: a wrong --models used to surface after them
        folders = {preset: base_folder(args.models, preset) for preset in args.presets.split(",")}
    except FileNotFoundError as error:
        parser.error(str(error))
    output_file(args.out, force_foreign=args.force_foreign)  # before any work: a user's file is not replaced
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    sampler = SamplerConfig(kind=args.sampler, num_steps=args.steps)

    def draw(model):
        latents = sample(model, workload.scheduler, sampler, num_samples=args.num_samples, seed=args.seed,
                         batch_size=args.num_samples, conditions=workload.evaluation_conditions,
                         guidance_scale=workload.guidance_scale, progress=False).images
        return workload.images(latents)

    fp = draw(workload.model)
    results: dict = {"command": "python benchmarks/tac_select.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "rows": []}
    for preset, folder in folders.items():
        for name in names:
            base, _ = load(folder)
            t0 = time.perf_counter()
            model = base if not VARIANTS[name] else fit_corrections(
                base, workload.model, workload.scheduler, sampler, VARIANTS[name],
                conditions=workload.calibration_conditions, guidance_scale=workload.guidance_scale, progress=False)
            t1 = time.perf_counter()
            images = draw(model).clamp(-1, 1)
            psnr = float(psnr_per_sample(images, fp.clamp(-1, 1)).mean())
            mse = float((images - fp.clamp(-1, 1)).double().pow(2).mean())  # pooled, as the held-out score
            row = {"preset": preset, "variant": name, "psnr": round(psnr, 2), "mse": float(f"{mse:.3e}"),
                   "fit_s": round(t1 - t0, 1), "sample_s": round(time.perf_counter() - t1, 1)}
            member = model.corrections[-1] if len(model.corrections) else None
            if member is not None and getattr(member, "selection_records", None):
                row["selection"] = member.selection_records
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    write_report(results, args.out)


if __name__ == "__main__":
    main()
