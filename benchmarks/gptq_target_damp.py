"""Which ridge damping the least-squares FP-output target of GPTQ rounding needs (``gptq_target_damp``).

Why: GPTQ onto the FP layer outputs first solves W* = W E[x x̂ᵀ] (E[x̂ x̂ᵀ] + λ·mean diag·I)⁻¹. With λ = gptq_damp
(1 %, GPTQ's own damping of its column updates) the ridge pulls W* toward zero along the inputs' weak directions
by more than an 8-bit step, and at W8A8 every unit rejected its GPTQ rounding as worse than nearest; too small a λ
leaves W* ill-conditioned. This script quantizes a shipped model with the default Q-Diffusion base (GPTQ, no
activation phase, input/output convs in float) at each (preset, damping) and reports the units that kept nearest
rounding, the summed unit loss against nearest, and the sampled PSNR against FP from the same noise.

Calibration as ``w8a8_diagnose.py`` (64 FP trajectories, 25 of 50 DDIM steps × 32 inputs, seed 0); evaluation
seed 1000; both with the model's conditions and guidance (a class- or text-conditional model: its calibration and
evaluation labels or prompts, disjoint, and its classifier-free guidance), PSNR on the images (a latent model's
samples decoded by its VAE), as ``gptq_target_prior.py``. Rows ``PRESET:DAMP`` with DAMP a number or ``gptq``
(None: solve with gptq_damp, tadq before 2026-12-03). One JSON line per row. Run (one thread)::

    python benchmarks/gptq_target_damp.py --model digits --rows W8A8:gptq,W8A8:1e-3,W8A8:1e-4,W8A8:1e-5,\\
W4A8:gptq,W4A8:1e-3,W4A8:1e-4,W4A8:1e-5,W4A8:1e-6 --num-samples 128
    python benchmarks/gptq_target_damp.py --model photos --rows W8A8:gptq,W8A8:1e-4,W4A8:gptq,W4A8:1e-4 \\
        --num-samples 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from arguments import count, model_name, preset_name
from common import deployed, evaluation_images, probe_calibration, unit_summary

from tadq import api
from tadq.config import QuantConfig, ReconstructionConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample


def parse_row(row: str) -> tuple[str, float | None]:
    """``PRESET:DAMP`` → (preset, damping; ``None`` for ``gptq``), the preset checked: an unknown one was refused
    only after the calibration and the FP samples."""
    name, _, damp = row.partition(":")
    if not damp:
        raise argparse.ArgumentTypeError(f"row {row!r}: expected PRESET:DAMP (a number, or gptq for gptq_damp)")
    preset_name(name)
    if damp == "gptq":
        return name.upper(), None
    try:
        return name.upper(), float(damp)
    except ValueError:
        raise argparse.ArgumentTypeError(f"row {row!r}: {damp!r} is neither a number nor gptq") from None


def parse_rows(text: str) -> list[tuple[str, float | None]]:
    return [parse_row(row) for row in text.split(",") if row.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=model_name, default="digits")
    parser.add_argument("--rows", type=parse_rows, default="W8A8:gptq,W8A8:1e-4,W4A8:gptq,W4A8:1e-4")
    parser.add_argument("--num-samples", type=count, default=128)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--prior", choices=("zero", "weight"), default="zero",
                        help="what W*'s ridge shrinks toward (gptq_target_prior): zero, the solve this table was "
                             "measured with (tadq before 2026-12-07), or weight (today's default)")
    args = parser.parse_args()
    rows = args.rows
    for _, damp in rows:  # refuse a bad value before any calibration
        try:
            ReconstructionConfig(gptq_target_damp=damp, gptq_target_prior=args.prior)
        except ValueError as error:
            parser.error(str(error))
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    sampler, calibration, data = probe_calibration(workload)

    def draw(model) -> torch.Tensor:
        return evaluation_images(workload, model, sampler, args.num_samples)

    fp = draw(workload.model)
    for name, damp in rows:
        reconstruction = ReconstructionConfig(gptq_target_damp=damp, gptq_target_prior=args.prior)
        config = QuantConfig.from_preset(name, calibration=calibration, method="qdiffusion", fp_layers="first_last",
                                         reconstruction=reconstruction)
        start = time.process_time()
        qmodel = api.quantize(workload.model, workload.scheduler, deployed(config, workload), calibration=data,
                              conditions=workload.calibration_conditions, progress=False)
        cpu_s = time.process_time() - start
        print(json.dumps({
            "model": args.model, "preset": name, "gptq_target_damp": damp, "prior": args.prior, **unit_summary(qmodel),
            "psnr": round(float(psnr_per_sample(draw(qmodel), fp).mean()), 2), "quantize_cpu_s": round(cpu_s, 1)}),
            flush=True)


if __name__ == "__main__":
    main()
