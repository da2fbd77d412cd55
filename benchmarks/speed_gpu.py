"""Speed of integer execution on a CUDA GPU: FP fp32/bf16/fp16, fake-quant and ``int8-cuda``, in ONE run.

Two phases, so the GPU time goes to measuring only:

    python benchmarks/speed_gpu.py --prepare [--model digits] [--presets W8A8,W4A8] --artefacts DIR   # on a CPU
    python benchmarks/speed_gpu.py [--model digits] --artefacts DIR --out runs/bench-speed-gpu          # on the GPU

``--prepare`` quantizes each preset by naive PTQ with the calibration set ``benchmarks/speed.py`` uses and saves one
artefact per preset under DIR (the same models as the CPU speed table). The GPU phase loads each artefact on the
``fake`` and ``int8-cuda`` backends and the FP model in fp32, bf16 and fp16, all on the GPU, and measures, variants
interleaved: denoiser latency per batch (median of the repeats, synchronised; unconditional models only), DDIM-50
sampling of ``--samples`` samples in one batch (the workload's conditions and guidance), the extra GPU memory one
batch-64 call allocates beyond the weights, the weights held, load time (artefact → backend → GPU), and the PSNR of
int8-cuda against fake-quant samples from the same noise and of each against FP fp32. TF32 is switched off so
"fp32" is fp32 and the fake-quant reference is the exact simulation. ``--compile`` adds the
FP bf16 model and each int8-cuda model under ``torch.compile`` (``--compile-mode``; default: Inductor's default
mode). ``--kernels`` (unconditional models) adds the per-layer comparison the issue asks for: each conv and linear
of the FP model at batch 64 as a bf16 op, an fp32 op, the int8-cuda layer (activation quantization + im2col +
``torch._int_mm`` + epilogue) and the int8 GEMM alone. The GPU check that runs all of it: benchmarks/gpu_check.sh.
Writes ``speed_gpu.json`` and ``speed_gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, count_list, output_folder, preset_names
from common import save_naive_ptq
from torch import nn

import tadq
from tadq.backends import check_backend, held_weight_bytes
from tadq.backends.cuda_int8 import IntMMConv2d, IntMMLinear
from tadq.device import resolve_device
from tadq.experiments.workload import load_workload
from tadq.fsguard import check_output_dir
from tadq.io import load_quantized
from tadq.metrics.image import psnr_per_sample
from tadq.quant import preset as preset_schemes
from tadq.quant import quantize_module
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text

SAMPLER = SamplerConfig(kind="ddim", num_steps=50, eta=0.0)
REPEATS = 10
_START = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[speed-gpu {time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def prepare(model: str | None, presets: list[str], folder: Path, cache_dir: str) -> None:
    """Quantize each preset (naive PTQ, speed.py's calibration) and save it as ``folder/PRESET``."""
    save_naive_ptq(load_workload(model), presets, folder, cache_dir,
                   announce=lambda preset: _progress(f"quantizing {preset}"), overwrite=True)


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` synchronised calls."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fp_call(model: nn.Module, dtype: torch.dtype):
    return lambda x, t: model(x.to(dtype), t).sample


def _latency(calls: dict, batches: list[int], shape: tuple[int, ...], device: torch.device, first: dict) -> dict:
    """Median ms per call at each batch; variants interleaved within each repeat round."""
    generator = torch.Generator().manual_seed(0)
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in batches} for name in calls}
    with torch.no_grad():
        for batch in batches:
            x = torch.randn(batch, *shape, generator=generator).to(device)
            t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
            _progress(f"latency, batch {batch}")
            for name, call in calls.items():
                first[name] = first.get(name, 0.0) + _timed(lambda call=call, x=x, t=t: call(x, t), 1)  # warm-up
            for _ in range(REPEATS):
                for name, call in calls.items():
                    times[name][batch].append(_timed(lambda call=call, x=x, t=t: call(x, t), 1))
    return {name: {b: 1000 * statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def _extra_memory(call, shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes one batch-64 call allocates beyond what is resident before it (activations, workspaces)."""
    x, t = torch.randn(64, *shape, device=device), torch.full((64,), 500, device=device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        call(x, t)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def _kernel_table(fp32: nn.Module, shape: tuple[int, ...], device: torch.device) -> tuple[list[dict], str]:
    """Each conv/linear of the FP model at batch 64 (its real inputs at t = 500): bf16, fp32, int8-cuda layer, GEMM."""
    inputs: dict[str, torch.Tensor] = {}
    gemm_rows: dict[str, int] = {}  # the int8 GEMM's M: output positions (a strided conv has fewer than its input)

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:  # returns None: output unchanged
            inputs.setdefault(name, args[0].detach())
            channels = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
            gemm_rows.setdefault(name, output.numel() // channels)
        return hook

    hooks = [module.register_forward_hook(keep(name))
             for name, module in fp32.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        fp32(torch.randn(64, *shape, generator=torch.Generator().manual_seed(3)).to(device),
             torch.full((64,), 500, device=device))
    for hook in hooks:
        hook.remove()
    weights, activations = preset_schemes("W8A8")
    rows = []
    with torch.no_grad():
        for name, x in inputs.items():
            module = fp32.get_submodule(name)
            conv = isinstance(module, nn.Conv2d)
            if conv and module.groups != 1:
                continue
            fake = quantize_module(copy.deepcopy(module).cpu(), weights, activations)
            fake.input_quantizer.set_range(x.min().reshape(1).cpu(), x.max().reshape(1).cpu())
            integer = (IntMMConv2d if conv else IntMMLinear)(fake, name).to(device)
            low, xb = copy.deepcopy(module).to(torch.bfloat16), x.bfloat16()
            kernel = integer.conv.kernel if conv else integer.kernel
            k = kernel.weight.shape[1]
            a = torch.randint(-128, 127, (max(gemm_rows[name], 17), k), dtype=torch.int8, device=device)
            found = {
                "bf16": _timed(lambda low=low, xb=xb: low(xb), 20),
                "fp32": _timed(lambda module=module, x=x: module(x), 20),
                "int8 layer": _timed(lambda integer=integer, x=x: integer(x), 20),
                "int8 GEMM only": _timed(lambda a=a, w=kernel.weight: torch._int_mm(a, w.t()), 20),
            }
            rows.append({"layer": name, "kind": "conv" if conv else "linear", "input": list(x.shape),
                         **{key: 1000 * value for key, value in found.items()}})
    totals = {key: sum(r[key] for r in rows) for key in ("bf16", "fp32", "int8 layer", "int8 GEMM only")}
    faster = sum(r["int8 layer"] < r["bf16"] for r in rows)
    text = "\n".join([
        "| layers | bf16 ms | fp32 ms | int8-cuda layer ms | int8 GEMM alone ms |", "|---|---|---|---|---|",
        f"| all {len(rows)} (sum) | {totals['bf16']:.3f} | {totals['fp32']:.3f} | {totals['int8 layer']:.3f} | "
        f"{totals['int8 GEMM only']:.3f} |", "",
        f"int8-cuda layer faster than bf16 in {faster} of {len(rows)} layers."])
    return rows, text


def _failure(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"


def _sampling(models: dict, workload, samples: int, sampler: SamplerConfig, failed: dict[str, str]
              ) -> tuple[dict, dict]:
    """Seconds and images of each variant's run from the same noise; a variant that raises (e.g. a compile mode
    this torch cannot run) is recorded in ``failed`` with the reason, and the other rows are still measured."""
    seconds, images = {}, {}
    for name, model in models.items():
        if name in failed:
            continue
        _progress(f"DDIM-{sampler.num_steps}: {name}")
        try:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = tadq.sample(model, workload.scheduler, sampler, num_samples=samples, seed=1000,
                                 batch_size=samples, progress=False, conditions=workload.evaluation_conditions,
                                 guidance_scale=workload.guidance_scale)
            torch.cuda.synchronize()
        except RuntimeError as error:
            failed[name] = _failure(error)
            continue
        seconds[name] = time.perf_counter() - start
        with torch.no_grad():
            images[name] = workload.images(result.images.float().cpu())
    return seconds, images


def measure(args) -> None:
    device = resolve_device("cuda")  # refused here, with the reason, on a machine without CUDA
    check_backend("int8-cuda")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    presets = args.presets.split(",")
    for preset in presets:
        if not (args.artefacts / preset / "tadq_config.json").is_file():
            raise SystemExit(f"{args.artefacts / preset} is not a tadq artefact: run --prepare first")
    workload = load_workload(args.model)
    conditional = workload.evaluation_conditions is not None
    fp32 = workload.model.to(device)
    shape = tuple(adapter_for(fp32).sample_shape(fp32))
    fp_bytes = 4 * sum(p.numel() for p in fp32.parameters())
    models: dict[str, nn.Module] = {"FP fp32": fp32}
    calls = {"FP fp32": _fp_call(fp32, torch.float32)}
    info: dict[str, dict] = {"FP fp32": {}}
    for name, dtype in (("FP bf16", torch.bfloat16), ("FP fp16", torch.float16)):
        models[name] = copy.deepcopy(fp32).to(dtype)
        calls[name], info[name] = _fp_call(models[name], dtype), {}
    for preset in presets:
        for backend in ("fake", "int8-cuda"):
            name = f"{preset} {backend}"
            torch.cuda.synchronize()
            start = time.perf_counter()
            model, _ = load_quantized(args.artefacts / preset, backend=backend)
            model = model.to(device)
            torch.cuda.synchronize()
            info[name] = {"load_s": time.perf_counter() - start,
                          "artefact_bytes": sum(f.stat().st_size for f in (args.artefacts / preset).rglob("*")
                                                if f.is_file())}
            models[name], calls[name] = model, (lambda x, t, model=model: model(x, t))
    if args.compile:
        for name in [n for n in models if n == "FP bf16" or n.endswith("int8-cuda")]:
            compiled = copy.deepcopy(models[name])
            compiled.compile(mode=args.compile_mode)
            models[f"{name} compiled"], info[f"{name} compiled"] = compiled, {}
            calls[f"{name} compiled"] = (_fp_call(compiled, torch.bfloat16) if name == "FP bf16"
                                         else (lambda x, t, model=compiled: model(x, t)))
    first: dict[str, float] = {}
    batches = args.batches
    latency = {} if conditional else _latency(calls, batches, shape, device, first)
    for name, call in calls.items():
        info[name]["held_bytes"] = held_weight_bytes(models[name])
        if not conditional:
            info[name]["extra_b64_bytes"] = _extra_memory(call, shape, device)
    _progress("2-step warm-up sampling runs")
    failed: dict[str, str] = {}
    for name, model in models.items():
        start = time.perf_counter()
        try:
            tadq.sample(model, workload.scheduler, SamplerConfig(kind="ddim", num_steps=2, eta=0.0),
                        num_samples=args.samples, seed=1, batch_size=args.samples, progress=False,
                        conditions=workload.evaluation_conditions, guidance_scale=workload.guidance_scale)
        except RuntimeError as error:
            failed[name] = _failure(error)
        first[name] = first.get(name, 0.0) + time.perf_counter() - start
    seconds, images = _sampling(models, workload, args.samples, SAMPLER, failed)
    if "FP fp32" in failed:
        raise SystemExit(f"the FP fp32 reference failed to sample: {failed['FP fp32']}")
    rows = []
    for name in models:
        done = name in seconds
        row = {"variant": name, **{f"latency_b{b}_ms": latency.get(name, {}).get(b) for b in batches},
               "ddim50_s": seconds.get(name), "images_per_s": args.samples / seconds[name] if done else None,
               "held_vs_fp32": info[name]["held_bytes"] / fp_bytes, "first_calls_s": first.get(name), **info[name],
               "psnr_vs_fp_db": float(psnr_per_sample(images[name], images["FP fp32"]).mean()) if done else None,
               "error": failed.get(name)}
        fake = f"{name.split()[0]} fake"
        if "int8-cuda" in name and done and fake in images:
            row["psnr_vs_fake_db"] = float(psnr_per_sample(images[name], images[fake]).mean())
        rows.append(row)
    kernels, kernel_text = ([], "")
    if args.kernels and not conditional:
        _progress("per-layer kernel table")
        kernels, kernel_text = _kernel_table(fp32, shape, device)
    gpu = {"name": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
           "torch": torch.__version__, "cuda": torch.version.cuda, "tf32": False,
           "compile_mode": args.compile_mode if args.compile else None}
    report = {"gpu": gpu, "model": args.model or "digits", "samples": args.samples, "rows": rows, "kernels": kernels}
    atomic_write_text(json.dumps(report, indent=2) + "\n", args.out / "speed_gpu.json")
    text = _report(rows, batches, gpu, args) + ("\n\n" + kernel_text if kernel_text else "")
    print(text)
    atomic_write_text(text + "\n", args.out / "speed_gpu.md")


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _sampling_cell(row: dict) -> str:
    if row["ddim50_s"] is None:
        return f"failed ({row['error']})"
    return f"{row['ddim50_s']:.2f} ({row['images_per_s']:.1f})"


def _report(rows: list[dict], batches: list[int], gpu: dict, args) -> str:
    head = (f"| variant | {' | '.join(f'b{b} ms' for b in batches)} | DDIM-50 s (img/s) | weights held (× fp32) "
            "| extra MiB at b64 | load s | first calls s | PSNR vs FP dB | PSNR int vs fake dB |")
    lines = [f"GPU: {json.dumps(gpu)}; model: {args.model or 'digits'}; DDIM-50 over {args.samples} samples in one "
             "batch, seed 1000", "", head, "|" + "---|" * (8 + len(batches))]
    for r in rows:
        extra = r.get("extra_b64_bytes")
        lines.append(
            f"| {r['variant']} | {' | '.join(_cell(r[f'latency_b{b}_ms'], '.2f') for b in batches)} | "
            f"{_sampling_cell(r)} | {r['held_bytes'] / 1024:.0f} KiB "
            f"({r['held_vs_fp32']:.3f}) | {_cell(None if extra is None else extra / 2**20, '.1f')} | "
            f"{_cell(r.get('load_s'), '.2f')} | {_cell(r['first_calls_s'], '.1f')} | "
            f"{'–' if r['variant'] == 'FP fp32' else _cell(r['psnr_vs_fp_db'], '.2f')} | "
            f"{_cell(r.get('psnr_vs_fake_db'), '.2f')} |")
    by = {r["variant"]: r for r in rows}
    lines += ["", "Ratios in this run (speed-up = other time / this time):"]
    for r in rows:
        if "int8-cuda" not in r["variant"] or r["ddim50_s"] is None:
            continue
        bases = [("fp32", "FP fp32"), ("bf16", "FP bf16"), ("fp16", "FP fp16"), ("bf16 compiled", "FP bf16 compiled")]
        parts = [f"vs {label} {by[base]['ddim50_s'] / r['ddim50_s']:.2f}×" for label, base in bases
                 if by.get(base, {}).get("ddim50_s") is not None]
        lines.append(f"- {r['variant']}: DDIM-50 " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a shipped model (digits, photos, dit, t2i) or a folder")
    parser.add_argument("--presets", type=preset_names, default="W8A8,W4A8")
    parser.add_argument("--artefacts", type=Path, required=True, help="one artefact per preset (made by --prepare)")
    parser.add_argument("--prepare", action="store_true", help="quantize and save the artefacts (CPU), then stop")
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache (--prepare)")
    parser.add_argument("--samples", type=count, default=256, help="samples in the DDIM-50 run (one batch)")
    parser.add_argument("--batches", type=count_list, default="1,16,64,256",
                        help="latency batch sizes (unconditional models)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the compiled rows (reduce-overhead: CUDA graphs, which remove "
                             "the per-kernel launch cost that dominates small models)")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed-gpu"))
    add_force_foreign_flag(parser)
    args = parser.parse_args()
    if args.prepare:
        presets = args.presets.split(",")
        try:  # a re-run replaces its own artefacts; a folder tadq did not write is refused before quantizing
            for preset in presets:
                check_output_dir(args.artefacts / preset, kind="artefact", what="--artefacts", overwrite=True)
        except ValueError as error:
            parser.error(str(error))
        return prepare(args.model, presets, args.artefacts, args.cache_dir)
    try:
        resolve_device("cuda")
        check_backend("int8-cuda")
    except ValueError as error:  # no CUDA, or a GPU without int8 GEMMs: one line, before any loading
        parser.error(str(error))
    output_folder(args.out, force_foreign=args.force_foreign)
    return measure(args)


if __name__ == "__main__":
    main()
