"""The bench's rows: one per (method, preset, sampler), measured or "not supported: <reason>", with the derived
columns a reader asks for next (sampling overhead against the uncorrected base, cost per sample, artefact size),
and plain-words verdicts where a peer tool beats tadq.
"""

from __future__ import annotations

import math
from typing import Any

from tadq.experiments.rows import method_label
from tadq.report.tables import NOT_RECORDED_AS_NAN, fd_columns
from tadq.sampling import SamplerConfig

__all__ = ["HEADLINE_COLUMNS", "TERMINAL_KEYS", "bench_rows", "format_value", "headline_columns", "peer_verdicts"]

BASE_METHODS = ("naive", "qdiffusion")  # rows without corrections: what a correction's overhead is measured against

HEADLINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("label", "method"), ("bits", "bits"), ("fd_digits", "FD-digits ↓"), ("agreement", "class agree ↑"),
    ("psnr", "PSNR vs FP (dB) ↑"), ("ssim", "SSIM vs FP ↑"), ("final_mse", "final x_0 MSE ↓"),
    ("setup_s", "calibrate (s)"), ("sampling_s", "sample (s)"), ("overhead", "× base"), ("hook_share", "in hooks"),
    ("vs_fp", "× FP"),
    ("gbitops", "Gbit-ops / sample"), ("artefact_kib", "artefact (KiB)"), ("artefact_ratio", "× FP size"),
    ("status", "status"),
)
# the terminal's shorter table (the report files have every column)
TERMINAL_KEYS = ("label", "bits", "fd_digits", "agreement", "psnr", "ssim", "setup_s", "sampling_s", "overhead",
                 "hook_share", "gbitops", "artefact_kib", "status")


def headline_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``HEADLINE_COLUMNS`` with the Fréchet-distance column of the features the rows were measured on (FD-photos
    for the shipped photos model, FD-digits otherwise), as ``tadq run``'s table names it."""
    columns: tuple[tuple[str, str], ...] = ()
    for key, title in HEADLINE_COLUMNS:
        columns += fd_columns(rows) if key == "fd_digits" else ((key, title),)
    return columns


def _fd_key(row: dict[str, Any]) -> str | None:
    """The row's Fréchet-distance key with a value (``fd_digits``, ``fd_photos``...), or ``None``."""
    return next((key for key in row if key.startswith("fd_") and row[key] is not None), None)


