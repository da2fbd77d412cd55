"""Probe: what W8A8's window sum costs inside the int8 convolution, per layer shape, on this CPU.

tadq's ``int8`` backend computes the asymmetric-weight offset's window sum Σ_window (codes − z) as one more output
channel of int8 ones in each convolution (C_out + 1 channels). A profile on an AVX-512 VNNI EPYC found W8A8's
convolutions 1.65× slower than W8A8-WSYM's (docs/backends.md). This probe times, at 3×3 conv shapes like the
shipped digits model's (batch 64, channels-last uint8 codes, one oneDNN call each): the plain conv (C_out), the conv
with the ones channel (C_out + 1), and a separate one-channel conv of ones (the window sum alone), so the extra
channel can be set against a second, tiny kernel. Not part of the library: a measurement for deciding. Run::

    python benchmarks/window_sum_conv.py --threads 1 [--calls 50]
"""

from __future__ import annotations

import argparse

import torch
from arguments import count
from speed_kernels import median_time

from tadq.backends import cpu_summary
from tadq.backends.capability import unit_scale_int8_conv

# (C_in, C_out, side): like the digits UNet's 3×3 convs (channels 32/64/64 at 16/8/4; skips concatenated)
SHAPES = ((32, 32, 16), (64, 32, 16), (32, 64, 8), (64, 64, 8), (128, 64, 8), (64, 64, 4), (128, 64, 4))


def _median_ms(call, codes: torch.Tensor, calls: int) -> float:
    for _ in range(2):  # three warm-ups with median_time's own: oneDNN builds its primitive on the first call
        call(codes)
    return 1000 * median_time(lambda: call(codes), calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--calls", type=count, default=50)
    parser.add_argument("--batch", type=count, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"CPU: {cpu_summary()}")
    print(f"batch {args.batch}, threads {args.threads}, median of {args.calls} calls, ms")
    print("| C_in → C_out, side | C_out | C_out + 1 (ones channel) | ratio | 1-channel conv alone "
          "| C_out + separate |")
    print("|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0]
    for c_in, c_out, side in SHAPES:
        weights = torch.randint(-127, 128, (c_out, c_in, 3, 3), dtype=torch.int8, generator=generator)
        ones = torch.ones((1, c_in, 3, 3), dtype=torch.int8)
        codes = torch.randint(0, 256, (args.batch, c_in, side, side), dtype=torch.uint8, generator=generator)
        codes = codes.contiguous(memory_format=torch.channels_last)
        plain = _median_ms(unit_scale_int8_conv(weights, 1), codes, args.calls)
        widened = _median_ms(unit_scale_int8_conv(torch.cat([weights, ones]), 1), codes, args.calls)
        alone = _median_ms(unit_scale_int8_conv(ones, 1), codes, args.calls)
        totals = [totals[0] + plain, totals[1] + widened, totals[2] + plain + alone]
        print(f"| {c_in} → {c_out}, {side}×{side} | {plain:.3f} | {widened:.3f} | {widened / plain:.2f}× | "
              f"{alone:.3f} | {plain + alone:.3f} |")
    print(f"| sum | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] / totals[0]:.2f}× | | {totals[2]:.3f} |")


if __name__ == "__main__":
    main()
