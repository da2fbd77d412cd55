"""Assemble the bench report from the per-sampler tables: ``report.json`` (every row), ``report.md`` and a
self-contained ``report.html`` (headline table per sampler, peer verdicts, sample grids, per-step error curves and
fitted correction tables, costs, and the command that regenerates it)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tadq.config import config_to_dict
from tadq.experiments.bench import html
from tadq.experiments.bench.config import BenchConfig
from tadq.experiments.bench.rows import bench_rows, format_value, headline_columns, peer_verdicts
from tadq.report import dumps_json
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text, library_versions

__all__ = ["BENCH_REPORT_FILES", "write_bench_report"]

BENCH_REPORT_FILES = ("report.json", "report.md", "report.html")  # written last, by write_bench_report

NOTES = (
    "Fake quantization is a simulation on floating-point hardware: every time here (calibrate, sample, × base, "
    "× FP) is the cost of the simulation on this machine, not deployment speed; quantized rows are slower than FP.",
    "calibrate (s): time to quantize (calibration + reconstruction) and fit the row's corrections; rows on a saved "
    "base model report the base's recorded build time (– when it was saved without one). It is measured once, "
    "when the cell is computed; a rerun reuses it.",
    "× base: the row's sampling time ÷ that of the uncorrected row on the same quantized network (naive PTQ or "
    "Q-Diffusion, same preset and sampler). The two cells were sampled at different times on a shared machine, so "
    "this ratio carries the load changes between them; in hooks is the exact overhead: the share of the row's own "
    "sampling time spent inside its correction hooks, timed in the very run that is scored (benchmarks/perf.py "
    "adds interleaved repeats). × FP: sampling time ÷ FP's.",
    "Gbit-ops / sample: Σ MACs × weight bits × activation bits of every Conv2d/Linear over the sampler's denoiser "
    "forwards for one sample (tadq.corrections.ptqd.bitops × steps; FP layers count 32 × 32; attention matmuls "
    "not counted; the JSON keeps the per-forward count as bitops). – for peer tools, whose kernels tadq does not "
    "count.",
    "artefact: bytes of the saved weights file (tadq.io.save_quantized: integer codes, scales and FP tensors), and "
    "its ratio to the float32 model's parameter bytes.",
)
_FIGURES = (
    ("samples.png", "FP beside every variant, the same noise in the same grid cell"),
    ("per_step_error.png", "MSE between the FP and quantized x_t at every sampler step (0 = initial noise)"),
    ("ptqd_tables.png", "PTQD's fitted k_t, μ_t and σ_q,t against the step"),
    ("correction_tables.png", "TAC / TCEC fitted tables against the step"),
)


_SAMPLER_NAMES = {"ddpm": "DDPM", "euler": "Euler", "euler-ancestral": "Euler ancestral",
                  "flow-euler": "flow-matching Euler"}


def sampler_title(sampler: SamplerConfig) -> str:
    """The sampler as a heading: its name, steps and what distinguishes it (η, order, flow shift)."""
    if sampler.kind == "ddim":
        return f"DDIM, {sampler.num_steps} steps, η = {sampler.eta:g}"
    if sampler.kind == "dpmsolver++":
        return f"DPM-Solver++ ({'2M' if sampler.order == 2 else 'order 1'}), {sampler.num_steps} steps"
    name = _SAMPLER_NAMES.get(sampler.kind, sampler.kind)
    shift = sampler.shift
    suffix = f", shift {shift:g}" if sampler.kind == "flow-euler" and shift not in (None, 1.0) else ""
    return f"{name}, {sampler.num_steps} steps{suffix}"


def _figures(folder: Path, presets: list[str]) -> list[tuple[Path, str]]:
    found = [(folder / name, caption) for name, caption in _FIGURES[:2]]
    found += [(folder / f"per_step_error_{bits}.png", f"per-step error at {bits} only") for bits in presets]
    found += [(folder / name, caption) for name, caption in _FIGURES[2:]]
    return [(path, caption) for path, caption in found if path.is_file()]


def _describe(bench: BenchConfig, table: dict[str, Any]) -> list[str]:
    sampler, results = table["sampler"], table["results"]
    lines = [f"{bench.num_samples} samples per row, every row from evaluation seed {bench.eval_seed} (the FP row "
             f"uses the same noise); calibration trajectories from seed {bench.calibration.seed} with the same "
             f"sampler ({sampler.key}). PSNR, SSIM and class agreement compare each sample with the FP sample from "
             f"the same noise.", results["notes"]["fd"]]
    if bench.model is not None:
        lines.append("This is not the shipped digits model: FD-digits and class agreement use the shipped digit "
                     "classifier and only mean something for digit images; PSNR/SSIM vs FP and the per-step error "
                     "apply to any model.")
    return lines


def _section(bench: BenchConfig, table: dict[str, Any]) -> dict[str, Any]:
    rows = bench_rows(table)
    folder = bench.sampler_dir(table["sampler"])
    presets = sorted({r["bits"] for r in rows if r["status"] == "ok" and r["method"] != "fp"})
    verdicts = peer_verdicts(rows)
    if any(r["peer"] for r in rows) and not any(r["peer"] and r["status"] == "ok" for r in rows):
        verdicts.append("No peer tool could be measured at this sampler (see the status column).")
    return {"sampler": table["sampler"], "title": sampler_title(table["sampler"]), "rows": rows,
            "columns": headline_columns(rows),
            "description": _describe(bench, table), "verdicts": verdicts, "figures": _figures(folder, presets),
            "fd_floor": table["results"]["fd_digits_real_vs_real"], "wall_s": table["wall_s"]}


def _cells(row: dict[str, Any], columns: tuple[tuple[str, str], ...]) -> list[str]:
    return [format_value(key, row.get(key)) for key, _ in columns]


# what Markdown (CommonMark + GitHub tables) would read as markup or raw HTML in text tadq did not write (a model
# path, an error message in a status cell): each is backslash-escaped, which CommonMark allows for any of them
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def markdown_text(text: object) -> str:
    """``text`` as literal Markdown on one line: a ``<script>`` or a ``|`` in a model path or a status cannot open
    an HTML tag, a link or a table column, and a newline cannot end the line, a heading or a table row."""
    one_line = " ".join(str(text).splitlines())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", one_line)


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text``, so the command cannot close its own block."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _markdown(bench: BenchConfig, sections: list[dict[str, Any]], header: list[str]) -> str:
    command = bench.command()
    fence = _fence(command)
    out = [f"# tadq bench: {markdown_text(bench.model or 'shipped digits DDPM')}", "",
           *(markdown_text(line) for line in header), "", f"{fence}bash", command, fence, ""]
    out += [f"- {note}" for note in NOTES] + [""]
    for part in sections:
        out += [f"## {markdown_text(part['title'])} (`{part['sampler'].key}`)", "",
                *(markdown_text(line) for line in part["description"]), ""]
        columns = part["columns"]
        out.append("| " + " | ".join(title for _, title in columns) + " |")
        out.append("|" + "|".join("---" for _ in columns) + "|")
        out += ["| " + " | ".join(markdown_text(cell) for cell in _cells(row, columns)) + " |"
                for row in part["rows"]]
        out += [""] + [f"- {markdown_text(v)}" for v in part["verdicts"]] + ([""] if part["verdicts"] else [])
        root = Path(bench.out_dir)
        out += [f"![{caption}]({path.relative_to(root).as_posix()})" for path, caption in part["figures"]]
        out.append("")
    return "\n".join(out)


def _html(bench: BenchConfig, sections: list[dict[str, Any]], header: list[str]) -> str:
    parts = [*(html.paragraph(line) for line in header), html.section("Command", [html.code(bench.command())], 3),
             html.section("How to read the numbers", [html.paragraph(n, "note") for n in NOTES], 3)]
    for part in sections:
        body = [html.paragraph(line) for line in part["description"]]
        classes = ["fp" if r["method"] == "fp" else "" if r["status"] == "ok" else "unsupported" for r in part["rows"]]
        body.append(html.table([title for _, title in part["columns"]],
                               [_cells(r, part["columns"]) for r in part["rows"]], classes))
        body += [html.paragraph(v) for v in part["verdicts"]]
        body += [html.figure(path, caption) for path, caption in part["figures"]]
        parts.append(html.section(f"{part['title']} ({part['sampler'].key})", body))
    return html.page(f"tadq bench: {bench.model or 'shipped digits DDPM'}", parts)


def _json(bench: BenchConfig, sections: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The report document; each figure by its path from the bench folder, as report.md links it (the path as
    given, relative to the working directory or absolute, broke when the folder was moved or read from elsewhere)."""
    root = Path(bench.out_dir)
    return {
        "command": bench.command(), "wall_s": wall_s,
        "config": {"model": bench.model or "shipped", "methods": list(bench.methods), "presets": list(bench.presets),
                   "samplers": [config_to_dict(s) for s in bench.samplers], "num_samples": bench.num_samples,
                   "eval_seed": bench.eval_seed, "calibration": config_to_dict(bench.calibration),
                   "reconstruction": config_to_dict(bench.reconstruction), "quick": bench.quick,
                   "models_dir": str(bench.models_folder)},
        "rows": [row for part in sections for row in part["rows"]],
        "samplers": {part["sampler"].key: {"title": part["title"], "description": part["description"],
                                           "peer_verdicts": part["verdicts"], "fd_digits_real_vs_real":
                                               part["fd_floor"], "wall_s": part["wall_s"],
                                           "figures": [path.relative_to(root).as_posix()
                                                       for path, _ in part["figures"]]}
                     for part in sections},
        "notes": list(NOTES), "versions": library_versions(),
    }


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def write_bench_report(bench: BenchConfig, tables: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and ``report.html`` in ``bench.out_dir``; returns the JSON document."""
    sections = [_section(bench, table) for table in tables]
    measured = sum(r["status"] == "ok" and r["method"] != "fp" for part in sections for r in part["rows"])
    total = sum(r["method"] != "fp" for part in sections for r in part["rows"])
    shape = " × ".join(_count(len(items), noun) for items, noun in ((bench.methods, "method"),
                                                                    (bench.presets, "preset"),
                                                                    (bench.samplers, "sampler")))
    rest = " (the others say why their method does not support them)" if measured < total else ""
    header = [f"Model: {bench.model or 'the shipped digits DDPM (src/tadq/zoo/weights/digits-ddpm)'}. Matrix: "
              f"{shape}{' (the --quick matrix)' if bench.quick else ''}: {measured} of {total} rows measured{rest}.",
              f"Wall time of this invocation: {wall_s:.0f} s (finished cells are reused, so a rerun only recomputes "
              f"the metrics). Written {time.strftime('%Y-%m-%d %H:%M:%S')}."]
    document = _json(bench, sections, wall_s)
    out = Path(bench.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dumps_json(document), out / "report.json")  # strict JSON: a diverged row's NaN is null
    atomic_write_text(_markdown(bench, sections, header), out / "report.md")
    atomic_write_text(_html(bench, sections, header), out / "report.html")
    return document
