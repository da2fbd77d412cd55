"""The report of a recipe search: ``report.json`` (every candidate's cost, score and status, the seeds, why the
winner won), ``report.md`` (the same as tables) and ``pareto.png`` (held-out score against cost, every scored
candidate, the Pareto front highlighted, the winner marked, the budget drawn)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tadq.search.search import REPORT_FILES, SearchResult
from tadq.utils import atomic_write_json, atomic_write_text, save_figure

__all__ = ["write_report", "report_payload", "plot_pareto", "markdown_report"]


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in ("recipe", "score_key")}


def report_payload(result: SearchResult, evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report (what ``report.json`` holds)."""
    payload = {
        "budget": {"kind": result.budget.kind, "value": result.budget.value, "source": result.budget.source,
                   "text": result.budget.describe()},
        "score": "median over held-out trajectories of the final sample's PSNR vs FP (dB), seed 'heldout'",
        "seeds": result.seeds, "settings": result.settings, "stats": result.stats,
        "winner": result.winner, "why": result.reason, "pareto_front": result.front,
        "candidates": [_public(r) for r in result.records],
    }
    if evaluation is not None:
        payload["evaluation"] = evaluation
    return payload


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_report(result: SearchResult, evaluation: dict[str, Any] | None = None) -> str:
    work = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in result.stats.items())
    seeds = ", ".join(f"{key} {value}" for key, value in result.seeds.items())
    lines = [
        "# tadq recipe: search report", "",
        f"Budget: {result.budget.describe()}. Winner: **{result.winner}**.", "",
        f"Why: {result.reason}.", "",
        f"Seeds: {seeds} (the search never samples the evaluation seed).", "",
        f"Work done in this run: {work}.", "",
        "Score: median over the held-out trajectories of the final sample's PSNR against FP from the same noise "
        "(robust to a few heavy-tailed trajectories; mean, 20 % trimmed mean and 10th percentile beside it).", "",
        "| candidate | Gbit-ops / sample | artefact (bytes) | status | median PSNR (dB) | mean | trimmed | p10 | "
        "front |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    front = set(result.front)
    for r in result.records:
        s = r.get("score") or {}
        status = r["status"] if r["status"] == "scored" else f"{r['status']}: {r.get('why', '')}"
        name = f"**{r['name']}**" if r["name"] == result.winner else r["name"]
        lines.append(f"| {name} | {r['gbitops']:.4g} | {_fmt(r.get('bytes'))} | {status} | "
                     f"{_fmt(s.get('median_psnr'))} | {_fmt(s.get('mean_psnr'))} | {_fmt(s.get('trimmed_mean_psnr'))} "
                     f"| {_fmt(s.get('p10_psnr'))} | {'yes' if r['name'] in front else ''} |")
    if evaluation is not None:
        lines += ["", "## On the evaluation seed", "", evaluation["summary"], "",
                  f"{evaluation['num_samples']} samples, evaluation seed {evaluation['seed']}, every in-budget "
                  "candidate rebuilt with the search's settings (the README's rows are the candidates without "
                  "a '(not a README row)' mark).", "",
                  "| candidate | README row | mean PSNR (dB) | median PSNR (dB) | SSIM | final MSE |",
                  "|---|---|---|---|---|---|"]
        for name, row in evaluation["rows"].items():
            label = f"**{name}**" if name == result.winner else name
            if row.get("diverged"):
                label += f" (diverged: {row['diverged']})"
            mse = "–" if row["final_mse"] is None else f"{row['final_mse']:.2e}"
            lines.append(f"| {label} | {'yes' if row['readme_row'] else '(not a README row)'} | "
                         f"{_fmt(row['mean_psnr'])} | {_fmt(row['median_psnr'])} | {_fmt(row['ssim'], 3)} | "
                         f"{mse} |")
    return "\n".join(lines) + "\n"


def plot_pareto(result: SearchResult, path: str | Path) -> None:
    """Held-out score against cost for every scored candidate; front joined, winner starred, budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gbitops = result.budget.kind == "gbitops"
    scored = [r for r in result.records if r["status"] == "scored"]
    cost = (lambda r: r["gbitops"]) if gbitops else (lambda r: r["bytes"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"naive": "s", "qdiffusion": "o", "svdquant": "D", "smoothquant": "^"}
    for base in dict.fromkeys(r["base"] for r in scored):  # every base scored, in search order
        marker = markers.get(base, "v")
        points = [r for r in scored if r["base"] == base]
        ax.scatter([cost(r) for r in points], [r["score"]["median_psnr"] for r in points], marker=marker,
                   color="0.55", label=f"{base} candidates", zorder=2)
    front = [result.record(name) for name in result.front]
    ax.plot([cost(r) for r in front], [r["score"]["median_psnr"] for r in front], "-o", color="tab:blue",
            label="Pareto front", zorder=3)
    for r in scored:
        ax.annotate(r["name"], (cost(r), r["score"]["median_psnr"]), fontsize=6, xytext=(3, 2),
                    textcoords="offset points")
    winner = result.record(result.winner)
    ax.scatter([cost(winner)], [winner["score"]["median_psnr"]], marker="*", s=260, color="tab:red", zorder=4,
               label=f"winner: {winner['name']}")
    ax.axvline(result.budget.value, linestyle="--", color="tab:red", linewidth=1, label="budget")
    # by status: a candidate that diverged on the held-out noise was counted as "over budget"
    unscored = Counter(r["status"] for r in result.records if r["status"] != "scored")
    if unscored:
        ax.text(0.01, 0.01, ", ".join(f"{count} {status}" for status, count in unscored.items()) + ": not drawn",
                transform=ax.transAxes, fontsize=7)
    ax.set_xlabel("Gbit-ops per sample" if gbitops else "artefact bytes (weights + correction tables)")
    ax.set_ylabel("held-out median PSNR vs FP (dB)")
    ax.set_title(f"tadq recipe: {result.budget.describe()}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def write_report(result: SearchResult, out_dir: str | Path, evaluation: dict[str, Any] | None = None) -> None:
    """``report.json``, ``report.md`` and ``pareto.png`` in ``out_dir`` (each written atomically)."""
    out_dir = Path(out_dir)
    json_name, markdown_name, pareto_name = REPORT_FILES  # export_winner removes them first
    atomic_write_json(report_payload(result, evaluation), out_dir / json_name)
    atomic_write_text(markdown_report(result, evaluation), out_dir / markdown_name)
    plot_pareto(result, out_dir / pareto_name)
