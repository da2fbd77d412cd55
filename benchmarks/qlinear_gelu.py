"""Probe: a transformer feed-forward's GELU inside the int8 linear (a oneDNN post-op) against after it, on this CPU.

A profile of the shipped DiT under ``int8-compiled`` (``benchmarks/profile_compiled.py --model dit --batch 512``;
docs/backends.md) spends about as long in the float32 GELU (tanh) after each feed-forward's first linear, fused
with the activation quantization by Inductor, as in all its int8 linears together. oneDNN's ``qlinear_pointwise``
can apply the GELU to its float32 output itself (``attr="gelu"``, ``algorithm="tanh"``). This probe times, at the
DiT's first feed-forward linear (rows = batch × tokens, 128 → 512): the int8 linear alone, the linear then
``F.gelu(approximate="tanh")`` (what tadq runs eagerly), and the linear with the GELU post-op, and reports how far
the post-op's GELU lies from torch's. Then, under ``torch.compile``, the GELU that follows W8A8's offset
correction (oneDNN takes no GELU post-op after an added tensor) with the next layer's activation quantization fused
in, as Inductor generates it in the integer model: torch's tanh GELU against the library's exp form of the same
function (``gelu_tanh_by_exp``), and the quantization alone. Not part of the library: a measurement for deciding.
Run::

    python benchmarks/qlinear_gelu.py --threads 1 [--rows 8192] [--calls 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import functools

import torch
import torch.nn.functional as F
from arguments import count
from speed_kernels import median_time

from tadq.backends import cpu_summary
from tadq.backends.cpu_int8 import gelu_tanh_by_exp
from tadq.quant.fake_quant import kernel_codes

IN_FEATURES, OUT_FEATURES = 128, 512  # the shipped DiT's feed-forward: inner dim 4 × 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--rows", type=count, default=8192, help="batch × tokens (512 × 16 in the DiT profile)")
    parser.add_argument("--calls", type=count, default=30)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the compiled GELU + quantization kernels (the offset path)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = torch.randint(-127, 128, (OUT_FEATURES, IN_FEATURES), dtype=torch.int8, generator=generator)
    packed = torch.ops.onednn.qlinear_prepack(weights, None)
    w_scale = torch.full((OUT_FEATURES,), 2e-3)
    w_zero = torch.zeros(OUT_FEATURES, dtype=torch.int64)
    bias = torch.randn(OUT_FEATURES, generator=generator) * 0.01
    codes = torch.randint(0, 256, (args.rows, IN_FEATURES), dtype=torch.uint8, generator=generator)

    def linear(attr: str = "none", algorithm: str = "") -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise.default(codes, 0.02, 7, packed, w_scale, w_zero, bias, 1.0, 0,
                                                           torch.float32, attr, [], algorithm)

    def after() -> torch.Tensor:
        return F.gelu(linear(), approximate="tanh")

    def inside() -> torch.Tensor:
        return linear("gelu", "tanh")

    print(f"CPU: {cpu_summary()}")
    print(f"rows {args.rows}, {IN_FEATURES} → {OUT_FEATURES}, threads {args.threads}, median of {args.calls} calls")
    times = {name: 1000 * median_time(call, args.calls) for name, call in
             (("int8 linear alone", linear), ("linear, then F.gelu (tanh)", after), ("GELU as post-op", inside))}
    for name, ms in times.items():
        print(f"| {name} | {ms:.3f} ms |")
    reference, fused = after(), inside()
    difference = (reference - fused).abs()
    print(f"post-op GELU vs F.gelu: max |difference| {float(difference.max()):.3g} over outputs up to "
          f"{float(reference.abs().max()):.3g} (float32 ulp at 1: {torch.finfo(torch.float32).eps:.3g})")
    if args.compile:
        _compiled_gelus(linear(), args.calls)


def _compiled_gelus(y: torch.Tensor, calls: int) -> None:
    """The float32 GELU + next-layer quantization kernels Inductor generates, for each GELU form."""
    inverse, zero = 1 / float(y.abs().max() / 127), 128.0  # a symmetric-ish 8-bit grid over y's range

    def quantized(form):
        return torch.compile(lambda t: kernel_codes(form(t), inverse, zero, 0, 255).to(torch.uint8))

    forms = {"torch's tanh GELU + quantize": lambda t: F.gelu(t, approximate="tanh"),
             "exp form (gelu_tanh_by_exp) + quantize": gelu_tanh_by_exp, "quantize alone": lambda t: t}
    with torch.no_grad():
        for name, form in forms.items():
            print(f"| compiled: {name} | {1000 * median_time(functools.partial(quantized(form), y), calls):.3f} ms |")


if __name__ == "__main__":
    main()
