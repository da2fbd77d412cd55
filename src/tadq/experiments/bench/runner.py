"""Run the bench matrix: the main job's cells once per sampler, with unsupported (method, preset) pairs recorded
instead of aborting.

Each sampler is one main job (``tadq.experiments.run``'s own pieces: calibration, ``BaseModels``, ``run_cell``,
``write_report``), so each finished cell is saved atomically in ``<out>/<sampler key>/cells`` under ``tadq run``'s
key: a rerun skips finished cells and an interrupted bench loses at most the cell in progress. The variant list is
built here rather than by ``default_variants`` so that a method that cannot do a preset (a peer without a setting
for it, an optional extra that is not installed) becomes a "not supported" row.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tadq.experiments.bench.config import BenchConfig
from tadq.experiments.bench.measure import measured
from tadq.experiments.bench.report import BENCH_REPORT_FILES, write_bench_report
from tadq.experiments.rows import BaseModels, Variant, resolve_row, row_for
from tadq.experiments.run import CELL_SUFFIX, RunConfig, cell_key, prepare_job, run_cell, write_report
from tadq.experiments.workload import resolve_model_path
from tadq.fsguard import OutputRefused, mark_output
from tadq.models import load_scheduler
from tadq.safefiles import DamagedFileError
from tadq.sampling import SamplerConfig, SamplingPlan

__all__ = ["Unsupported", "UNSUPPORTED_ERRORS", "run_bench", "run_sampler"]

logger = logging.getLogger(__name__)

# what a method raises for a preset it has no setting for (ValueError, e.g. peers.UnsupportedPreset), for an
# optional extra that is not installed (ImportError, e.g. PeerNotInstalled), or for a path it does not implement
UNSUPPORTED_ERRORS = (ValueError, ImportError, NotImplementedError)


@dataclass(frozen=True)
class Unsupported:
    """A (method, preset) pair the method cannot do, with the reason its builder gave."""

    method: str
    preset: str
    reason: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _variants(config: RunConfig, bases: BaseModels) -> list[tuple[str, str, Variant | Unsupported]]:
    """(method, preset, variant or why not) for FP and every (method, preset), in matrix order."""
    entries: list[tuple[str, str, Variant | Unsupported]] = [
        ("fp", "W32A32", Variant("FP", "W32A32", None, {"method": "fp"}))]
    built: set[tuple[str, str]] = set()
    for method in config.methods:
        for preset in config.presets:
            row = (resolve_row(method, preset), preset)  # RunConfig refused a `best` without a measured row
            if row in built:  # `best` is the row it stands for: `tac,best` at W8A8 measured one cell as two rows
                continue
            built.add(row)
            try:
                entries.append((method, preset, row_for(method, bases, config, preset)))
            except UNSUPPORTED_ERRORS as error:
                logger.warning("%s %s not supported: %s", method, preset, error)
                entries.append((method, preset, Unsupported(method, preset, _reason(error))))
    return entries


def run_sampler(bench: BenchConfig, sampler: SamplerConfig) -> dict[str, Any]:
    """One sampler's table: every cell sampled (or reused), ``write_report``'s files in the sampler folder.

    Returns ``{"sampler", "config" (its RunConfig), "results" (run.py's results), "entries" [(method, preset, row
    index or Unsupported)], "settings" (each row's cell settings), "wall_s"}``.
    """
    t0 = time.perf_counter()
    out = bench.sampler_dir(sampler)
    job = prepare_job(bench.run_config(sampler), bench.models_folder)  # fails before anything is written
    config, workload, bases = job.config, job.workload, job.bases
    (out / "cells").mkdir(parents=True, exist_ok=True)
    mark_output(bench.out_dir, "bench")  # a later bench may refill it (the CLI refuses folders without the marker)
    cells: list[dict[str, Any]] = []
    entries: list[tuple[str, str, int | Unsupported]] = []
    planned = _variants(config, bases)
    for number, (method, preset, variant) in enumerate(planned, start=1):
        if isinstance(variant, Unsupported):
            entries.append((method, preset, variant))
            continue
        variant = measured(variant, workload.scheduler)
        key = cell_key(job.fingerprint, config, variant, workload)
        path = out / "cells" / f"{_slug(method)}-{preset}-{key}{CELL_SUFFIX}"
        logger.info("%s [%d/%d] %s %s", sampler.key, number, len(planned), variant.name, variant.bits)
        try:
            cell = run_cell(workload, config, variant, path, key, job.components)
        except (DamagedFileError, OutputRefused):  # ValueErrors too, about files, not the method: said as they are
            raise
        except UNSUPPORTED_ERRORS as error:  # raised while building (e.g. a tool rejects the model): keep going
            if method == "fp":
                raise
            logger.warning("%s %s failed to build: %s", method, preset, error)
            entries.append((method, preset, Unsupported(method, preset, _reason(error))))
            continue
        entries.append((method, preset, len(cells)))
        cells.append(cell)
    # this table's figures and results replace the earlier bench's from here on: its report (written last, by
    # write_bench_report) would describe numbers and link figures that are no longer there, an interrupt leaving
    # the two runs mixed with nothing saying so
    for name in BENCH_REPORT_FILES:
        (Path(bench.out_dir) / name).unlink(missing_ok=True)
    results = write_report(config, cells, workload)
    return {"sampler": sampler, "config": config, "results": results, "entries": entries,
            "settings": [cell["settings"] for cell in cells], "wall_s": time.perf_counter() - t0}


def run_bench(bench: BenchConfig) -> dict[str, Any]:
    """Every sampler of the matrix, then the bench report (``report.html``, ``report.md``, ``report.json``)."""
    t0 = time.perf_counter()
    scheduler = load_scheduler(resolve_model_path(bench.model))  # every sampler drives it, checked before any work
    for sampler in bench.samplers:  # (a later one was refused only after the earlier tables had run)
        SamplingPlan.build(scheduler, sampler)
    tables = [run_sampler(bench, sampler) for sampler in bench.samplers]
    return write_bench_report(bench, tables, time.perf_counter() - t0)
