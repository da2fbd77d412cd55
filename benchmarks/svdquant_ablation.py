"""W4A4 ablation of activation granularity, smoothing, the low-rank branch and Hadamard rotation (SVDQuant).

Every row quantizes the shipped digits model at 4-bit per-channel weights and 4-bit activations, samples DDIM 50
(η = 0) from the same evaluation noise as the FP model and reports PSNR vs FP, the cost (bit-operations with the
branch, artefact bytes) and the quantization time; every artefact is saved, reloaded and checked bit-identical on
a probe batch. Run (single-threaded, as in docs/methods/svdquant.md):

    python benchmarks/svdquant_ablation.py --samples 64 --threads 1 --out runs/bench/svdquant
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter

import torch
from common import add_common_flags, shipped_setup, write_rows

import tadq
from tadq import api
from tadq.metrics import psnr_per_sample
from tadq.quant import QScheme
from tadq.recipe import Deployment, NaiveMethod, Recipe
from tadq.svdquant import SVDQuantMethod
from tadq.svdquant.cost import cost_summary
from tadq.utils import atomic_write_text

# label → (method, activation granularity, group size, smoothing, rotation, rank[, activation bits])
ROWS: dict[str, tuple] = {
    "naive per-tensor (static)": ("naive", "per_tensor", 64, False, "none", 0),
    "naive per-token": ("naive", "per_token", 64, False, "none", 0),
    "naive per-group g=16": ("naive", "per_group", 16, False, "none", 0),
    "naive per-group g=16 + rotation": ("naive", "per_group", 16, False, "hadamard", 0),
    "smoothing only per-group g=16": ("svdquant", "per_group", 16, True, "none", 0),
    "smoothing only per-token": ("svdquant", "per_token", 64, True, "none", 0),
    "smoothing only per-tensor (static)": ("svdquant", "per_tensor", 64, True, "none", 0),
    "SVDQuant r=2 per-group g=16": ("svdquant", "per_group", 16, True, "none", 2),
    "SVDQuant r=4 per-group g=16": ("svdquant", "per_group", 16, True, "none", 4),
    "SVDQuant r=4 per-group g=8": ("svdquant", "per_group", 8, True, "none", 4),
    "SVDQuant r=4 per-token": ("svdquant", "per_token", 64, True, "none", 4),
    "SVDQuant r=4 W4A16": ("svdquant", "per_tensor", 64, True, "none", 4, None),
    "SVDQuant r=8 per-group g=16": ("svdquant", "per_group", 16, True, "none", 8),
    "SVDQuant r=16 per-group g=16": ("svdquant", "per_group", 16, True, "none", 16),
    "SVDQuant r=16 per-group g=16 + rotation": ("svdquant", "per_group", 16, True, "hadamard", 16),
    "SVDQuant r=16 per-token": ("svdquant", "per_token", 64, True, "none", 16),
    "SVDQuant r=16 per-tensor (static)": ("svdquant", "per_tensor", 64, True, "none", 16),
    "low-rank only r=16 per-group g=16": ("svdquant", "per_group", 16, False, "none", 16),
    "naive W4A16 (weights only)": ("naive", "per_tensor", 64, False, "none", 0, None),
    "naive W4A16 + rotation": ("naive", "per_tensor", 64, False, "hadamard", 0, None),
    "SVDQuant r=16 W4A16": ("svdquant", "per_tensor", 64, True, "none", 16, None),
}


def recipe_for(label: str, setup) -> Recipe:
    method, granularity, group, smoothing, rotation, rank, *bits = ROWS[label]
    weights = QScheme(bits=4, granularity="per_channel", lowrank_rank=rank)
    activations = QScheme(bits=bits[0] if bits else 4, granularity=granularity, group_size=group,
                          smoothing=smoothing, rotation=rotation)
    return Recipe(method=SVDQuantMethod() if method == "svdquant" else NaiveMethod(), weights=weights,
                  activations=activations, calibration=setup.calibration, deployments=(Deployment(setup.sampler),),
                  preset_name="W4A4" if not bits else "W4A16", name=label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=64, out="runs/bench/svdquant")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels (default: all)")
    assert not any("," in label for label in ROWS), "row labels are comma-separated on the command line"
    parser.add_argument("--eps-only", action="store_true",
                        help="no sampling: one-step noise-prediction MSE vs FP on 128 calibration inputs per row")
    args = parser.parse_args()
    unknown = [label for label in args.rows.split(",") if label not in ROWS]
    if unknown:  # before the calibration data and the FP samples (a KeyError after them before)
        parser.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    setup = shipped_setup(args)
    if args.eps_only:
        eps_only(args, setup)
        return
    fp = api.sample(setup.model, setup.scheduler, setup.sampler, num_samples=args.samples, seed=args.seed,
                    progress=False).images.clamp(-1, 1)
    probe = torch.randn(4, *fp.shape[1:], generator=torch.Generator().manual_seed(7))
    probe_t = torch.tensor([10, 250, 600, 990])
    rows = []
    for label in args.rows.split(","):
        recipe = recipe_for(label, setup)
        start = time.perf_counter()
        qmodel = api.quantize(setup.model, setup.scheduler, recipe, calibration=setup.calib, progress=False)
        seconds = time.perf_counter() - start
        images = api.sample(qmodel, setup.scheduler, setup.sampler, num_samples=args.samples, seed=args.seed,
                            progress=False).images.clamp(-1, 1)
        with tempfile.TemporaryDirectory() as folder:
            size = qmodel.save_pretrained(f"{folder}/q", setup.scheduler)
            loaded, _ = tadq.load(f"{folder}/q")
            identical = bool(torch.equal(loaded(probe, probe_t), qmodel(probe, probe_t)))
        report = getattr(qmodel, "svdquant_report", {})
        alphas = Counter(str(f["alpha"]) for f in report.get("layers", []))
        row = {
            "label": label, "psnr": float(psnr_per_sample(images, fp).mean()),
            "psnr_sem": float(psnr_per_sample(images, fp).std() / len(images) ** 0.5),
            "mse": float((images - fp).pow(2).mean()), "quantize_s": round(seconds, 1),
            "fit_s": report.get("seconds"), "alphas": dict(sorted(alphas.items())),
            "artefact_bytes": size.weights_bytes, "fp_bytes": size.fp_bytes, "reload_identical": identical,
            **cost_summary(qmodel, setup.sampler.num_steps),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(json.dumps(rows, indent=2), setup.out / "results.json")
    write_rows(rows, setup.out, "| row | PSNR vs FP (dB) | Gbit-ops/sample (branch FP32 / BF16) | branch MACs / "
                                "quantized MACs | artefact (KiB) | kernel (layers) | quantize (s) | reload |",
               lambda r: f"| {r['label']} | {r['psnr']:.2f} | {r['bitops'] / 1e9:.0f} / "
                         f"{r['bitops_branch_bf16'] / 1e9:.0f} | {r['branch_macs'] / r['macs']:.2f} | "
                         f"{r['artefact_bytes'] / 1024:.0f} | "
                         f"{', '.join(f'{k} {v}' for k, v in r['kernel_layers'].items())} | {r['quantize_s']:.0f} | "
                         f"{'bit-identical' if r['reload_identical'] else 'DIFFERS'} |")


def eps_only(args: argparse.Namespace, setup) -> None:
    """Layer-level view without the sampler: MSE(ε̂ − ε) on calibration inputs spread over the kept steps."""
    index = torch.linspace(0, len(setup.calib) - 1, 128).round().long()
    x, t = setup.calib.x[index], setup.calib.t[index]
    with torch.no_grad():
        reference = setup.model(x, t).sample
    rows = []
    for label in args.rows.split(","):
        qmodel = api.quantize(setup.model, setup.scheduler, recipe_for(label, setup), calibration=setup.calib,
                              progress=False)
        with torch.no_grad():
            rows.append({"label": label, "eps_mse": float((qmodel(x, t) - reference).pow(2).mean())})
        print(json.dumps(rows[-1]), flush=True)
    write_rows(rows, setup.out, "| row | one-step ε MSE vs FP |", lambda r: f"| {r['label']} | {r['eps_mse']:.4f} |")


if __name__ == "__main__":
    main()
