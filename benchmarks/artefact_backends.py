"""One saved artefact on every CPU backend: fake, int8, int8-compiled — sampling time and agreement, in ONE run.

For artefacts the speed benchmark does not build itself (it quantizes naive-PTQ models): e.g. a TFMQ-DM model with
per-step ranges, whose sampler is fixed by its tables. Each backend loads the artefact, samples once to warm up
(for int8-compiled: the compile) and once timed, from the same noise; reported: the warm-up and timed seconds and
the PSNR of each integer backend's samples against the fake-quant ones (mean and median over samples); with
``--fp FOLDER`` (the diffusers model the artefact was quantized from) also every backend's PSNR against the FP
model's samples from the same noise, and with ``--fd-digits`` the FD-digits of every backend's samples (and of the
FP model's) against the real training digits, i.e. whether the integer model keeps its recipe's quality.

    python benchmarks/artefact_backends.py ARTEFACT [--fp src/tadq/zoo/weights/digits-ddpm] [--steps 50]
        [--fd-digits] [--samples 64] [--threads 1] [--out runs/x]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, output_folder

import tadq
from tadq.backends import check_backend
from tadq.evaluation import fd_reference
from tadq.io import load_quantized
from tadq.metrics.image import psnr_per_sample
from tadq.models import load_pipeline_parts
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text

BACKENDS = ("fake", "int8", "int8-compiled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artefact", type=Path)
    parser.add_argument("--steps", type=count, default=50, help="DDIM steps (a TFMQ artefact needs its own grid)")
    parser.add_argument("--samples", type=count, default=64, help="samples, in one batch")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (optional)")
    parser.add_argument("--fp", type=Path, default=None,
                        help="the FP diffusers folder the artefact was quantized from: adds PSNR vs FP")
    parser.add_argument("--fd-digits", action="store_true",
                        help="FD-digits of each backend's samples (grey digit models; compare at equal --samples)")
    add_force_foreign_flag(parser)
    args = parser.parse_args()
    if not (args.artefact / "tadq_config.json").is_file():
        parser.error(f"{args.artefact} is not a tadq artefact (no tadq_config.json)")
    if args.out is not None:
        output_folder(args.out, force_foreign=args.force_foreign)
    fp_model = None
    if args.fp is not None:
        fp_model, _ = load_pipeline_parts(args.fp)  # refused here if it is not an FP diffusers folder
    for name in BACKENDS:
        check_backend(name)  # refused here, before any loading, if this machine cannot run it
    torch.set_num_threads(args.threads)
    features = None
    if args.fd_digits:
        config = json.loads((args.artefact / "tadq_config.json").read_text())
        denoiser = json.loads((args.artefact / config.get("denoiser_folder", ".") / "config.json").read_text())
        size = denoiser["sample_size"]
        resolution = size if isinstance(size, int) else size[0]
        features = fd_reference(resolution)  # the classifier and the real digits, loaded before any sampling
        features.check_fits((denoiser.get("in_channels", 1), resolution, resolution), f"{args.artefact}'s samples")
    sampler = SamplerConfig(kind="ddim", num_steps=args.steps, eta=0.0)
    rows, images = {}, {}
    for name in BACKENDS:
        model, scheduler = load_quantized(args.artefact, backend=name)
        timings = []
        for seed in (args.seed + 1, args.seed):  # warm-up on other noise, then the timed run
            start = time.perf_counter()
            result = tadq.sample(model, scheduler, sampler, num_samples=args.samples, seed=seed,
                                 batch_size=args.samples, progress=False)
            timings.append(time.perf_counter() - start)
        images[name] = result.images
        rows[name] = {"warm_up_s": timings[0], "sampling_s": timings[1]}
    for name in BACKENDS[1:]:
        psnr = psnr_per_sample(images[name], images["fake"])
        rows[name].update(psnr_vs_fake_mean_db=float(psnr.mean()), psnr_vs_fake_median_db=float(psnr.median()))
    if fp_model is not None:  # the FP model on the artefact's own scheduler and sampler, same noise
        reference = tadq.sample(fp_model, scheduler, sampler, num_samples=args.samples, seed=args.seed,
                                batch_size=args.samples, progress=False).images
        for name in BACKENDS:
            rows[name]["psnr_vs_fp_mean_db"] = float(psnr_per_sample(images[name], reference).mean())
        if features is not None:
            rows["FP"] = {"fd_digits": features.fd(reference.clamp(-1, 1))}
    if features is not None:
        for name in BACKENDS:
            rows[name]["fd_digits"] = features.fd(images[name].clamp(-1, 1))
    report = {"artefact": str(args.artefact), "fp": None if args.fp is None else str(args.fp),
              "sampler": sampler.key, "samples": args.samples,
              "threads": args.threads, "rows": rows}
    print(json.dumps(report, indent=1))
    if args.out is not None:
        atomic_write_text(json.dumps(report, indent=1) + "\n", args.out / "results.json")


if __name__ == "__main__":
    main()
