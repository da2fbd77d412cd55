"""Probe: does the compiled GroupNorm + SiLU + activation-quantization kernel get cheaper in another layout or with
another reduction?

In the int8-compiled digits UNet the costliest generated kernels are the up blocks' GroupNorm (8 groups over 96
channels, so 12 channels a group) fused with SiLU and the next conv's activation codes, on channels-last tensors
(the layout oneDNN's int8 conv writes and reads). Inductor reduces each group with a Welford loop over masked
12-of-16-lane vectors. This probe compiles the same computation four ways and times them in one process:

* ``welford-NHWC``: the model's case (``nn.GroupNorm`` on channels-last input);
* ``welford-NCHW``: the same on contiguous input (a group is one contiguous block, the reduction unmasked);
* ``sums-NHWC`` / ``sums-NCHW``: the statistics as mean(x) and mean(x²) − mean(x)² (two plain sums instead of
  Welford), which Inductor fuses into one pass.

The uint8 codes of every variant are compared with the first (a variant that changed them would change the
integer model). Run on an otherwise idle machine and read the ratios:

    python benchmarks/groupnorm_layout.py --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from arguments import count

GROUPS, CHANNELS, SIDE = 8, 96, 16  # the digits UNet's widest up-block input at full resolution
INVERSE_STEP, ZERO_POINT = 33.7, 9.0  # a typical activation grid (codes = round(x / Δ) + z, clamped to uint8)


def _codes(y: torch.Tensor) -> torch.Tensor:
    codes = torch.clamp(torch.round(torch.nn.functional.silu(y) * INVERSE_STEP) + ZERO_POINT, 0, 255)
    return codes.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--batch", type=count, default=64)
    parser.add_argument("--repeats", type=count, default=5, help="timed rounds of 10 calls (the minimum is reported)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    norm = torch.nn.GroupNorm(GROUPS, CHANNELS).eval()

    def welford(x: torch.Tensor) -> torch.Tensor:
        return _codes(norm(x))

    def sums(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        grouped = x.reshape(n, GROUPS, c // GROUPS, h, w)
        mean = grouped.mean(dim=(2, 3, 4), keepdim=True)
        var = (grouped * grouped).mean(dim=(2, 3, 4), keepdim=True) - mean * mean
        y = ((grouped - mean) * torch.rsqrt(var + norm.eps)).reshape(n, c, h, w)
        return _codes(y * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))

    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, CHANNELS, SIDE, SIDE, generator=generator)
    inputs = {"NCHW": x, "NHWC": x.contiguous(memory_format=torch.channels_last)}
    variants = {f"{name}-{layout}": (torch.compile(fn), inputs[layout])
                for name, fn in (("welford", welford), ("sums", sums)) for layout in ("NHWC", "NCHW")}
    times, reference = {}, None
    with torch.no_grad():
        for name, (fn, inp) in variants.items():
            codes = fn(inp)
            reference = codes if reference is None else reference
            differing = int((codes.int() - reference.int()).abs().gt(0).sum())
            for _ in range(2):
                fn(inp)
            rounds = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(10):
                    fn(inp)
                rounds.append((time.perf_counter() - start) / 10 * 1000)
            times[name] = min(rounds)
            print(f"{name:14s} {times[name]:7.3f} ms   codes differing from welford-NHWC: {differing}")
    base = times["welford-NHWC"]
    print("ratios to welford-NHWC (the model's case): " + ", ".join(f"{k} {v / base:.2f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
