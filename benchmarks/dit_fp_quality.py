"""FP quality of the shipped class-conditional DiT: class agreement and FD-digits per guidance scale and sampler.

    python benchmarks/dit_fp_quality.py --num-samples 200 --guidance 1,2,3,5 --samplers ddim@50,dpmsolver++@20 \
        --out runs/dit/fp_quality.json

Samples come from ``tadq.sample`` (tadq's walker, labels 0–9 cycled so every digit gets the same count, the null
class 10 as the unconditional branch), decoded by the pipeline's VAE. ``--cross-check`` also samples at guidance 1
with diffusers' own ``DiTPipeline`` (its loop, its noise; it hard-codes ImageNet's null label 1000, so it cannot
guide this model): its agreement and FD-digits must match tadq's within sampling noise.

- **Class agreement**: the share of samples the shipped digit classifier reads as the label they were drawn with.
- **Floors**: the classifier on the real held-out digits and on the VAE's reconstructions of them (what a perfect
  latent generator could reach); FD-digits real-vs-real at the same count; unconditional samples (null class)
  scored against the same labels (chance: 0.1).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, float_list, output_file, write_report
from torch import Tensor

from tadq.api import sample
from tadq.experiments.workload import load_workload
from tadq.metrics.classifier import load_digit_classifier
from tadq.metrics.frechet import fd_digits, fd_digits_reference
from tadq.metrics.image import predicted_labels
from tadq.sampling import ClassLabels, SamplerConfig
from tadq.utils import library_versions
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.dit import NUM_CLASSES, shipped_dit_path


def parse_sampler(text: str) -> SamplerConfig:
    kind, _, steps = text.partition("@")
    return SamplerConfig(kind=kind, num_steps=int(steps or 50))


def score(images: Tensor, labels: Tensor, classifier, heldout: Tensor) -> dict:
    predicted = predicted_labels(images, classifier)
    right = predicted == labels
    return {"class_agreement": float(right.float().mean()),
            "per_digit": {str(d): float(right[labels == d].float().mean()) for d in range(NUM_CLASSES)},
            "fd_digits_vs_heldout": fd_digits(heldout, images, classifier)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=shipped_dit_path())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=count, default=200)
    parser.add_argument("--guidance", default="1,2,3,5")
    parser.add_argument("--samplers", default="ddim@50,dpmsolver++@20")
    parser.add_argument("--batch-size", type=count, default=200)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--cross-check", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/dit/fp_quality.json"))
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    try:  # before the model and the digits are loaded (--guidance stays text: the recorded command repeats it)
        scales = float_list(args.guidance)
        for text in args.samplers.split(","):
            parse_sampler(text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        parser.error(f"--guidance {args.guidance!r} / --samplers {args.samplers!r}: {error}")
    output_file(args.out, force_foreign=args.force_foreign)  # before any work: a user's file is not replaced
    torch.set_num_threads(args.threads)

    workload = load_workload(str(args.model), labels="random", guidance_scale=1.0)
    classifier = load_digit_classifier()
    split = load_digits_split(DigitsConfig(resolution=workload.image_shape()[-1]))
    heldout = split.heldout_images
    labels = torch.arange(args.num_samples) % NUM_CLASSES
    with torch.no_grad():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.model / "vae", low_cpu_mem_usage=False).eval()
        recon = vae.decode(vae.encode(heldout).latent_dist.mode()).sample.clamp(-1, 1)
    result: dict = {
        "command": "python benchmarks/dit_fp_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("model", "out", "cross_check")) + (" --cross-check" if args.cross_check else ""),
        "model": str(args.model), "num_samples": args.num_samples,
        "floor": {
            "classifier_accuracy_real_heldout": float((predicted_labels(heldout, classifier)
                                                       == split.heldout_labels).float().mean()),
            "classifier_accuracy_vae_reconstructions": float((predicted_labels(recon, classifier)
                                                             == split.heldout_labels).float().mean()),
            "fd_digits_real_vs_real_same_count": fd_digits_reference(args.num_samples, args.seed, classifier),
            "chance": 1 / NUM_CLASSES,
        },
        "samplers": {}, "versions": library_versions(),
    }
    for text in args.samplers.split(","):
        sampler = parse_sampler(text)
        rows: dict = {}
        t0 = time.perf_counter()
        null = ClassLabels(tuple([NUM_CLASSES] * args.num_samples))
        latents = sample(workload.model, workload.scheduler, sampler, num_samples=args.num_samples, seed=args.seed,
                         batch_size=args.batch_size, conditions=null, progress=False).images
        rows["unconditional"] = {**score(workload.images(latents), labels, classifier, heldout),
                                 "sample_s": round(time.perf_counter() - t0, 1)}
        for g in scales:
            t0 = time.perf_counter()
            source = ClassLabels(tuple(labels.tolist()), null_class=None if g == 1.0 else NUM_CLASSES)
            latents = sample(workload.model, workload.scheduler, sampler, num_samples=args.num_samples,
                             seed=args.seed, batch_size=args.batch_size, conditions=source, guidance_scale=g,
                             progress=False).images
            rows[f"guidance {g:g}"] = {**score(workload.images(latents), labels, classifier, heldout),
                                       "sample_s": round(time.perf_counter() - t0, 1)}
        result["samplers"][text] = rows
        for name, row in rows.items():
            print(text, name, json.dumps({k: v for k, v in row.items() if k != "per_digit"}), flush=True)
    if args.cross_check:
        from diffusers import DiTPipeline

        pipe = DiTPipeline.from_pretrained(args.model, low_cpu_mem_usage=False)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_labels=labels.tolist(), guidance_scale=1.0, num_inference_steps=50,
                      generator=torch.Generator().manual_seed(args.seed), output_type="np").images
        images = torch.from_numpy(images).permute(0, 3, 1, 2).mean(dim=1, keepdim=True) * 2 - 1
        result["diffusers_ditpipeline_guidance_1_ddim50"] = score(images, labels, classifier, heldout)
        print("diffusers DiTPipeline g=1", json.dumps({k: v for k, v in
                                                       result["diffusers_ditpipeline_guidance_1_ddim50"].items()
                                                       if k != "per_digit"}))
    write_report(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
