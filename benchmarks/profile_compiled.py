"""Where a compiled forward's time goes: the shipped model compiled as FP (fp32/bf16) or as an integer model.

Each variant is built in this process, compiled (Inductor, freezing), warmed up, timed over ``--calls`` calls at
batch ``--batch``, then profiled (``torch.profiler``, CPU) over ``--profiled`` calls; the self time of each op is
summed into the groups below, in ms per forward. Run each variant in its own process (one compile each) on an
otherwise idle machine, and compare shares rather than absolute times across runs:

    python benchmarks/profile_compiled.py --variant bf16 --threads 1
    python benchmarks/profile_compiled.py --variant W8A8-WSYM --threads 1    # any preset: naive PTQ, int8-compiled
    python benchmarks/profile_compiled.py --variant W8A8-WSYM --threads 1 --per-kernel 20   # the 20 costliest ops
    python benchmarks/profile_compiled.py --model dit --batch 512 --variant W8A8 --threads 1 --per-kernel 20

``--model`` takes a shipped name as ``tadq run --model`` does (default: the digits UNet); a class-conditional model
is called with the workload's evaluation labels for the batch's rows (one denoiser call: no guidance doubling).

The integer variants are naive PTQ (``QuantConfig.from_preset``), as in ``benchmarks/speed.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from arguments import count, count_or_zero
from common import save_naive_ptq

import tadq
from tadq.backends import check_backend
from tadq.backends.compiled import compile_like_integer_models
from tadq.experiments.workload import load_workload
from tadq.io import load_quantized
from tadq.registry import adapter_for

GROUPS = (  # (group, op-name fragments), first match wins
    ("Inductor-generated kernels", ("cpp_fused",)),  # with --per-kernel each kernel is its own event, named by the
    # aten ops it fuses (which may include "qconv"): matched before the op groups
    ("convolutions", ("convolution", "qconv")),
    ("linears and matmuls", ("linear", "aten::bmm", "aten::mm", "aten::addmm")),
    ("attention core (SDPA)", ("scaled_dot_product",)),
    ("Inductor-generated kernels", ("## Call CompiledFxGraph",)),
    ("guard evaluation", ("TorchDynamo Cache Lookup",)),
)
FP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def group_of(op_name: str) -> str:
    """The group an op's self time is counted in (``other`` when no fragment matches)."""
    for group, fragments in GROUPS:
        if any(fragment in op_name for fragment in fragments):
            return group
    return "other"


def _labels(cond) -> dict:
    """The diffusers keyword of a class-conditional call (none for an unconditional model)."""
    return {} if cond is None else {"class_labels": cond.class_labels}


def _build(variant: str, cache_dir: str, workload):
    """(x, t, cond) → ε of the compiled variant and the shape of one input sample."""
    fp32 = workload.model
    shape = adapter_for(fp32).sample_shape(fp32)
    if variant in FP_DTYPES:
        dtype = FP_DTYPES[variant]
        model = copy.deepcopy(fp32).to(dtype)
        model.compile()
        return (lambda x, t, cond: model(x.to(dtype), t, **_labels(cond)).sample), shape
    folder = Path(tempfile.mkdtemp(prefix="tadq-profile-"))
    save_naive_ptq(workload, [variant], folder, cache_dir)
    model, _ = load_quantized(folder / variant, backend="int8-compiled")
    return (lambda x, t, cond: model(x, t, cond)), shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", required=True, help="fp32, bf16 (FP, compiled) or a preset (int8-compiled)")
    parser.add_argument("--model", default=None, help="a shipped model (digits, photos, dit, t2i); default: digits")
    parser.add_argument("--batch", type=count, default=64)
    parser.add_argument("--calls", type=count, default=10, help="timed calls (after three warm-up calls)")
    parser.add_argument("--profiled", type=count, default=5, help="profiled calls")
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache")
    parser.add_argument("--per-kernel", type=count_or_zero, default=0, metavar="N",
                        help="also list the N ops with the most self time, each Inductor-generated kernel on its own "
                             "(Inductor's per-kernel profiling, named by the aten ops it fuses)")
    args = parser.parse_args()
    if args.variant not in FP_DTYPES:
        tadq.QuantConfig.from_preset(args.variant)  # an unknown preset is refused before any work
        check_backend("int8-compiled")
    torch.set_num_threads(args.threads)
    compile_like_integer_models()  # the FP variants compile as int8-compiled does
    if args.per_kernel:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
        inductor_config.cpp.descriptive_names = "original_aten"
    workload = load_workload(args.model)
    conditions = workload.evaluation_conditions
    cond = None if conditions is None else conditions(args.seed, range(args.batch))
    if cond is not None and cond.class_labels is None:  # before quantizing and compiling
        parser.error(f"{args.model} is conditioned by prompts, which this probe does not encode; profile an "
                     "unconditional or class-conditional model (digits, photos, dit)")
    call, shape = _build(args.variant, args.cache_dir, workload)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, *shape, generator=generator)
    t = torch.randint(0, 1000, (args.batch,), generator=generator)
    with torch.no_grad():
        for _ in range(3):
            call(x, t, cond)
        start = time.perf_counter()
        for _ in range(args.calls):
            call(x, t, cond)
        per_call_ms = 1000 * (time.perf_counter() - start) / args.calls
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(args.profiled):
                call(x, t, cond)
    groups: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        groups[group_of(event.key)] += event.self_cpu_time_total / 1000 / args.profiled
    report = {"model": args.model or "digits", "variant": args.variant, "batch": args.batch, "threads": args.threads,
              "timed_ms_per_call": per_call_ms,
              "profiled_ms_per_call": sum(groups.values()), "groups_ms_per_call": dict(groups)}
    if args.per_kernel:
        events = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:args.per_kernel]
        report["top_ops_ms_per_call"] = [(event.key, event.self_cpu_time_total / 1000 / args.profiled)
                                         for event in events]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
