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

import torch
from common import add_common_flags, shipped_setup, write_rows

from tadq import api
from tadq.evaluation import quality_metrics
from tadq.metrics import load_digit_classifier
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
    add_common_flags(parser, samples=256, out="runs/bench/peers")
    args = parser.parse_args()
    setup = shipped_setup(args)
    model, scheduler, sampler, calib = setup.model, setup.scheduler, setup.sampler, setup.calib
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
        (setup.out / "results.json").write_text(json.dumps(rows, indent=2))  # nothing lost if interrupted
    write_rows(rows, setup.out, "| peer | PSNR vs FP (dB) | SSIM | class agree | final MSE | FD-digits |",
               lambda r: f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['agreement']:.3f} | "
                         f"{r['final_mse']:.2e} | {r['fd_digits']:.2f} |")

if __name__ == "__main__":
    main()
