"""FP quality of the shipped photos DDPM: FD-photos of unconditional samples and class agreement of conditional ones.

    python benchmarks/photos_fp_quality.py --part uncond --out runs/photos/fp_uncond.json
    python benchmarks/photos_fp_quality.py --part cond --out runs/photos/fp_cond.json

(``--part all`` does both in one process; the two parts were run as two 1-thread processes.) Sampling is DDIM
(η = 0, 50 steps, x̂_0 clipped as the training scheduler says) with classifier-free guidance
ε = ε_u + g (ε_c − ε_u). ``--sampler tadq`` (the default) samples with ``tadq.sample`` and ``tadq.ClassLabels``
(labels + null class, tadq's conditioning seam); ``--sampler diffusers`` with a small loop over diffusers'
``DDIMScheduler`` instead, a cross-check independent of tadq's sampling code. Unconditional samples use the null
label (K) as their label.

- ``uncond``: FD-photos of ``--num-samples`` unconditional samples (noise seed ``--seed``) against the held-out
  region patches, beside the real-vs-real floor (the same number of training patches against the same held-out
  patches) and the classifier's accuracy on the real held-out patches.
- ``cond``: ``--per-class`` samples of every photograph (noise seed ``--seed`` + 1) at every ``--guidance``; the
  share the photo classifier reads as the prompted photograph (per class too) and their FD-photos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, float_list, output_file, write_report
from diffusers import DDIMScheduler
from safetensors.torch import save_file
from torch import Tensor, nn

from tadq.metrics.features import PhotosFeatureSpace
from tadq.metrics.photo_classifier import photo_accuracy
from tadq.models import load_pipeline_parts
from tadq.zoo.photos import PhotosConfig, load_photos_split
from tadq.zoo.photos_model import null_label

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "tadq" / "zoo" / "weights" / "photos-ddpm"


def tadq_sample(unet: nn.Module, scheduler, labels: Tensor, guidance: float, steps: int, seed: int,
                batch_size: int, kind: str = "ddim") -> Tensor:
    """Samples in [-1, 1] from tadq's sampler; the null class is given only when guidance needs it."""
    from tadq.api import sample
    from tadq.sampling import ClassLabels, SamplerConfig

    null = None if guidance == 1.0 else null_label()
    result = sample(unet, scheduler, SamplerConfig(kind=kind, num_steps=steps), num_samples=len(labels),
                    seed=seed, batch_size=batch_size, conditions=ClassLabels(tuple(labels.tolist()), null_class=null),
                    guidance_scale=guidance, progress=False)
    return result.images.clamp(-1.0, 1.0)


