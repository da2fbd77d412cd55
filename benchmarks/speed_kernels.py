"""The experiments behind the int8 kernel choice (``benchmarks/speed.py --kernels`` / ``--compiled``).

``kernel_table``: every conv/linear of the shipped model at its real input shape, per candidate implementation,
summed per forward. ``compiled_table``: eager vs ``torch.compile`` at batch 64.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

import tadq
from tadq.backends import to_backend
from tadq.backends.activations import activation_codes, activation_grid
from tadq.backends.compiled import compile_like_integer_models
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear
from tadq.backends.cuda_int8 import IntMMConv2d, IntMMLinear
from tadq.quant import preset as preset_schemes
from tadq.quant import quantize_module

BATCHES = (1, 16, 64)
REPEATS = {1: 15, 16: 7, 64: 5}


def call_of(model, fp: bool, dtype: torch.dtype):
    """x, t → ε for either kind of model (a diffusers FP model, or a QuantizedDenoiser)."""
    if fp:
        return lambda x, t: model(x.to(dtype), t).sample
    return lambda x, t: model(x, t)


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _candidates(name: str, module: nn.Module, x: torch.Tensor) -> dict:
    """The five implementations of one FP layer at input ``x`` (W8A8 grids; the input range from ``x``)."""
    weights, activations = preset_schemes("W8A8")
    fake = quantize_module(module, weights, activations)
    fake.input_quantizer.set_range(x.min().reshape(1), x.max().reshape(1))
    conv = isinstance(module, nn.Conv2d)
    onednn = (OneDNNConv2d if conv else OneDNNLinear)(fake, name)
    int_mm = (IntMMConv2d if conv else IntMMLinear)(fake, name)
    low, xb = copy.deepcopy(module).to(torch.bfloat16), x.bfloat16()
    return {"fp32": lambda: module(x), "bf16": lambda: low(xb), "fake": lambda: fake(x),
            "onednn": lambda: onednn(x), "kernel": _kernel_only(onednn, x), "int_mm": lambda: int_mm(x)}


def _kernel_only(layer: nn.Module, x: torch.Tensor):
    """The oneDNN op alone on ready uint8 codes: the integer layer minus quantizing its input and the offset term."""
    grid = activation_grid(layer.input_quantizer)
    codes = activation_codes(x, grid).to(torch.uint8)
    if isinstance(layer, OneDNNLinear):
        rows = codes.reshape(-1, layer.in_features).contiguous()
        return lambda: torch.ops.onednn.qlinear_pointwise(rows, grid.scale, int(grid.zero_point), layer.packed,
                                                          layer.w_scale, layer.w_zero, layer.bias, 1.0, 0,
                                                          torch.float32, "none", [], "")
    k, codes = layer.kernel, codes.contiguous(memory_format=torch.channels_last)
    return lambda: torch.ops.onednn.qconv2d_pointwise(codes, grid.scale, int(grid.zero_point), k.packed, k.w_scale,
                                                      k.w_zero, k.bias, *k.geometry, 1, 1.0, 0, torch.float32,
                                                      "none", [], "")


def kernel_table(model: nn.Module) -> str:
    """Every conv/linear of ``model`` at its real input shape, per candidate implementation, summed per forward.

    Candidates: float32 and bfloat16 (the FP baselines), the fake-quant layer, the int8 oneDNN layer and the
    im2col/``torch._int_mm`` layer (each integer layer timed whole: quantize input, kernel, offset correction).
    """
    shapes: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: shapes.append((n, m, tuple(a[0].shape))))
             for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    with torch.no_grad():
        model(torch.randn(1, 1, 16, 16), torch.tensor([500]))
    for hook in hooks:
        hook.remove()
    lines = ["| batch | fp32 | bf16 | fake-quant | int8 oneDNN layer | of which the oneDNN op "
             "| int8 im2col + _int_mm | layers |", "|---" * 8 + "|"]
    for batch in BATCHES:
        totals = dict.fromkeys(("fp32", "bf16", "fake", "onednn", "kernel", "int_mm"), 0.0)
        for name, module, shape in shapes:
            with torch.no_grad():
                x = torch.randn(batch, *shape[1:])  # convs: channels-last, the layout inputs have inside the model
                x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
                for key, fn in _candidates(name, module, x).items():
                    totals[key] += median_time(fn, REPEATS[batch])
        cells = " | ".join(f"{1000 * v:.1f} ms" for v in totals.values())
        lines.append(f"| {batch} | {cells} | {len(shapes)} |")
    return "\n".join(lines)


def compiled_table(model: nn.Module, scheduler, cache_dir: str) -> str:
    """Batch-64 latency of eager vs ``torch.compile`` (Inductor, freezing on: it needs the prepacked weights as
    constants) for FP fp32 and W8A8 int8, interleaved; compile seconds included (minutes on these CPUs)."""
    compile_like_integer_models()
    qmodel = tadq.quantize(model, scheduler, tadq.QuantConfig.from_preset("W8A8"), cache_dir=cache_dir,
                           progress=False)
    eager_int8, compiled_int8 = to_backend(qmodel, "int8"), to_backend(qmodel, "int8")
    x, t = torch.randn(64, 1, 16, 16), torch.full((64,), 500)
    calls = {"FP fp32": call_of(model, True, torch.float32), "W8A8 int8": call_of(eager_int8, False, torch.float32)}
    lines = []
    with torch.no_grad():
        for name in ("FP fp32", "W8A8 int8"):
            start = time.perf_counter()
            if name == "FP fp32":
                call = call_of(torch.compile(copy.deepcopy(model), dynamic=False), True, torch.float32)
            else:  # one eager call first fills each layer's grid cache, so the graph sees constants (no breaks)
                compiled_int8(x, t)
                compiled_int8.model = torch.compile(compiled_int8.model, dynamic=False)
                call = call_of(compiled_int8, False, torch.float32)
            call(x, t)
            lines.append(f"- compile {name}: {time.perf_counter() - start:.0f} s")
            calls[f"{name} compiled"] = call
        times = {name: [] for name in calls}
        for _ in range(REPEATS[64]):
            for name, call in calls.items():
                start = time.perf_counter()
                call(x, t)
                times[name].append(time.perf_counter() - start)
    lines += [f"- {name}: {1000 * statistics.median(v):.1f} ms at batch 64" for name, v in times.items()]
    return "\n".join(lines)