def format_value(key: str, value: Any) -> str:
    """One table cell: ``–`` for what was not measured (a NaN timing: a base model saved without its build time,
    as the notes say), ``NaN`` for a quality number of a row that diverged (as ``tadq run``'s report shows both:
    measured, and not a number), otherwise a fixed number of digits per column."""
    if value is None or (key in NOT_RECORDED_AS_NAN and isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value
    if math.isnan(value):
        return "NaN"
    if key == "final_mse":
        return f"{value:.2e}"
    if key in ("agreement", "ssim", "artefact_ratio"):
        return f"{value:.3f}"
    if key in ("setup_s", "sampling_s", "artefact_kib"):
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if key == "hook_share":
        return f"{100 * value:.2f} %"
    if key == "gbitops":
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
    return f"{value:.2f}"


def _measured_row(sampler: SamplerConfig, method: str, preset: str, metrics: dict[str, Any], extras: dict[str, Any],
                  settings: dict[str, Any]) -> dict[str, Any]:
    cost = extras.get("bench", {})
    artefact = cost.get("artefact") or {}
    if method == "fp" and cost.get("fp_bytes"):  # the float32 weights the artefact sizes are compared with
        artefact = {"weights_bytes": cost["fp_bytes"], "ratio": 1.0, "fp_bytes": cost["fp_bytes"]}
    bitops = cost.get("bitops")
    return {
        "sampler": sampler.key, "method": method, "label": metrics["method"], "preset": preset,
        "bits": metrics["bits"], "status": f"diverged: {metrics['diverged']}" if metrics.get("diverged") else "ok",
        "peer": "peer" in settings,
        # every FD the row measured under its own key (FD-photos was dropped: only fd_digits was copied)
        "fd_digits": None, **{key: value for key, value in metrics.items() if key.startswith("fd_")},
        **{key: metrics.get(key) for key in ("agreement", "psnr", "ssim", "final_mse", "setup_s", "sampling_s")},
        "bitops": bitops, "gbitops": bitops * sampler.num_steps / 1e9 if bitops is not None else None,
        "artefact_bytes": artefact.get("weights_bytes"),
        "artefact_kib": artefact["weights_bytes"] / 1024 if artefact else None,
        "artefact_ratio": artefact.get("ratio"), "fp_bytes": artefact.get("fp_bytes"),
        "hooks_s": cost.get("hooks_s"),
        "hook_share": cost["hooks_s"] / metrics["sampling_s"] if cost.get("hooks_s") is not None else None,
        "quant": settings.get("quant"), "notes": {k: v for k, v in cost.items() if k.endswith("_note")},
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``overhead``: sampling time ÷ that of the uncorrected base row with the same quantized network (same
    sampler, same ``QuantConfig``); ``vs_fp``: sampling time ÷ FP's (the cost of simulating fake quantization)."""
    fp = next((r for r in rows if r["method"] == "fp"), None)
    bases = {repr(r["quant"]): r for r in rows if r["method"] in BASE_METHODS and r["status"] == "ok"}
    for row in rows:
        row["overhead"] = row["vs_fp"] = None
        if row["status"] != "ok" or row["method"] == "fp":
            continue
        base = bases.get(repr(row["quant"])) if row["quant"] is not None else None
        if base is not None and base["sampling_s"]:
            row["overhead"] = row["sampling_s"] / base["sampling_s"]
            row["base"] = base["label"]
        if fp is not None and fp["sampling_s"]:
            row["vs_fp"] = row["sampling_s"] / fp["sampling_s"]


def bench_rows(table: dict[str, Any]) -> list[dict[str, Any]]:
    """One sampler's rows in matrix order: FP, then every (method, preset), measured or not supported."""
    key = table["sampler"].key
    results = table["results"]
    labels = [f"{r['method']} {r['bits']}" for r in results["rows"]]
    rows = []
    for method, preset, entry in table["entries"]:
        if isinstance(entry, int):
            extras = results["extras"].get(labels[entry], {})
            rows.append(_measured_row(table["sampler"], method, preset, results["rows"][entry], extras,
                                      table["settings"][entry]))
        else:
            rows.append({"sampler": key, "method": method, "label": method_label(method), "preset": preset,
                         "bits": preset, "status": f"not supported: {entry.reason}", "peer": _is_peer(method),
                         "quant": None})
    _add_ratios(rows)
    for row in rows:
        row.pop("quant", None)
    return rows


def _is_peer(method: str) -> bool:
    from tadq.experiments.rows.peers import PEERS

    return method in PEERS


def _better(metric: str, a: float | None, b: float | None) -> bool:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return False
    return a < b if metric.startswith("fd_") else a > b


def peer_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Plain-words comparison of every measured peer row with tadq's best row of the same preset (by PSNR vs FP),
    on PSNR and on the Fréchet distance the rows were measured with (none for a user's model): says so whenever the
    peer wins."""
    sentences = []
    measured = [r for r in rows if r["status"] == "ok" and r["method"] != "fp"]
    for peer in (r for r in measured if r["peer"]):
        ours = [r for r in measured if not r["peer"] and r["preset"] == peer["preset"] and r["psnr"] is not None]
        if not ours:
            sentences.append(f"{peer['label']} {peer['bits']}: no tadq row at {peer['preset']} to compare with.")
            continue
        best = max(ours, key=lambda r: r["psnr"])
        if _better("psnr", peer["psnr"], best["psnr"]):
            sentences.append(f"{peer['label']} beats every tadq row at {peer['preset']} on PSNR vs FP: "
                             f"{peer['psnr']:.2f} dB vs {best['psnr']:.2f} dB for tadq's best ({best['label']}).")
        else:
            sentences.append(f"At {peer['preset']}, tadq's {best['label']} beats {peer['label']} on PSNR vs FP: "
                             f"{best['psnr']:.2f} vs {peer['psnr']:.2f} dB.")
        fd = _fd_key(peer)  # a user's model has none: min() compared None with None and crashed the report
        with_fd = [r for r in ours if fd is not None and r.get(fd) is not None and not math.isnan(r[fd])]
        if not with_fd:
            continue
        best_fd = min(with_fd, key=lambda r: r[fd])
        if _better(fd, peer[fd], best_fd[fd]):
            sentences.append(f"{peer['label']} beats every tadq row at {peer['preset']} on FD-"
                             f"{fd.removeprefix('fd_')}: {peer[fd]:.2f} vs {best_fd[fd]:.2f} for tadq's best "
                             f"({best_fd['label']}).")
    return sentences
