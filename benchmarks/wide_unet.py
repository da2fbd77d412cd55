"""A wider twin of the shipped digits UNet, for measuring how integer speed scales with layer width.

The shipped models are small (32–64 channels at 16×16), so the int8 tiles of the CPU's matrix units are far from
full and the float work between layers dominates a forward (docs/backends.md). Users' models are wider (Stable
Diffusion: 320–1280 channels). This writes a pipeline folder with the digits architecture at ``--width`` times its
channels (attention heads kept at the digits model's count, so the head dimension grows with the width, as in SD),
next to a copy of the shipped scheduler. Its weights (``--init``):

* ``widen`` (default): the trained digits model widened without changing its function (Net2Net-style): every
  channel is repeated ``width`` times in place (channel c becomes c·w … c·w + w − 1), a layer reading repeated
  channels divides those weights by ``width``, GroupNorm groups keep the same values (each group holds the repeats
  of its own channels), the query projection is scaled by 1/√width (the dot product over repeated channels is
  ``width`` times larger and the softmax scale only 1/√width smaller), and the time embedding's first linear reads
  the narrow model's sinusoid frequencies, which are every ``width``-th one of the wide sinusoid's. Its ε equals the
  digits model's up to float rounding (checked when writing), so it samples digits and the quality and agreement
  columns of the speed table mean what they mean for the shipped model, while every kernel runs at the new width.
  Per-channel weight scales repeat with the channels, so a quantized widened model computes what the quantized
  shipped model does.
* ``random``: diffusers' own initialisation from ``--seed`` (speed only: an untrained model's samples, and every
  PSNR column, are noise).

Then measure it as any folder:

    python benchmarks/wide_unet.py --width 4 --out runs/wide-unet-4
    python benchmarks/speed.py --model runs/wide-unet-4 --threads 1 --presets W8A8,W8A8-WSYM --samples 16 \\
        --out runs/bench-speed-wide-4

An existing folder is refused (tadq does not overwrite what it did not write).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from arguments import count
from diffusers import UNet2DModel
from torch import Tensor

from tadq.models import shipped_model_path

SINUSOID_LINEAR = "time_embedding.linear_1.weight"  # reads the sinusoidal timestep features
TOLERANCE = 1e-4  # max |ε_wide − ε_narrow| / max |ε_narrow|: float32 sums over w× longer rows, in another order


def wide_digits_unet(width: int, seed: int, init: str = "widen") -> UNet2DModel:
    """The shipped digits UNet's architecture with ``width``× its channels (module docstring for ``init``)."""
    if width < 1:
        raise ValueError(f"--width must be a positive integer, got {width}")
    if init not in ("widen", "random"):
        raise ValueError(f"--init must be widen or random, got {init!r}")
    narrow = UNet2DModel.from_pretrained(shipped_model_path() / "unet").eval()
    config = dict(narrow.config)
    heads = config["block_out_channels"][-1] // config["attention_head_dim"]
    config["block_out_channels"] = [channels * width for channels in config["block_out_channels"]]
    config["attention_head_dim"] = config["block_out_channels"][-1] // heads
    torch.manual_seed(seed)
    wide = UNet2DModel.from_config(config).eval()
    if init == "widen":
        wide.load_state_dict(widened_state(narrow.state_dict(), wide.state_dict(), width))
        check_same_function(narrow, wide, seed)
    return wide


def widened_state(narrow: dict[str, Tensor], wide: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """The narrow model's tensors at the wide model's shapes, each channel repeated ``width`` times in place."""
    state = {}
    for name, target in wide.items():
        value = narrow[name].clone()
        if name == SINUSOID_LINEAR:  # columns: [cos | sin] of the narrow model's half-width frequencies f_i, which
            # are the wide sinusoid's frequencies w·i (same exponent −ln(10⁴)·i/half, half w× larger); the rest get 0
            half = value.shape[1] // 2
            columns = torch.zeros(value.shape[0], target.shape[1], dtype=value.dtype)
            for part in (0, 1):
                columns[:, part * half * width + torch.arange(half) * width] = value[:, part * half:(part + 1) * half]
            value = columns
        elif value.dim() >= 2 and target.shape[1] == width * value.shape[1]:  # reads repeated channels
            value = value.repeat_interleave(width, dim=1) / width
        if target.shape[0] == width * value.shape[0]:  # writes channels that are repeated
            value = value.repeat_interleave(width, dim=0)
        if ".to_q." in name:  # q·k over w× repeated channels is w× larger; the softmax scale shrinks by √w only
            value = value / width**0.5
        if value.shape != target.shape:
            raise ValueError(f"{name}: cannot widen {tuple(narrow[name].shape)} to {tuple(target.shape)}")
        state[name] = value
    return state


def check_same_function(narrow: UNet2DModel, wide: UNet2DModel, seed: int) -> None:
    """Raise unless the widened model's ε equals the narrow one's on random inputs at spread timesteps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(8, narrow.config.in_channels, narrow.config.sample_size, narrow.config.sample_size,
                    generator=generator)
    t = torch.linspace(0, 999, 8).round().long()
    with torch.no_grad():
        reference, widened = narrow(x, t).sample, wide(x, t).sample
    error = float((widened - reference).abs().max() / reference.abs().max())
    if error > TOLERANCE:
        raise RuntimeError(f"the widened model differs from the digits model by {error:.2e} (relative max): the "
                           "widening does not preserve this architecture")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=count, required=True, help="channel multiplier over the digits UNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", choices=("widen", "random"), default="widen",
                        help="widen the trained digits model (same function) or initialise at random (speed only)")
    parser.add_argument("--out", type=Path, required=True, help="the pipeline folder to write (must not exist)")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; give a new folder")
    unet = wide_digits_unet(args.width, args.seed, args.init)
    shipped = shipped_model_path()
    args.out.mkdir(parents=True)
    unet.save_pretrained(args.out / "unet")
    shutil.copytree(shipped / "scheduler", args.out / "scheduler")
    shutil.copy(shipped / "model_index.json", args.out / "model_index.json")
    parameters = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"folder": str(args.out), "width": args.width, "seed": args.seed, "init": args.init,
                      "block_out_channels": list(unet.config.block_out_channels),
                      "attention_head_dim": unet.config.attention_head_dim, "parameters": parameters}))


if __name__ == "__main__":
    main()
