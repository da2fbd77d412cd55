"""FP quality of the shipped text-to-image digits model, sampled with diffusers' own StableDiffusionPipeline.

    python benchmarks/t2i_fp_quality.py --seed 0 --num-samples 200 --guidance 1,2,3,5 --out runs/t2i/fp_quality.json

The quantized path is tadq's; this script is the independent FP reference: diffusers' pipeline, its saved
``DDIMScheduler`` (η = 0, ``--steps`` steps), classifier-free guidance against the empty prompt "".

- **Prompt agreement**: ``--num-samples`` samples over ``EVALUATION_PROMPTS`` (cycled in order, so every digit gets
  the same count), the same initial latents (seed ``--seed``) at every guidance scale; the share the shipped digit
  classifier reads as ``digit_of(prompt)``, overall and per digit.
- **Floors**: the classifier's accuracy on the real held-out digits and on the VAE's reconstructions of them (what a
  perfect latent generator could reach), and the unconditional samples (prompt "", same latents) scored against the
  evaluation prompts' digits: chance, 0.1, if the prompt carries the digit.
- **FD-digits** of every sample set against the held-out digits, beside the real-vs-real floor at the same count
  (``fd_digits_reference``: the held-out digits vs as many training digits).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, float_list, output_file, write_report
from torch import Tensor

from tadq.metrics.classifier import load_digit_classifier
from tadq.metrics.frechet import fd_digits, fd_digits_reference
from tadq.metrics.image import predicted_labels
from tadq.utils import library_versions
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.t2i import load_t2i_pipeline, shipped_t2i_path
from tadq.zoo.t2i_prompts import EVALUATION_PROMPTS, digit_of


def sample(pipe, prompts: list[str], latents: Tensor, guidance: float, steps: int, batch_size: int) -> Tensor:
    """Images (N, 1, H, W) in [-1, 1] from the given initial latents, in batches."""
    images = []
    for i in range(0, len(prompts), batch_size):
        out = pipe(prompts[i:i + batch_size], latents=latents[i:i + batch_size], guidance_scale=guidance,
                   num_inference_steps=steps, output_type="pt").images
        images.append(out * 2.0 - 1.0)
    return torch.cat(images)


def score(images: Tensor, digits: Tensor, classifier, heldout: Tensor) -> dict:
    """Prompt agreement (overall, per digit) and FD-digits against the held-out digits."""
    predicted = predicted_labels(images, classifier)
    right = predicted == digits
    return {
        "prompt_agreement": float(right.float().mean()),
        "per_digit": {str(d): float(right[digits == d].float().mean()) for d in range(10)},
        "predicted_counts": {str(d): int((predicted == d).sum()) for d in range(10)},
        "fd_digits_vs_heldout": fd_digits(heldout, images, classifier),
        "pixel_std": float(images.std()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=shipped_t2i_path())
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial latents")
    parser.add_argument("--num-samples", type=count, default=200)
    parser.add_argument("--guidance", default="1,2,3,5", help="comma-separated guidance scales")
    parser.add_argument("--steps", type=count, default=50, help="DDIM steps")
    parser.add_argument("--batch-size", type=count, default=100)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/t2i/fp_quality.json"))
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    try:  # before the pipeline is loaded (--guidance stays text: the recorded command repeats it)
        scales = float_list(args.guidance)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--guidance {args.guidance!r}: {error}")
    output_file(args.out, force_foreign=args.force_foreign)  # before any work: a user's file is not replaced
    torch.set_num_threads(args.threads)

    pipe = load_t2i_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digit_classifier()
    split = load_digits_split(DigitsConfig(resolution=16))
    heldout = split.heldout_images
    prompts = [EVALUATION_PROMPTS[i % len(EVALUATION_PROMPTS)] for i in range(args.num_samples)]
    digits = torch.tensor([digit_of(p) for p in prompts])
    size = pipe.unet.config.sample_size
    latents = torch.randn(args.num_samples, pipe.unet.config.in_channels, size, size,
                          generator=torch.Generator().manual_seed(args.seed))

    with torch.no_grad():
        vae = pipe.vae
        recon = vae.decode(vae.encode(heldout).latent_dist.mode()).sample.clamp(-1, 1)
    result: dict = {
        "command": "python benchmarks/t2i_fp_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("model", "out")),
        "model": str(args.model), "seed": args.seed, "num_samples": args.num_samples, "ddim_steps": args.steps,
        "prompts": "EVALUATION_PROMPTS", "num_prompts": len(EVALUATION_PROMPTS),
        "floor": {
            "classifier_accuracy_real_heldout": float((predicted_labels(heldout, classifier)
                                                       == split.heldout_labels).float().mean()),
            "classifier_accuracy_vae_reconstructions": float((predicted_labels(recon, classifier)
                                                             == split.heldout_labels).float().mean()),
            "heldout_count": len(heldout), "chance": 0.1,
            "fd_digits_real_vs_real_same_count": fd_digits_reference(args.num_samples, args.seed, classifier),
        },
        "guidance": {}, "versions": library_versions(),
    }
    t0 = time.perf_counter()
    unconditional = sample(pipe, [""] * args.num_samples, latents, 1.0, args.steps, args.batch_size)
    result["unconditional"] = {**score(unconditional, digits, classifier, heldout),
                               "sample_s": round(time.perf_counter() - t0, 1)}
    print("unconditional", json.dumps({k: v for k, v in result["unconditional"].items() if k != "per_digit"}))
    for g in scales:
        t0 = time.perf_counter()
        images = sample(pipe, prompts, latents, g, args.steps, args.batch_size)
        result["guidance"][str(g)] = {**score(images, digits, classifier, heldout),
                                      "sample_s": round(time.perf_counter() - t0, 1)}
        print(f"guidance {g}", json.dumps({k: v for k, v in result["guidance"][str(g)].items()
                                           if k not in ("per_digit", "predicted_counts")}))
    write_report(result, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