@torch.no_grad()
def ddim_sample(unet: nn.Module, scheduler: DDIMScheduler, labels: Tensor, guidance: float, steps: int,
                seed: int, batch_size: int) -> Tensor:
    """DDIM (η = 0) samples in [-1, 1] for ``labels``; the noise of sample i depends only on (seed, i)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 3, 32, 32), generator=generator)
    null = torch.full_like(labels, null_label())
    scheduler.set_timesteps(steps)
    out = []
    for start in range(0, len(labels), batch_size):
        x, y = noise[start:start + batch_size], labels[start:start + batch_size]
        for t in scheduler.timesteps:
            if guidance == 1.0 or bool((y == null[: len(y)]).all()):
                eps = unet(x, t, class_labels=y).sample
            else:
                eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, null[: len(y)]])).sample.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1.0, 1.0))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED)
    parser.add_argument("--part", choices=("uncond", "cond", "all"), default="all")
    parser.add_argument("--num-samples", type=count, default=1000)
    parser.add_argument("--per-class", type=count, default=32)
    parser.add_argument("--guidance", default="1,3")
    parser.add_argument("--steps", type=count, default=50)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--batch-size", type=count, default=100)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--sampler", choices=("tadq", "diffusers"), default="tadq")
    parser.add_argument("--kind", choices=("ddim", "ddpm"), default="ddim",
                        help="tadq's sampler kind (ddpm: ancestral, use --steps 1000)")
    parser.add_argument("--out", type=Path, required=True)
    add_force_foreign_flag(parser, "file")
    args = parser.parse_args()
    try:  # before the unconditional samples: a bad list surfaced only after them
        scales = float_list(args.guidance)
    except argparse.ArgumentTypeError as error:
        parser.error(f"--guidance {args.guidance!r}: {error}")
    output_file(args.out, force_foreign=args.force_foreign)  # before any work: a user's file is not replaced
    torch.set_num_threads(args.threads)
    unet, training_scheduler = load_pipeline_parts(args.model)
    if args.sampler == "tadq":
        def generate(labels: Tensor, guidance: float, seed: int) -> Tensor:
            return tadq_sample(unet, training_scheduler, labels, guidance, args.steps, seed, args.batch_size,
                               args.kind)
    else:
        def generate(labels: Tensor, guidance: float, seed: int) -> Tensor:
            ddim = DDIMScheduler.from_config(training_scheduler.config)
            return ddim_sample(unet, ddim, labels, guidance, args.steps, seed, args.batch_size)
    space = PhotosFeatureSpace(floor_samples=args.num_samples)
    split = load_photos_split(PhotosConfig())
    k = len(split.class_names)
    sampler = f"tadq.sample {args.kind.upper()}" if args.sampler == "tadq" else "diffusers DDIMScheduler loop, DDIM"
    eta = ", eta 0" if args.kind == "ddim" or args.sampler == "diffusers" else ""
    result: dict = {"model": str(args.model), "sampler": f"{sampler} {args.steps} steps{eta}",
                    "clip_sample": bool(training_scheduler.config.clip_sample), "threads": args.threads,
                    "classifier_heldout_accuracy": photo_accuracy(space.classifier, split.heldout_images,
                                                                  split.heldout_labels),
                    "heldout_patches": len(split.heldout_images), "chance": 1.0 / k,
                    "heldout_pixel_std": float(split.heldout_images.std())}
    samples_dir = args.out.parent
    samples_dir.mkdir(parents=True, exist_ok=True)
    if args.part in ("uncond", "all"):
        t0 = time.perf_counter()
        labels = torch.full((args.num_samples,), null_label(), dtype=torch.long)
        images = generate(labels, 1.0, args.seed)
        result["uncond"] = {"num_samples": args.num_samples, "noise_seed": args.seed, "fd_photos": space.fd(images),
                            "fd_photos_floor": space.floor, "floor_samples": space.floor_samples,
                            "pixel_std": float(images.std()),
                            "class_histogram": torch.bincount(space.classifier(images).argmax(1),
                                                              minlength=k).tolist(),
                            "real_heldout_histogram": torch.bincount(split.heldout_labels, minlength=k).tolist(),
                            "sample_s": round(time.perf_counter() - t0, 1)}
        save_file({"images": images.contiguous()},
                  str(samples_dir / f"uncond_{args.kind}{args.steps}_samples.safetensors"))
    if args.part in ("cond", "all"):
        labels = torch.arange(k).repeat_interleave(args.per_class)
        order = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(0))
        result["cond"] = {"fd_photos_floor": space.fd(split.train_images[order[: len(labels)]]),
                          "floor_samples": len(labels)}
        for guidance in scales:
            t0 = time.perf_counter()
            images = generate(labels, guidance, args.seed + 1)
            predicted = space.classifier(images).argmax(1)
            hits = (predicted == labels).float()
            result["cond"][f"g{guidance:g}"] = {
                "guidance": guidance, "per_class": args.per_class, "noise_seed": args.seed + 1,
                "prompted_accuracy": float(hits.mean()),
                "per_class_accuracy": dict(zip(split.class_names, hits.view(k, -1).mean(1).tolist(), strict=True)),
                "fd_photos": space.fd(images), "pixel_std": float(images.std()),
                "sample_s": round(time.perf_counter() - t0, 1)}
            save_file({"images": images.contiguous(), "labels": labels},
                      str(samples_dir / f"cond_{args.kind}{args.steps}_g{guidance:g}_samples.safetensors"))
    write_report(result, args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
