"""Are this CPU's oneDNN u8·s8 kernels exact, for which weight codes, and how fast are they against fp32 and bf16?

Without VNNI/AMX oneDNN multiplies with ``vpmaddubsw``, which adds two u8·s8 products into a saturating 16-bit lane,
so a sum can be wrong without a word. This script measures, through the very ops the ``int8`` backend calls
(``torch.ops.onednn.qconv2d_pointwise`` / ``qlinear_pointwise``), the largest error against the exact integer sum
for weight codes within ±b (random codes and the worst case: every activation 255, every weight +b or −b), and
times one 3×3 convolution per shape of the shipped digits UNet in fp32, bf16 and int8 (median of the repeats, one
thread). Float convolutions are timed in both layouts: oneDNN's fp32 kernels are up to 2× faster on channels-last
inputs (the layout Inductor gives a compiled model) than on the NCHW tensors an eager diffusers model passes, and the
int8 kernel is fed channels-last codes, as both integer backends feed it; the ratios are against the faster float
layout. docs/backends.md ("CPUs without VNNI or AMX") has the numbers.

    python benchmarks/int8_exactness.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import torch.nn.functional as F
from arguments import count
from speed_kernels import median_time

from tadq.backends import cpu_summary, int8_cpu_missing
from tadq.backends.capability import has_onednn, unit_scale_int8_conv, unit_scale_int8_linear

BOUNDS = (127, 65, 64, 15)
SHAPES = ((64, 32, 16, 32), (64, 64, 8, 64), (64, 64, 16, 64))  # batch, channels in, side, channels out


def worst_error(bound: int, generator: torch.Generator) -> float:
    """Largest |kernel − exact| over random and extreme codes with weights within ±``bound``."""
    worst = 0.0
    cases = [(torch.randint(0, 256, (4, 64, 8, 8), generator=generator, dtype=torch.uint8),
              torch.randint(-bound, bound + 1, (32, 64, 3, 3), generator=generator, dtype=torch.int8))]
    cases += [(torch.full((1, 64, 8, 8), 255, dtype=torch.uint8), torch.full((32, 64, 3, 3), sign * bound,
                                                                              dtype=torch.int8)) for sign in (1, -1)]
    for activations, weights in cases:
        exact = F.conv2d(activations.double(), weights.double(), padding=1)
        got = unit_scale_int8_conv(weights, 1)(activations)
        worst = max(worst, float((got.double() - exact).abs().max()))
        rows, matrix = activations.permute(0, 2, 3, 1).reshape(-1, 64), weights[:, :, 1, 1].contiguous()
        exact = rows.double() @ matrix.double().T
        worst = max(worst, float((unit_scale_int8_linear(matrix)(rows).double() - exact).abs().max()))
    return worst


def _float_conv(x: torch.Tensor, w: torch.Tensor):
    return lambda: F.conv2d(x, w, padding=1)


def _median_ms(call, repeats: int) -> float:
    for _ in range(2):  # three warm-ups with median_time's own: oneDNN builds its primitive on the first call
        call()
    return 1000 * median_time(call, repeats)


def _float_ms(x: torch.Tensor, w: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(NCHW ms, channels-last ms) of one float conv."""
    last = torch.channels_last
    return (_median_ms(_float_conv(x, w), repeats),
            _median_ms(_float_conv(x.contiguous(memory_format=last), w.contiguous(memory_format=last)), repeats))


def conv_times(repeats: int, generator: torch.Generator) -> list[tuple[tuple[int, ...], tuple[float, float],
                                                                       tuple[float, float], float]]:
    """(shape, fp32 ms (NCHW, NHWC), bf16 ms (NCHW, NHWC), int8 ms) per shape; int8 on channels-last codes with
    4-bit-range weights (exact on every CPU)."""
    rows = []
    for batch, channels, side, out in SHAPES:
        x = torch.randn(batch, channels, side, side, generator=generator)
        w = torch.randn(out, channels, 3, 3, generator=generator)
        codes = torch.randint(0, 256, x.shape, generator=generator, dtype=torch.uint8)
        codes = codes.contiguous(memory_format=torch.channels_last)
        weights = torch.randint(-8, 8, w.shape, generator=generator, dtype=torch.int8)
        rows.append(((batch, channels, side, out), _float_ms(x, w, repeats),
                     _float_ms(x.bfloat16(), w.bfloat16(), max(3, repeats // 5)),
                     _median_ms(functools.partial(unit_scale_int8_conv(weights, 1), codes), repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--repeats", type=count, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not has_onednn():  # kernels that exist but are not exact are what this script is for: only no oneDNN stops it
        parser.error(int8_cpu_missing() or "no oneDNN")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    print("CPU:", json.dumps(cpu_summary(), ensure_ascii=False))
    print("\n| weight codes within | max abs error vs the exact integer sum |\n|---|---|")
    with torch.no_grad():
        for bound in BOUNDS:
            print(f"| ±{bound} | {worst_error(bound, generator):.0f} |")
        print("\n| conv 3×3 (batch, C_in, side, C_out) | fp32 ms NCHW / NHWC | bf16 ms NCHW / NHWC | int8 ms NHWC "
              "| int8 vs best fp32 | int8 vs best bf16 |")
        print("|---|---|---|---|---|---|")
        for shape, fp32, bf16, int8 in conv_times(args.repeats, generator):
            print(f"| {shape} | {fp32[0]:.2f} / {fp32[1]:.2f} | {bf16[0]:.2f} / {bf16[1]:.2f} | {int8:.2f} "
                  f"| {min(fp32) / int8:.2f}× | {min(bf16) / int8:.2f}× |")


if __name__ == "__main__":
    main()
