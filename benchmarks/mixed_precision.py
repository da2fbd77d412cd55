"""PTQD step-aware mixed precision: bit-operations vs FD-digits / PSNR, beside the single-precision points.

Low bits (W4A4) for the noisy early steps and high bits (W4A8) later, the switch chosen by the SNR rule
(docs/methods/ptqd.md, [RECON]) for a sweep of γ. Every point is sampled from the same evaluation noise as the FP
reference. Reuses the Q-Diffusion base models that `tadq run` saved (runs/main/models) when present. Run:

    python benchmarks/mixed_precision.py [--samples 1000] [--models-dir runs/main/models] [--out runs/bench/mixed]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from arguments import float_list  # noqa: E402
from common import add_common_flags, shipped_setup, write_rows  # noqa: E402

from tadq import api  # noqa: E402
from tadq.config import QuantConfig  # noqa: E402
from tadq.corrections.ptqd import PTQDConfig  # noqa: E402
from tadq.corrections.ptqd.experiment import fit_ptqd  # noqa: E402
from tadq.corrections.ptqd.mixed_precision import MixedPrecisionDenoiser, bit_operations, tradeoff_curve  # noqa: E402
from tadq.io import load_quantized  # noqa: E402
from tadq.metrics import fd_digits, load_digit_classifier, psnr_per_sample  # noqa: E402
from tadq.utils import atomic_write_text
from tadq.zoo.data import load_digits_split  # noqa: E402


def _base(model, scheduler, calib, calibration, preset: str, models_dir: Path):
    found = sorted(models_dir.glob(f"qdiffusion-{preset}-*")) if models_dir.exists() else []
    if found:
        return load_quantized(found[0])[0]
    config = QuantConfig.from_preset(preset, method="qdiffusion", calibration=calibration, split_shortcut=True,
                                     quantize_attention=True)
    return api.quantize(model, scheduler, config, calibration=calib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=1000, out="runs/bench/mixed")
    parser.add_argument("--gammas", type=float_list, default="0.99,0.995,0.998,0.999,0.9995,0.9999")
    parser.add_argument("--models-dir", default="runs/main/models")
    args = parser.parse_args()
    setup = shipped_setup(args)
    model, scheduler, sampler, calibration, calib, out = (setup.model, setup.scheduler, setup.sampler,
                                                          setup.calibration, setup.calib, setup.out)
    low, high = (fit_ptqd(_base(model, scheduler, calib, calibration, p, Path(args.models_dir)), model, scheduler,
                          sampler, PTQDConfig(seed=calibration.seed)) for p in ("W4A4", "W4A8"))
    classifier, real = load_digit_classifier(), load_digits_split().train_images
    fp = api.sample(model, scheduler, sampler, num_samples=args.samples, seed=args.seed).images.clamp(-1, 1)
    steps = sampler.num_steps
    per_forward = {"W4A4": bit_operations(low), "W4A8": bit_operations(high)}
    points = tradeoff_curve(low, high, scheduler, sampler, args.gammas)
    schedules = {"W4A4 + PTQD": steps, "W4A8 + PTQD": 0}
    for point in points:
        schedules.setdefault(f"mixed γ={point.gamma:g}", point.switch)
    rows, seen = [], {}
    for label, switch in schedules.items():
        if switch in seen:  # the same switch step samples the same images
            rows.append({**seen[switch], "label": label})
            continue
        denoiser = MixedPrecisionDenoiser(low, high, scheduler, sampler, switch) if 0 < switch < steps else (
            low if switch == steps else high)
        images = api.sample(denoiser, scheduler, sampler, num_samples=args.samples, seed=args.seed).images
        images = images.clamp(-1, 1)
        row = {
            "label": label, "low_bit_steps": switch,
            "bit_operations": switch * per_forward["W4A4"] + (steps - switch) * per_forward["W4A8"],
            "fd_digits": fd_digits(real, images, classifier), "psnr": float(psnr_per_sample(images, fp).mean()),
        }
        seen[switch] = row
        rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(json.dumps(rows, indent=2), out / "results.json")
    _plot(rows, out / "tradeoff.png")
    write_rows(rows, out, "| schedule | low-bit steps | Gbit-ops / sample | FD-digits | PSNR vs FP (dB) |",
               lambda r: f"| {r['label']} | {r['low_bit_steps']} | {r['bit_operations'] / 1e9:.1f} | "
                         f"{r['fd_digits']:.2f} | {r['psnr']:.2f} |")


def _plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "fd_digits", "FD-digits ↓"), (axes[1], "psnr", "PSNR vs FP (dB) ↑")):
        mixed = sorted((r for r in rows if r["label"].startswith("mixed")), key=lambda r: r["bit_operations"])
        ax.plot([r["bit_operations"] / 1e9 for r in mixed], [r[key] for r in mixed], "o-", label="mixed W4A4→W4A8")
        for r in rows:
            if not r["label"].startswith("mixed"):
                ax.plot(r["bit_operations"] / 1e9, r[key], "s", markersize=9, label=r["label"])
        ax.set_xlabel("Gbit-operations per sample (50 steps)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
