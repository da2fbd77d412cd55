"""Speed of integer execution: FP float32, FP bfloat16, fake-quant and int8 on a shipped model, in ONE run.

Measured per variant, interleaved (round-robin, so machine load hits every variant alike): denoiser latency at batch
1/16/64 (median of the repeats), full DDIM-50 sampling throughput, weights held in memory, peak RSS of a fresh
process that loads the model and runs one batch-64 call, load time, artefact size, and agreement (PSNR) of integer
vs fake-quant samples from the same noise, and of each vs FP. The CPU capability line is printed with the table.
With ``--compile`` (the default) the table also has compiled rows: FP fp32 and FP bf16 under ``torch.compile``
(Inductor, freezing on, as the ``int8-compiled`` backend uses), and each preset on the ``int8-compiled`` backend.
A compiled variant compiles on its first call at each batch size (the "compile s" column sums those first calls;
after a second batch size torch makes the batch dimension dynamic, so batch 64 and DDIM-50 reuse the batch-16
graph). Peak RSS and load time are not probed for compiled rows (a fresh process would compile for minutes).
Run (docs/backends.md has the numbers):

    python benchmarks/speed.py --threads 1 [--presets W8A8,W8A8-WSYM,W4A8] [--samples 64] [--out runs/bench-speed]
                                             [--no-compile] [--model photos --sampling-only]
    python benchmarks/speed.py --threads 1 --kernels     # the per-layer kernel comparison behind the choice
    python benchmarks/speed.py --threads 1 --compiled    # eager vs torch.compile (Inductor) at batch 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, output_folder, preset_names
from common import save_naive_ptq
from speed_kernels import BATCHES, REPEATS, call_of, compiled_table, kernel_table

import tadq
from tadq.backends import check_backend, cpu_summary, held_weight_bytes
from tadq.backends.capability import int8_cpu_weight_bound, weight_bound_reason
from tadq.backends.compiled import compile_like_integer_models
from tadq.backends.weights import weight_code_peak
from tadq.experiments.workload import load_workload, resolve_model_path
from tadq.io import load_quantized
from tadq.metrics.image import psnr_per_sample
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text

SAMPLER = SamplerConfig(kind="ddim", num_steps=50, eta=0.0)


def _lscpu_flags() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "lscpu unavailable"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("Flags")), [])
    wanted = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))]
    return f"{model}; flags: {' '.join(sorted(wanted))}"


_START = time.perf_counter()


def _progress(message: str) -> None:
    """One line per phase on stderr: a full run takes 10–20 minutes, most of it compiling."""
    print(f"[speed {time.perf_counter() - _START:6.0f} s] {message}", file=sys.stderr, flush=True)


def _latency(variants: dict, generator: torch.Generator, first: dict[str, float], shape: tuple[int, int, int]
             ) -> dict[str, dict[int, float]]:
    """Median seconds per denoiser call at each batch, variants interleaved within every repeat; ``first`` gets the
    summed seconds of each variant's first call per batch (compilation, for compiled variants)."""
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name in variants}
    with torch.no_grad():
        for batch in BATCHES:
            x = torch.randn(batch, *shape, generator=generator)
            t = torch.randint(0, 1000, (batch,), generator=generator)
            _progress(f"latency, batch {batch}: warm-up calls (compiled variants compile)")
            for name, call in variants.items():
                start = time.perf_counter()
                call(x, t)  # warm-up (oneDNN primitive creation; compilation)
                first[name] = first.get(name, 0.0) + time.perf_counter() - start
            for _ in range(REPEATS[batch]):
                for name, call in variants.items():
                    start = time.perf_counter()
                    call(x, t)
                    times[name][batch].append(time.perf_counter() - start)
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def _memory_probe(kind: str, path: str, threads: int) -> None:
    """Child process: load one variant (``path``: the FP model folder for fp32/bf16, else the artefact), run one
    batch-64 call, print peak RSS (bytes) and load seconds."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    if kind in ("fp32", "bf16"):
        model, _ = load_pipeline_parts(path)
        shape = adapter_for(model).sample_shape(model)
        model = model.to(torch.bfloat16) if kind == "bf16" else model
        call = call_of(model, True, torch.bfloat16 if kind == "bf16" else torch.float32)
    else:
        model, _ = load_quantized(path, backend=kind)
        shape = tuple(model.sample_shape)
        call = call_of(model, False, torch.float32)
    load_s = time.perf_counter() - start
    with torch.no_grad():
        call(torch.randn(64, *shape), torch.full((64,), 500))
    print(json.dumps({"peak_rss": _peak_rss(), "load_s": load_s, "held": held_weight_bytes(model)}))


def _peak_rss() -> int:
    """This process's peak resident bytes (VmHWM: reset at exec, unlike getrusage's maxrss, which a child started
    by a large parent inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory is measured on Linux only)")


