"""Side by side with optimum-quanto (what users pick today) on the shipped model, same noise, same metrics.

quanto quantizes the same UNet (weights qint8/qint4, activations qint8 calibrated with its ``Calibration``
context on tadq's timestep-aware calibration inputs), then both are sampled with tadq's loop from the same noise
as the FP reference. Needs the optional extra: ``pip install -e .[peers]``. Run:

    python benchmarks/peer_quanto.py [--samples 256] [--out runs/bench/peers]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig
from tadq.evaluation import quality_metrics
from tadq.metrics import load_digit_classifier
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.zoo.data import load_digits_split


def quanto_model(model, calib, weights: str, activations: str | None, batch_size: int = 128):
    """A quanto-quantized copy of ``model``, activations calibrated on ``calib`` (quanto's own API)."""
    from optimum.quanto import Calibration, freeze, qint4, qint8, quantize

    dtypes = {"qint8": qint8, "qint4": qint4}
    qmodel = copy.deepcopy(model)
    quantize(qmodel, weights=dtypes[weights], activations=dtypes[activations] if activations else None)
    if activations:
        with torch.no_grad(), Calibration():
            for start in range(0, len(calib), batch_size):
                qmodel(calib.x[start: start + batch_size], calib.t[start: start + batch_size])
    freeze(qmodel)
    return qmodel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/bench/peers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, scheduler = load_pipeline_parts(None)
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration, cache_dir=".cache/tadq")
    classifier, real = load_digit_classifier(), load_digits_split().train_images
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed, record_trajectory=True)
    rows = []
    for label, weights, activations in (("quanto W8A8", "qint8", "qint8"), ("quanto W4A8", "qint4", "qint8"),
                                        ("quanto W8 (weight-only)", "qint8", None)):
        t0 = time.perf_counter()
        qmodel = quanto_model(model, calib, weights, activations)
        quantize_s = time.perf_counter() - t0
        result = api.sample(qmodel, scheduler, sampler, num_samples=args.samples, seed=args.seed,
                            record_trajectory=True)
        metrics = quality_metrics(result.images, result.trajectory.states, fp.images, fp.trajectory.states, real,
                                  classifier)
        row = {"method": label, **metrics.to_dict(), "quantize_s": round(quantize_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = ["| peer | PSNR vs FP (dB) | SSIM | class agree | final MSE | FD-digits |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['agreement']:.3f} | {r['final_mse']:.2e} | "
              f"{r['fd_digits']:.2f} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
