"""Would a bfloat16 float epilogue make ``int8-compiled`` faster? A probe, not a backend.

The integer backends keep the float work between integer layers (GroupNorm, SiLU, residual adds, attention) in
float32, the arithmetic the model was calibrated in. On a CPU with AMX that work is most of an ``int8-compiled``
forward (docs/backends.md, the AMX profile), and the compiled bf16 FP model moves half the bytes. This probe builds
the same naive-PTQ model four ways (three integer, one FP) in one process and times them interleaved at batch 1 and
64 (median of the calls), after Inductor compiled each:

* ``int8-compiled`` as shipped (float32 float work);
* the same integer kernels returning bfloat16 (``output_dtype``) with every float module of the network in
  bfloat16 (the integer layers quantize a bf16 input; their scales and int32 sums are unchanged);
* the same integer kernels returning bfloat16, converted back to float32 for float32 float work (only the layer
  outputs' storage moves to bf16);
* the FP model in bfloat16, compiled with freezing (the baseline the issue names).

It also reports how far the bf16-epilogue model's ε moves from the float32-epilogue one (relative L2 over the
batch-64 call): the price of leaving the calibrated arithmetic. Run:

    python benchmarks/bf16_epilogue.py --threads 1 [--preset W8A8-WSYM] [--calls 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
from arguments import count, preset_name
from torch import Tensor

import tadq
from tadq.backends import check_backend
from tadq.backends.activations import traced_codes
from tadq.backends.compiled import compile_integer_model, compile_like_integer_models
from tadq.backends.cpu_int8 import OneDNNLinear, _ConvKernel
from tadq.io import load_quantized
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for

BATCHES = (1, 64)


def _conv_forward(self: _ConvKernel, x: Tensor, quantizer) -> Tensor:
    """``_ConvKernel.forward`` under ``torch.compile`` for a fixed grid, returning ``x``'s dtype (bf16)."""
    grid = self.grid(quantizer)
    codes = traced_codes(x.float(), grid).contiguous(memory_format=torch.channels_last).to(torch.uint8)
    stride, padding, dilation = self.geometry
    y = torch.ops.onednn.qconv2d_pointwise.default(codes, grid.scale, int(grid.zero_point), self.packed,
                                                   self.w_scale, self.w_zero, self.bias, stride, padding, dilation,
                                                   1, 1.0, 0, torch.bfloat16, "none", [], "")
    if self.has_offset:
        raise ValueError("the probe covers symmetric weights only (W8A8-WSYM, W4A8): drop the offset correction")
    return y.to(x.dtype)


def _linear_forward(self: OneDNNLinear, x: Tensor) -> Tensor:
    grid = self.grid(self.input_quantizer)
    rows = traced_codes(x.reshape(-1, self.in_features).float(), grid).to(torch.uint8)
    attr, algorithm = self.post_op  # a fused feed-forward GELU keeps its post-op
    y = torch.ops.onednn.qlinear_pointwise.default(rows, grid.scale, int(grid.zero_point), self.packed, self.w_scale,
                                                   self.w_zero, self.bias, 1.0, 0, torch.bfloat16, attr, [], algorithm)
    if self.has_offset:
        raise ValueError("the probe covers symmetric weights only (W8A8-WSYM, W4A8): drop the offset correction")
    return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def bf16_epilogue_model(folder: Path, float_work: torch.dtype = torch.bfloat16):
    """The artefact at ``folder`` on ``int8`` with bf16 integer-layer outputs and ``float_work`` float modules, then
    compiled as ``int8-compiled`` is."""
    model, _ = load_quantized(folder, backend="int8")
    for module in model.model.modules():
        if isinstance(module, _ConvKernel):
            module.forward = types.MethodType(_conv_forward, module)
        elif isinstance(module, OneDNNLinear):
            module.forward = types.MethodType(_linear_forward, module)
        elif float_work == torch.bfloat16:  # integer layers keep their float32 scales and bias: only float
            # modules' own parameters move
            for parameter in module.parameters(recurse=False):
                parameter.data = parameter.data.to(torch.bfloat16)
    compile_integer_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=preset_name, default="W8A8-WSYM",
                        help="a preset with symmetric weights (naive PTQ)")
    parser.add_argument("--calls", type=count, default=20)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache")
    args = parser.parse_args()
    config = tadq.QuantConfig.from_preset(args.preset)  # an unknown preset is refused before any work
    check_backend("int8-compiled")
    torch.set_num_threads(args.threads)
    compile_like_integer_models()
    fp32, scheduler = load_pipeline_parts(None)
    shape = adapter_for(fp32).sample_shape(fp32)
    qmodel = tadq.quantize(fp32, scheduler, config, cache_dir=args.cache_dir, progress=False)
    folder = Path(tempfile.mkdtemp(prefix="tadq-bf16-epilogue-")) / args.preset
    qmodel.save_pretrained(folder, scheduler)
    shipped, _ = load_quantized(folder, backend="int8-compiled")
    bf16_epilogue = bf16_epilogue_model(folder)
    bf16_outputs = bf16_epilogue_model(folder, torch.float32)
    fp_bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    fp_bf16.compile()
    calls = {"int8-compiled (fp32 float work)": lambda x, t: shipped(x, t),
             "int8-compiled, bf16 float work": lambda x, t: bf16_epilogue(x.to(torch.bfloat16), t).float(),
             "int8-compiled, bf16 layer outputs, fp32 float work": lambda x, t: bf16_outputs(x, t),
             "FP bf16 compiled": lambda x, t: fp_bf16(x.to(torch.bfloat16), t).sample.float()}
    generator = torch.Generator().manual_seed(args.seed)
    report: dict = {"preset": args.preset, "threads": args.threads, "calls": args.calls, "ms": {}}
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, *shape, generator=generator)
            t = torch.randint(0, 1000, (batch,), generator=generator)
            outputs = {name: [call(x, t) for _ in range(3)][-1] for name, call in calls.items()}  # compile, warm up
            times: dict[str, list[float]] = {name: [] for name in calls}
            for _ in range(args.calls):
                for name, call in calls.items():
                    start = time.perf_counter()
                    call(x, t)
                    times[name].append(time.perf_counter() - start)
            report["ms"][batch] = {name: 1000 * statistics.median(values) for name, values in times.items()}
            reference = outputs["int8-compiled (fp32 float work)"]
            report[f"relative_l2_vs_fp32_float_work_b{batch}"] = {
                name: float((out - reference).norm() / reference.norm()) for name, out in outputs.items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