def _probe(kind: str, path: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", kind, path, "--threads", str(threads)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _sampling(variants: dict, models: dict, workload, samples: int) -> tuple[dict, dict]:
    """Seconds for DDIM-50 over ``samples`` samples (one batch; the workload's evaluation conditions and guidance)
    and the images (decoded by the workload's VAE, outside the timing), same noise for every variant."""
    seconds, images = {}, {}
    for name in variants:
        _progress(f"DDIM-50: {name}")
        start = time.perf_counter()
        result = tadq.sample(models[name], workload.scheduler, SAMPLER, num_samples=samples, seed=1000,
                             batch_size=samples, progress=False, conditions=workload.evaluation_conditions,
                             guidance_scale=workload.guidance_scale)
        seconds[name] = time.perf_counter() - start
        with torch.no_grad():
            images[name] = workload.images(result.images.float())
    return seconds, images


def _kib(size: int | None) -> str:
    return "–" if size is None else f"{size / 1024:.0f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×"


def _ms(seconds: float | None) -> float | None:
    """Milliseconds, or None for a latency the run skipped (``--sampling-only``)."""
    return None if seconds is None else 1000 * seconds


def _refuse_what_cannot_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Before any model is loaded or quantized: the integer backends must run here, and every preset's weight codes
    must fit what this CPU's kernels sum exactly (no VNNI/AMX: within ±64, so W4A8 but not the 8-bit presets)."""
    presets = ["W8A8"] if args.kernels or args.compiled else args.presets.split(",")
    try:
        for backend in ("int8", *(("int8-compiled",) if args.compile else ())):
            check_backend(backend)
        peaks = {preset: weight_code_peak(tadq.QuantConfig.from_preset(preset).weights) for preset in presets}
    except ValueError as error:  # an unavailable backend, an unknown preset
        parser.error(str(error))
    bound = int8_cpu_weight_bound()
    too_wide = [preset for preset, peak in peaks.items() if peak > bound]
    if too_wide:
        parser.error(f"{', '.join(too_wide)} cannot run on the int8 backends here: {weight_bound_reason(bound)}"
                     + ("" if args.kernels or args.compiled else "; choose --presets among the others"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--presets", type=preset_names, default="W8A8,W8A8-WSYM,W4A8")
    parser.add_argument("--samples", type=count, default=64, help="samples in the DDIM-50 throughput run (one batch)")
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-speed"))
    parser.add_argument("--kernels", action="store_true", help="only the per-layer kernel comparison")
    parser.add_argument("--compiled", action="store_true", help="only eager vs torch.compile at batch 64")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="add the torch.compile rows (FP fp32/bf16 compiled, int8-compiled)")
    parser.add_argument("--sampling-only", action="store_true",
                        help="skip the latency columns (shown as –): DDIM-50 throughput and agreement only")
    parser.add_argument("--model", default=None,
                        help="a shipped model (digits, photos, dit, t2i) or a folder, as `tadq run --model` takes "
                             "(default: digits); a conditional model needs --sampling-only; not with --kernels / "
                             "--compiled, which use the shipped digits model")
    parser.add_argument("--probe", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    add_force_foreign_flag(parser)
    args = parser.parse_args()
    if args.probe:
        return _memory_probe(*args.probe, args.threads)
    torch.set_num_threads(args.threads)
    if args.model is not None and (args.kernels or args.compiled):
        parser.error("--kernels and --compiled measure the shipped digits model; drop --model")
    _refuse_what_cannot_run(parser, args)
    model_path = resolve_model_path(args.model)
    if not (args.kernels or args.compiled):  # they print their tables only
        output_folder(args.out, force_foreign=args.force_foreign)
    workload = load_workload(args.model)  # refused here: a missing folder, an unsupported model
    conditional = workload.evaluation_conditions is not None
    if conditional and not args.sampling_only:
        parser.error(f"{model_path} is a conditional model: the latency and memory probes call the denoiser with "
                     "(x, t) alone; measure it with --sampling-only")
    shape = tuple(adapter_for(workload.model).sample_shape(workload.model))
    capability = {**cpu_summary(), "lscpu": _lscpu_flags()}
    if args.kernels:
        print("CPU:", json.dumps(capability, ensure_ascii=False))
        print(kernel_table(load_pipeline_parts(None)[0]))
        return None
    if args.compiled:
        print("CPU:", json.dumps(capability, ensure_ascii=False))
        print(compiled_table(*load_pipeline_parts(None), args.cache_dir))
        return None

    if args.compile:  # the FP rows compile with the Inductor settings the int8-compiled backend uses (freezing, the
        # C++ wrapper; the backend sets them around its own calls), so the comparison is kernel against kernel
        compile_like_integer_models()
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = 64  # every compiled UNet2DModel shares its forward's graph limit (8)
    fp32, scheduler = workload.model, workload.scheduler
    fp_bytes = 4 * sum(p.numel() for p in fp32.parameters())
    models = {"FP fp32": fp32, "FP bf16": copy.deepcopy(fp32).to(torch.bfloat16)}
    calls = {"FP fp32": call_of(fp32, True, torch.float32),
             "FP bf16": call_of(models["FP bf16"], True, torch.bfloat16)}
    denoiser_folder = next((model_path / sub for sub in ("unet", "transformer") if (model_path / sub).is_dir()),
                           model_path)
    shipped = sum(f.stat().st_size for f in denoiser_folder.rglob("*.safetensors"))
    info: dict[str, dict] = {"FP fp32": {"size": shipped}, "FP bf16": {"size": None}}  # bf16: no artefact of its own
    if args.compile:
        for name, dtype in (("FP fp32", torch.float32), ("FP bf16", torch.bfloat16)):
            compiled = copy.deepcopy(models[name])
            compiled.compile()
            models[f"{name} compiled"], calls[f"{name} compiled"] = compiled, call_of(compiled, True, dtype)
            info[f"{name} compiled"] = {"size": info[name]["size"], "compiled": True}
    workdir = Path(tempfile.mkdtemp(prefix="tadq-speed-"))
    sizes = save_naive_ptq(workload, args.presets.split(","), workdir, args.cache_dir,
                           announce=lambda preset: _progress(f"quantizing {preset} (naive PTQ)"))
    for preset, size in sizes.items():
        _progress(f"loading {preset} on each backend")
        for backend in ("fake", "int8", *(("int8-compiled",) if args.compile else ())):
            name = f"{preset} {backend}"
            models[name], _ = load_quantized(workdir / preset, backend=backend)
            info[name] = {"size": size, "compiled": backend == "int8-compiled"}
            calls[name] = call_of(models[name], False, torch.float32)
    for name in models:
        if info[name].get("compiled") or conditional:  # (x, t) probes: unconditional models only
            info[name].update(peak_rss=None, load_s=None, held=held_weight_bytes(models[name]))
            continue
        _progress(f"peak memory and load time of {name}, in a fresh process")
        kind = {"FP fp32": "fp32", "FP bf16": "bf16"}.get(name, name.split()[-1])
        source = model_path if kind in ("fp32", "bf16") else workdir / name.split()[0]
        info[name].update(_probe(kind, str(source), args.threads))

    first: dict[str, float] = {}
    if args.sampling_only:
        latency = {name: dict.fromkeys(BATCHES) for name in models}
    else:
        latency = _latency(calls, torch.Generator().manual_seed(0), first, shape)
    _progress("2-step warm-up sampling runs (compiled variants compile for the sampler's batch)")
    for name in models:  # a short run first: compiles on the sampler's own call, outside the timed run
        start = time.perf_counter()
        tadq.sample(models[name], scheduler, SamplerConfig(kind="ddim", num_steps=2, eta=0.0),
                    num_samples=args.samples, seed=1, batch_size=args.samples, progress=False,
                    conditions=workload.evaluation_conditions, guidance_scale=workload.guidance_scale)
        first[name] = first.get(name, 0.0) + time.perf_counter() - start
    seconds, images = _sampling(calls, models, workload, args.samples)
    rows = []
    for name in models:
        row = {"variant": name, **{f"latency_b{b}_ms": _ms(latency[name][b]) for b in BATCHES},
               "ddim50_s": seconds[name], "images_per_s": args.samples / seconds[name],
               "held_weight_bytes": info[name]["held"], "held_vs_fp32": info[name]["held"] / fp_bytes,
               "peak_rss_mib": None if info[name]["peak_rss"] is None else info[name]["peak_rss"] / 2**20,
               "load_s": info[name]["load_s"], "artefact_bytes": info[name]["size"],
               "first_calls_s": first[name], "compiled": bool(info[name].get("compiled")),
               "psnr_vs_fp_db": float(psnr_per_sample(images[name], images["FP fp32"]).mean())}
        if " int8" in name:
            fake = f"{name.split()[0]} fake"
            row["psnr_vs_fake_db"] = float(psnr_per_sample(images[name], images[fake]).mean())
        rows.append(row)
    # the raw rows first (a failure while formatting loses nothing), into the folder checked before any work
    atomic_write_text(json.dumps({"cpu": capability, "model": _model_name(args), "rows": rows}, indent=2) + "\n",
                      args.out / "speed.json")
    _report(rows, capability, args)


def _model_name(args) -> str:
    return str(args.model) if args.model is not None else "the shipped digits DDPM"


def _cell(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _report(rows: list[dict], capability: dict, args) -> None:
    head = ("| variant | b1 ms | b16 ms | b64 ms | DDIM-50 s (img/s) | weights held (× fp32) | peak RSS MiB | load s "
            "| first calls s | artefact KiB | PSNR vs FP dB | PSNR int vs fake dB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['variant']} | {_cell(r['latency_b1_ms'], '.1f')} | {_cell(r['latency_b16_ms'], '.1f')} | "
                     f"{_cell(r['latency_b64_ms'], '.1f')} | {r['ddim50_s']:.1f} ({r['images_per_s']:.2f}) | "
                     f"{r['held_weight_bytes'] / 1024:.0f} KiB ({r['held_vs_fp32']:.3f}) | "
                     f"{_cell(r['peak_rss_mib'], '.0f')} | {_cell(r['load_s'], '.2f')} | {r['first_calls_s']:.1f} | "
                     f"{_kib(r['artefact_bytes'])} | "
                     f"{'–' if r['variant'] == 'FP fp32' else format(r['psnr_vs_fp_db'], '.2f')} | "
                     f"{format(r['psnr_vs_fake_db'], '.2f') if 'psnr_vs_fake_db' in r else '–'} |")
    by = {r["variant"]: r for r in rows}
    ratios = ["", "Ratios in this run (speed-up = other time / this time; \"c\" = the compiled FP model):"]
    keys = (("DDIM-50", "ddim50_s"), ("b1", "latency_b1_ms"), ("b16", "latency_b16_ms"), ("b64", "latency_b64_ms"))
    for r in rows:
        if " int8" not in r["variant"]:
            continue
        fake = by[f"{r['variant'].split()[0]} fake"]
        parts = []
        for what, key in keys:
            if r[key] is None:  # skipped in this run
                continue
            cells = [f"vs fp32 {_ratio(by['FP fp32'][key], r[key])}", f"vs bf16 {_ratio(by['FP bf16'][key], r[key])}"]
            if "FP fp32 compiled" in by:
                cells += [f"vs fp32 c {_ratio(by['FP fp32 compiled'][key], r[key])}",
                          f"vs bf16 c {_ratio(by['FP bf16 compiled'][key], r[key])}"]
            parts.append(f"{what}: " + ", ".join([*cells, f"vs fake {_ratio(fake[key], r[key])}"]))
        ratios.append(f"- {r['variant']}: " + "; ".join(parts))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    model = _model_name(args)
    cpu = json.dumps(capability, ensure_ascii=False)
    text = "\n".join([f"CPU: {cpu}", f"model: {model}; threads: {args.threads}, DDIM-50 over "
                      f"{args.samples} samples in one batch, seed 1000; load average at the end (1, 5, 15 min): "
                      f"{load}", "",
                      *lines, *ratios])
    print(text)
    atomic_write_text(text + "\n", args.out / "speed.md")  # main() has written speed.json and made the folder


if __name__ == "__main__":
    main()
