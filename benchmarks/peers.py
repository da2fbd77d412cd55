"""Side by side with the maintained tools users would pick: optimum-quanto, NVIDIA ModelOpt, torchao vs tadq.

Every row goes through ``tadq.experiments.run.run_main_job`` (the rows of ``tadq.experiments.rows.peers`` beside
tadq's own), so all
share the shipped model, the FP-trajectory calibration inputs (seed 0), the evaluation noise (seed 1000), the
sampler and the metrics. One main job per preset (a tool row exists only at the presets the tool can map onto),
merged into one table: ``OUT/results.md`` / ``OUT/results.json`` (per-preset reports and grids in ``OUT/<preset>``).
Needs the optional extra: ``pip install -e .[peers]``. Run:

    python benchmarks/peers.py --samples 500 --threads 1 [--presets W8A8,W4A8] [--out runs/peers]

Q-Diffusion models already built by ``tadq run`` with the same settings (``--reuse-models``, default
``runs/main/models``) are copied in instead of reconstructed (their folder names carry a hash of every setting).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from arguments import output_folder, preset_names
from common import add_common_flags, add_setting_flag, run_config_for

from tadq.experiments.rows.peers import PEERS, supported_presets
from tadq.experiments.run import run_main_job
from tadq.report import markdown_table
from tadq.utils import atomic_write_text

DEFAULT_METHODS = ("qdiffusion", *PEERS, "naive")  # naive PTQ last: the like-for-like of the calibrate-only peers


def methods_at(preset: str, methods: tuple[str, ...]) -> tuple[str, ...]:
    """The methods with a row at ``preset``: every tadq method, and the peers that map onto it."""
    return tuple(m for m in methods if m not in PEERS or preset in supported_presets(m))


def reuse_models(source: Path, target: Path) -> list[str]:
    """Copy saved quantized models from ``source`` that ``target`` lacks (unused unless their key matches)."""
    copied: list[str] = []
    if not source.is_dir():
        logging.warning("no saved models in %s (run from the repository root?): tadq rows are rebuilt", source)
        return copied
    target.mkdir(parents=True, exist_ok=True)
    for folder in sorted(source.iterdir()):
        if folder.is_dir() and (folder / "tadq_config.json").exists() and not (target / folder.name).exists():
            shutil.copytree(folder, target / folder.name)
            copied.append(folder.name)
    return copied


def coverage_lines(extras: dict[str, Any]) -> list[str]:
    """One Markdown row per peer row: what the tool actually quantized."""
    lines = ["| row | quantized layers | setting |", "|---|---|---|"]
    for label, extra in extras.items():
        peer = extra.get("peer")
        if peer:
            layers = f"{peer['weights']} of {peer['total']} ({peer['scope']})"
            lines.append(f"| {label} | {layers} | {peer['tool']} {peer['version']}: {peer['setting']} |")
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_flags(parser, samples=500, out="runs/peers")
    add_setting_flag(parser)
    parser.add_argument("--presets", type=preset_names, default="W8A8,W4A8", help="comma-separated tadq presets")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated registered methods")
    parser.add_argument("--reuse-models", default="runs/main/models", help="saved tadq models to copy in ('' = no)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    plan = {preset: methods_at(preset, methods) for preset in (p.strip().upper() for p in args.presets.split(","))
            if preset}
    empty = [preset for preset, chosen in plan.items() if not chosen]
    if empty:  # the job of such a preset was refused only after every earlier preset's job had run
        parser.error(f"no method of --methods {','.join(methods)} has a row at {', '.join(empty)} (the peers there "
                     "have no setting for it); add a tadq method or leave the preset out")
    out = output_folder(args.out, force_foreign=args.force_foreign)  # before any work, after the usage checks
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for preset, chosen in plan.items():
        skipped = sorted(set(methods) - set(chosen))
        if skipped:
            logging.info("%s: no row for %s (the tool has no setting for this preset)", preset, skipped)
        folder = out / preset
        if args.reuse_models:
            copied = reuse_models(Path(args.reuse_models), folder / "models")
            logging.info("%s: copied %d saved models from %s", preset, len(copied), args.reuse_models)
        config = run_config_for(args.setting, presets=(preset,), methods=chosen, num_samples=args.samples,
                                eval_seed=args.seed, out_dir=str(folder))
        results = run_main_job(config)
        rows.extend(r for r in results["rows"] if not (r["method"] == "FP" and rows))  # FP once: same noise
        extras.update(results["extras"])
        notes = results["notes"]
    table = markdown_table(rows)
    coverage = "\n".join(coverage_lines(extras))
    merged = {"rows": rows, "extras": extras, "notes": notes, "samples": args.samples, "eval_seed": args.seed,
              "presets": args.presets, "methods": list(methods)}
    atomic_write_text(json.dumps(merged, indent=2, default=str), out / "results.json")
    text = f"{table}\n\n{coverage}\n\n{notes.get('fd', '')}\n{notes.get('fake_quant', '')}\n"
    atomic_write_text(text, out / "results.md")
    print(text)
    return merged


if __name__ == "__main__":
    main()
