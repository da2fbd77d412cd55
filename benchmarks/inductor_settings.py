"""Inductor's C++ wrapper on or off for an ``int8-compiled`` model: compile seconds and per-call latency.

``tadq.backends.compiled.INDUCTOR_SETTINGS`` turns the C++ wrapper on (the code that calls a forward's generated
kernels and oneDNN ops is compiled C++ instead of Python). This is the measurement behind that choice: the shipped
digits model, naive PTQ at ``--preset``, loaded on ``int8-compiled`` in a **fresh process with an empty Inductor
cache per setting** (so each compiles from scratch, as a user's first run does), then at batch 1, 16 and 64 the
first call (compiling) and the mean of ``--calls`` calls after three warm-ups. The two settings alternate over
``--rounds`` rounds, so machine load hits both alike. Run::

    python benchmarks/inductor_settings.py --threads 1 [--preset W8A8-WSYM] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arguments import count, preset_name

BATCHES = (1, 16, 64)


def measure(preset: str, cpp_wrapper: bool, calls: int, threads: int, cache_dir: str) -> dict[str, float]:
    """One setting, in this process: {"compile b…": s, "ms b…": ms per call}."""
    import torch

    import tadq
    from tadq.backends import compiled
    from tadq.io import load_quantized
    from tadq.models import load_pipeline_parts
    from tadq.registry import adapter_for

    torch.set_num_threads(threads)
    compiled.INDUCTOR_SETTINGS["cpp_wrapper"] = cpp_wrapper
    fp32, scheduler = load_pipeline_parts(None)
    shape = adapter_for(fp32).sample_shape(fp32)
    qmodel = tadq.quantize(fp32, scheduler, tadq.QuantConfig.from_preset(preset), cache_dir=cache_dir,
                           progress=False)
    folder = Path(tempfile.mkdtemp(prefix="tadq-inductor-")) / preset
    qmodel.save_pretrained(folder, scheduler)
    model, _ = load_quantized(folder, backend="int8-compiled")
    generator = torch.Generator().manual_seed(0)
    result: dict[str, float] = {}
    for batch in BATCHES:
        x = torch.randn(batch, *shape, generator=generator)
        t = torch.full((batch,), 500)
        start = time.perf_counter()
        model(x, t)
        result[f"compile b{batch} s"] = time.perf_counter() - start
        for _ in range(3):
            model(x, t)
        start = time.perf_counter()
        for _ in range(calls):
            model(x, t)
        result[f"b{batch} ms"] = 1000 * (time.perf_counter() - start) / calls
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", type=preset_name, default="W8A8-WSYM")
    parser.add_argument("--threads", type=count, default=1)
    parser.add_argument("--calls", type=count, default=20)
    parser.add_argument("--rounds", type=count, default=2)
    parser.add_argument("--cache-dir", default=".cache/bench-speed", help="calibration data cache")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.preset, args.child == "on", args.calls, args.threads, args.cache_dir)))
        return
    import tadq

    tadq.QuantConfig.from_preset(args.preset)  # an unknown preset is refused before any work
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for round_index in range(args.rounds):
        for setting in ("on", "off"):
            print(f"round {round_index + 1}/{args.rounds}: C++ wrapper {setting}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="tadq-inductor-cache-") as inductor_cache:
                done = subprocess.run(
                    [sys.executable, __file__, "--child", setting, "--preset", args.preset, "--threads",
                     str(args.threads), "--calls", str(args.calls), "--cache-dir", args.cache_dir],
                    check=True, capture_output=True, text=True,
                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": inductor_cache})
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    columns = list(runs["on"][0])
    print(f"{args.preset} int8-compiled, threads {args.threads}, {args.rounds} round(s), median over rounds")
    print("| C++ wrapper | " + " | ".join(columns) + " | compile total s |")
    print("|---" * (len(columns) + 2) + "|")
    for setting, results in runs.items():
        medians = [statistics.median(r[c] for r in results) for c in columns]
        total = statistics.median(sum(v for k, v in r.items() if k.startswith("compile")) for r in results)
        print(f"| {setting} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {total:.1f} |")


if __name__ == "__main__":
    main()
