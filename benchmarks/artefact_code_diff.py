"""How far apart two tadq artefacts of the same model and config are: per quantized weight, the share of integer
codes that differ, and per activation quantizer the relative difference of the steps.

Why: the same ``tadq run`` command gave the text-to-image UNet's Q-Diffusion W4A8 row 30.40 dB on an AVX-512 CPU and
27.78 dB with the kernels capped at AVX2 (docs/results/t2i.md, "The same command on another CPU kind"). Whether the two
reconstructions moved a few units or landed in different optima everywhere is read off the codes. With
``--reference`` (e.g. the naive-PTQ artefact of the same preset) each layer also shows how many codes each artefact
changed from it. Reads the artefacts' ``tadq_weights.safetensors`` only (safetensors, no pickle). Run::

    python benchmarks/artefact_code_diff.py runs/t2i-blocks/models/qdiffusion-W4A8-<key> \\
        runs/t2i-w4a8-avx2/models/qdiffusion-W4A8-<key> --reference runs/t2i-blocks/models/naive-W4A8-<key>
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from arguments import count
from safetensors.torch import load_file

from tadq.io import WEIGHTS_FILE


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise SystemExit(f"{folder} is not a tadq artefact (no {WEIGHTS_FILE})")
    return load_file(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--reference", type=Path, default=None, help="a third artefact both are compared with")
    parser.add_argument("--top", type=count, default=15, help="layers listed, most different first")
    args = parser.parse_args()
    first, second = _tensors(args.first), _tensors(args.second)
    reference = None if args.reference is None else _tensors(args.reference)
    codes = [name for name in first if "codes" in name.rsplit(".", 1)[-1]]
    if not codes or set(codes) - set(second):
        raise SystemExit("the artefacts do not hold the same quantized weights (another model or config)")
    rows = []
    for name in codes:
        if first[name].shape != second[name].shape:
            raise SystemExit(f"{name}: shapes differ ({tuple(first[name].shape)} vs {tuple(second[name].shape)})")
        share = float((first[name] != second[name]).float().mean())
        moved = ("" if reference is None or name not in reference else
                 f"  from reference: {float((first[name] != reference[name]).float().mean()):.3f} / "
                 f"{float((second[name] != reference[name]).float().mean()):.3f}")
        rows.append((share, name, moved))
    rows.sort(reverse=True)
    shares = [share for share, _, _ in rows]
    print(f"{len(rows)} quantized weights; share of differing codes: median {statistics.median(shares):.3f}, "
          f"max {shares[0]:.3f}, min {shares[-1]:.3f}")
    for share, name, moved in rows[:args.top]:
        print(f"{share:.3f}  {name}{moved}")
    steps = [name for name in first if name.endswith("input_quantizer.scale") and name in second]
    if steps:
        change = sorted(((float(((first[n] - second[n]).abs() / first[n].abs().clamp_min(1e-12)).max()), n)
                         for n in steps), reverse=True)
        print(f"{len(steps)} activation steps; relative difference: median "
              f"{statistics.median(c for c, _ in change):.3f}, max {change[0][0]:.3f} ({change[0][1]})")


if __name__ == "__main__":
    main()
