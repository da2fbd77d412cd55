"""The results table, as Markdown (README, report) and as a rich table (terminal)."""

from __future__ import annotations

from typing import Any

__all__ = ["COLUMNS", "markdown_table", "format_cell"]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"), ("bits", "bits"), ("fd_digits", "FD-digits ↓"), ("agreement", "class agree ↑"),
    ("psnr", "PSNR vs FP (dB) ↑"), ("ssim", "SSIM vs FP ↑"), ("final_mse", "final x_0 MSE ↓"),
    ("setup_s", "quantize (s)"), ("sampling_s", "sample (s)"),
)


def format_cell(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN: not measured
        return "–"
    if isinstance(value, str):
        return value
    if key == "final_mse":
        return f"{value:.2e}"
    if key in ("agreement", "ssim"):
        return f"{value:.3f}"
    if key in ("setup_s", "sampling_s"):
        return f"{value:.0f}"
    return f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(format_cell(k, row.get(k)) for k, _ in COLUMNS) + " |" for row in rows]
    return "\n".join([header, rule, *body])
