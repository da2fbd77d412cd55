"""Measurements behind ``docs/results/digits.md`` that ``tadq run`` does not print: temporal-feature cosines and
calibration time.

    python -m tadq.experiments.tfmq_measure cosines MODEL_DIR [MODEL_DIR ...]
        mean/min cosine of the temporal features to FP
    python -m tadq.experiments.tfmq_measure timing
        Q-Diffusion vs TFMQ-DM quantize time, W4A8
    python -m tadq.experiments.tfmq_measure paired RUN_DIR [REFERENCE_ROW]
        per-sample PSNR difference from one row, 95 %

Both use the shipped model, DDIM 50 (η = 0) and the main job's default configs, one thread.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["temporal_cosines", "calibration_times", "paired_psnr", "paired_rows", "paired_difference",
           "report_cells"]


def temporal_cosines(model_dirs: list[str]) -> dict[str, dict[str, float]]:
    """Per saved quantized model: mean and min cosine of its 11 temporal features to FP over the grid (weights
    only: activation quantizers bypassed, so the comparison is about the TIB's rounding)."""
    from tadq.experiments.run import RunConfig
    from tadq.io import load_quantized
    from tadq.models import load_pipeline_parts
    from tadq.quant.quantizer import quantizers_bypassed
    from tadq.registry import adapter_for
    from tadq.tfmq import TemporalInformationBlock, deployment_grid
    from tadq.tfmq.tiar import feature_disturbance

    model, scheduler = load_pipeline_parts(None)
    timesteps = deployment_grid(scheduler, RunConfig().sampler)
    with torch.no_grad():
        targets = TemporalInformationBlock(model, adapter_for(model))(timesteps)
    results = {}
    for folder in model_dirs:
        qmodel = load_quantized(folder)[0]
        with quantizers_bypassed(qmodel.model, "activation"):
            tib = TemporalInformationBlock(qmodel.model, qmodel.adapter)
            cosines = [1 - score["cosine_distance"] for score in feature_disturbance(tib, targets, timesteps, None)]
        results[folder] = {"mean": sum(cosines) / len(cosines), "min": min(cosines)}
    return results


def _clock(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, round(time.perf_counter() - wall, 1), round(time.process_time() - cpu, 1)


def calibration_times(preset: str = "W4A8") -> dict[str, tuple[float, float]]:
    """(wall s, CPU s) of ``tadq.quantize`` (the Q-Diffusion row) and ``quantize_tfmq`` (the ``tfmq`` row) in one
    process, plus TIAR and FSC + maintenance alone; calibration data from the cache, as ``tadq run`` has it."""
    import tadq
    from tadq.api import build_quantized_structure
    from tadq.calibration import collect_calibration_set
    from tadq.experiments.rows import method_config
    from tadq.experiments.rows.tfmq import tfmq_config
    from tadq.experiments.run import RunConfig
    from tadq.models import load_pipeline_parts
    from tadq.registry import adapter_for
    from tadq.tfmq import TemporalInformationBlock, apply_tfmq, deployment_grid, grid_inputs, quantize_tfmq
    from tadq.tfmq.tiar import reconstruct_tib

    config = RunConfig()
    model, scheduler = load_pipeline_parts(None)
    adapter = adapter_for(model)
    calib = collect_calibration_set(model, adapter, scheduler.config, config.calibration, cache_dir=config.cache_dir)
    quant, settings = method_config("qdiffusion", preset, config), tfmq_config(config)
    times: dict[str, tuple[float, float]] = {}
    _, *times["qdiffusion"] = _clock(lambda: tadq.quantize(model, scheduler, quant, calibration=calib,
                                                           progress=False))
    tfmq, *times["tfmq"] = _clock(lambda: quantize_tfmq(model, scheduler, quant, settings, config.sampler,
                                                        calibration=calib, cache_dir=config.cache_dir, progress=False))
    fresh = build_quantized_structure(model, quant)
    t, labels, _ = grid_inputs(deployment_grid(scheduler, config.sampler), 0)
    _, *times["tiar alone"] = _clock(lambda: reconstruct_tib(
        TemporalInformationBlock(fresh.model, adapter), TemporalInformationBlock(model, adapter), t, labels,
        quant.reconstruction, settings))
    _, *times["fsc + maintenance alone"] = _clock(lambda: apply_tfmq(tfmq, model, scheduler, settings,
                                                                     config.sampler, progress=False))
    return times


def paired_psnr(run_dir: str, reference: str = "Q-Diffusion") -> dict[str, dict[str, Any]]:
    """Per row of a ``tadq run`` folder: mean PSNR vs FP, and its mean per-sample difference from ``reference`` on
    the same noise with a 95 % interval (1.96 standard errors), from the saved cells. ``run_dir`` may name several
    folders, comma-separated, whose FP samples must be identical (runs of the same model, noise and sampler)."""
    folders = [part for part in run_dir.split(",") if part]
    return paired_rows(merged_cells([report_cells(folder) for folder in folders]), reference)


def report_cells(folder: str) -> list[dict]:
    """The cells of the run whose report ``folder`` holds (``results.json``'s ``cell_keys``): a rerun with other
    settings (seed, sample count, sampler) leaves the earlier run's cells in ``cells/``, and pairing every file there
    mixed two runs' rows, each (name, bits) silently taken from whichever came last. A folder whose report does not
    name its cells (tadq before it did) is read whole, and refused when it holds one row twice."""
    from pathlib import Path

    from tadq.experiments.run import CELL_SUFFIX, load_cell

    paths = sorted(Path(folder, "cells").glob(f"*{CELL_SUFFIX}"))
    if not paths:
        raise ValueError(f"{folder} holds no run cells ({folder}/cells/*{CELL_SUFFIX}); give a tadq run folder")
    keys = None
    try:
        keys = json.loads(Path(folder, "results.json").read_text(encoding="utf-8")).get("cell_keys")
    except (OSError, ValueError, AttributeError):  # no report yet (interrupted), or one of an older tadq
        pass
    cells = {path: load_cell(path) for path in paths}
    if isinstance(keys, list):
        cells = {path: cell for path, cell in cells.items() if cell.get("key") in keys}
    seen: dict[tuple[str, str], Path] = {}
    for path, cell in cells.items():
        row = (cell["name"], cell["bits"])
        if row in seen:
            raise ValueError(f"{folder} holds the {row[0]} {row[1]} row twice ({seen[row].name} and {path.name}): "
                             "cells of runs with different settings, and its results.json does not say which are "
                             "its own; rerun tadq run into the folder (finished cells are reused) or move the "
                             "other run's cells out")
        seen[row] = path
    return list(cells.values())


def merged_cells(folders: list[list[dict]]) -> list[dict]:
    """The cells of several run folders as one: the first folder's FP cells stand for all; a later folder's FP cell
    must equal the first folder's of the same shape (else its rows were not drawn from the same noise)."""
    first, *others = folders
    fps = [cell for cell in first if cell["name"] == "FP"]
    cells = list(first)
    for index, folder in enumerate(others, start=2):
        for cell in folder:
            if cell["name"] != "FP":
                cells.append(cell)
                continue
            same = [fp for fp in fps if fp["images"].shape == cell["images"].shape]
            if not same or not torch.equal(same[0]["images"], cell["images"]):
                raise ValueError(f"folder {index}'s FP samples differ from the first folder's: its rows were not "
                                 "drawn from the same noise and cannot be paired with them")
    return cells


def paired_rows(cells: list[dict], reference: str) -> dict[str, dict[str, Any]]:
    """``paired_psnr`` over loaded cells. Each row is compared with the ``reference`` row of its own bit-width, or,
    for ``reference`` = "name@bits" (e.g. ``Q-Diffusion + TAC@W8A8``), with that one row whatever its own bit-width
    (a preset against another: W8A8-WSYM against W8A8). With several bit-widths in the folder the keys are
    "name bits" (one name per row would let one preset's row overwrite another's). A diverged row (NaN or Inf
    samples), or one paired with a diverged row, has NaN numbers and says why under ``diverged`` /
    ``reference_diverged``."""
    from tadq.metrics import psnr_per_sample
    from tadq.safefiles import nonfinite_count

    fp = next((cell for cell in cells if cell["name"] == "FP"), None)
    if fp is None:  # was a bare StopIteration
        rows = sorted({(cell["name"], cell["bits"]) for cell in cells})
        raise ValueError(f"no FP cell to measure PSNR against; rows: {rows}")
    rows = [cell for cell in cells if cell is not fp and cell["images"].shape == fp["images"].shape]
    several = len({cell["bits"] for cell in rows}) > 1
    # a row whose samples hold NaN or Inf (a diverged model; tadq run reports it as NaN) has no PSNR: its numbers
    # and those of the rows paired with it are NaN (null in the JSON), the rest are paired as usual (PSNR of its
    # images raised, and the whole folder got nothing but that error, naming no row)
    diverged = {(cell["name"], cell["bits"]): f"{bad} of {len(cell['images'])} samples hold NaN or Inf"
                for cell in rows if (bad := nonfinite_count(cell["images"]))}
    psnr = {(cell["name"], cell["bits"]): None if (cell["name"], cell["bits"]) in diverged
            else psnr_per_sample(cell["images"].clamp(-1, 1), fp["images"].clamp(-1, 1)) for cell in rows}
    fixed = tuple(reference.rsplit("@", 1)) if "@" in reference else None
    if fixed is not None and fixed not in psnr:
        raise ValueError(f"no row {fixed[0]!r} at {fixed[1]} to pair with; rows: {sorted(psnr)}")
    results = {}
    for (name, bits), values in psnr.items():
        key = fixed or (reference, bits)
        if key not in psnr:
            raise ValueError(f"no {reference!r} row at {bits} to pair {name!r} with; rows: {sorted(psnr)}")
        row: dict[str, Any] = {"psnr": math.nan, "difference": math.nan, "interval": math.nan}
        if values is not None:
            row["psnr"] = float(values.mean())
        if values is not None and psnr[key] is not None:
            row["difference"], row["interval"] = paired_difference(values, psnr[key])
        for what, which in (("diverged", (name, bits)), ("reference_diverged", key)):
            if which in diverged:
                row[what] = diverged[which]
        results[f"{name} {bits}" if several else name] = row
    return results


def paired_difference(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean of ``values - reference`` (per-sample scores on the same noise) and its 95 % interval, 1.96 standard
    errors; in the tensors' dtype."""
    difference = values - reference
    if len(difference) < 2:  # one sample has no spread: the interval is undefined (NaN, null in the JSON printed)
        return float(difference.mean()), float("nan")
    return float(difference.mean()), float(1.96 * difference.std() / len(difference) ** 0.5)


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[:1] == ["cosines"] and len(argv) > 1:
        print(json.dumps(temporal_cosines(argv[1:]), indent=1))
    elif argv[:1] == ["timing"]:
        print(json.dumps(calibration_times(*argv[1:2]), indent=1))
    elif argv[:1] == ["paired"] and len(argv) > 1:
        from tadq.report import dumps_json

        try:
            paired = paired_psnr(*argv[1:3])
        except ValueError as error:  # a folder, row or pairing the user named wrong: one line, not a traceback
            raise SystemExit(f"error: {error}") from None
        print(dumps_json(paired), end="")  # strict JSON: an undefined interval is null, not NaN
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
