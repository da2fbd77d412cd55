"""Probe: W8A8's asymmetric-weight offset correction inside the int8 convolution (tadq's way) against a sum-pool.

With asymmetric 8-bit weights every integer conv adds ``−o_c·Δw_c·Δx·Σ_window Σ_c (codes − z)``. tadq computes the
window sum in the conv itself: one more output channel of int8 ones (Δw = 1, bias 0) in the prepacked weight, so
oneDNN returns ``Δx·Σ_window (codes − z)`` from its exact int32 sums and the correction is a broadcast multiply-add
on the output (``ones``). The alternatives: the same channel padded with zero channels to a multiple of 16, the tile
width (``ones16``), and what tadq did before, a channel sum of the codes and a sum pool over each window, fused by
Inductor into the kernels around the conv (``sum-pool``), and that channel sum taken from the uint8 codes the conv
reads (``sum-u8``: the float codes ``sum-pool`` sums were written out as a float tensor of their own, read in the
generated code with ``TORCH_LOGS=output_code``).

Each variant runs in a fresh process (its own compile), the variants alternate over ``--rounds`` rounds; per call
latency at batch 16 and 64 after warm-up, and the relative L2 distance of ε from the fake-quant model's (the
rounding order of the offset term differs). Not part of the library: a measurement for deciding. Run::

    python benchmarks/offset_in_kernel.py --threads 1 [--rounds 3] [--variants ones,sum-u8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arguments import count

VARIANTS = ("ones", "sum-pool", "ones16", "sum-u8")
BATCHES = (16, 64)


def _install(variant: str) -> None:
    """Patch ``_ConvKernel`` before any model is converted: ``ones`` is the library as it is (one ones channel);
    ``ones16`` pads that channel with zero channels to a multiple of 16; ``sum-pool`` is the correction tadq used
    before (no extra channel: a channel sum of the codes, a sum pool over each window, a multiply-add); ``sum-u8``
    the same with the channel sum read from the uint8 codes."""
    import torch
    import torch.nn.functional as F

    from tadq.backends import cpu_int8

    if variant == "ones":
        return
    original_init, original_forward = cpu_int8._ConvKernel.__init__, cpu_int8._ConvKernel.forward

    def init(self, codes, bias, conv, name):
        original_init(self, codes, bias, conv, name)
        if not self.has_offset:
            return
        extra = 16 - codes.codes.shape[0] % 16 if variant == "ones16" else 0
        rows = torch.zeros((extra, *codes.codes.shape[1:]), dtype=torch.int8)
        if extra:
            rows[0] = 1
        scale = torch.cat([codes.scale, codes.scale.new_ones(extra)])
        stride, padding, dilation = self.geometry
        self.packed = torch.ops.onednn.qconv_prepack(torch.cat([codes.codes, rows]), scale, 1.0, 0, stride, padding,
                                                     dilation, 1, None)
        self.w_scale, self.w_zero = scale, torch.zeros(scale.numel(), dtype=torch.int64)
        if bias is not None:
            self.bias = torch.cat([bias.detach().float(), bias.new_zeros(extra)])
        self.kernel_size, self.in_channels = tuple(conv.kernel_size), codes.codes.shape[1]
        self.out_channels = codes.codes.shape[0]

    def forward(self, x, quantizer):
        if not self.has_offset:
            return original_forward(self, x, quantizer)
        grid = self.grid(quantizer)
        # the model is only run compiled; traced_codes is made of pure ops, so this also holds run eagerly
        values = cpu_int8.traced_codes(x, grid).contiguous(memory_format=torch.channels_last)
        stride, padding, dilation = self.geometry
        codes = values.to(torch.uint8)
        y = torch.ops.onednn.qconv2d_pointwise.default(codes, grid.scale, cpu_int8._zero(grid), self.packed,
                                                       self.w_scale, self.w_zero, self.bias, stride, padding,
                                                       dilation, 1, 1.0, 0, torch.float32, "none", [], "")
        channels = self.out_channels
        if variant == "ones16":
            return y[:, :channels] + y[:, channels:channels + 1] * self.neg_offset_scale
        summed = codes.sum(dim=1, keepdim=True, dtype=torch.int32).float() if variant == "sum-u8" \
            else values.sum(dim=1, keepdim=True)  # exact integers either way
        centred = summed - self.in_channels * grid.zero_point
        sums = F.avg_pool2d(centred, self.kernel_size, stride, padding, count_include_pad=True, divisor_override=1)
        return y + sums * (self.neg_offset_scale * grid.scale)

    cpu_int8._ConvKernel.__init__, cpu_int8._ConvKernel.forward = init, forward


def measure(variant: str, folder: str, calls: int, threads: int) -> dict[str, float]:
    """One variant in this process: ms per call at each batch, and ε's relative distance from fake-quant."""
    import torch

    from tadq.io import load_quantized

    torch.set_num_threads(threads)
    _install(variant)
    model, _ = load_quantized(folder, backend="int8-compiled")
    fake, _ = load_quantized(folder, backend="fake")
    generator = torch.Generator().manual_seed(0)
    result: dict[str, float] = {}
    for batch in BATCHES:
        x = torch.randn(batch, 1, 16, 16, generator=generator)
        t = torch.full((batch,), 500)
        for _ in range(4):
            eps = model(x, t)
        start = time.perf_counter()
        for _ in range(calls):
            model(x, t)
        result[f"b{batch} ms"] = 1000 * (time.perf_counter() - start) / calls
        with torch.no_grad():
            reference = fake(x, t)
        result[f"b{batch} rel. L2 vs fake"] = float((eps - reference).norm() / reference.norm())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--calls", type=count, default=30)
    parser.add_argument("--rounds", type=count, default=3)
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.folder, args.calls, args.threads)))
        return
    variants = tuple(args.variants.split(","))
    if unknown := [variant for variant in variants if variant not in VARIANTS]:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    import tadq
    from tadq.models import load_pipeline_parts

    fp32, scheduler = load_pipeline_parts(None)
    qmodel = tadq.quantize(fp32, scheduler, tadq.QuantConfig.from_preset("W8A8"), cache_dir=args.cache_dir,
                           progress=False)
    folder = Path(tempfile.mkdtemp(prefix="tadq-offset-")) / "W8A8"
    qmodel.save_pretrained(folder, scheduler)
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):
        for variant in variants:
            print(f"round {round_index + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--child", variant, "--folder", str(folder),
                                   "--threads", str(args.threads), "--calls", str(args.calls)],
                                  check=True, capture_output=True, text=True)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = list(runs[variants[0]][0])
    print(f"W8A8 naive PTQ, int8-compiled, threads {args.threads}, {args.rounds} rounds (each value: every round, "
          "then the median)")
    print("| offset correction | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for variant, results in runs.items():
        cells = []
        for column in columns:
            values = [r[column] for r in results]
            digits = 2 if column.endswith("ms") else 5
            median = statistics.median(values)
            cells.append(", ".join(f"{v:.{digits}f}" for v in values) + f" (median {median:.{digits}f})")
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
