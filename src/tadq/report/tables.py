"""The results table, as Markdown (README, report) and as a rich table (terminal)."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["COLUMNS", "OPTIONAL_COLUMNS", "columns_for", "fd_columns", "markdown_table", "format_cell", "json_ready",
           "dumps_json"]

COLUMNS: tuple[tuple[str, str], ...] = (
    ("method", "method"), ("bits", "bits"), ("fd_digits", "FD-digits ↓"), ("agreement", "class agree ↑"),
    ("psnr", "PSNR vs FP (dB) ↑"), ("ssim", "SSIM vs FP ↑"), ("final_mse", "final x_0 MSE ↓"),
    ("setup_s", "quantize (s)"), ("sampling_s", "sample (s)"),
)
# shown only when some row measured them (conditional models: the label the prompt asked for)
OPTIONAL_COLUMNS: tuple[tuple[str, str], ...] = (("prompt_accuracy", "prompt agree ↑"),
                                                  ("inception_fid", "Inception FID ↓"))
NOT_RECORDED_AS_NAN = ("setup_s", "sampling_s")  # NaN there means "not recorded" (an older cell), shown as –


def fd_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """Every Fréchet-distance column the rows carry a value in (``fd_<features>``, e.g. FD-digits and FD-photos
    side by side when rows measured both; one was dropped before); FD-digits when none."""
    keys = sorted({key for row in rows for key in row if key.startswith("fd_") and row[key] is not None},
                  key=lambda key: (key != "fd_digits", key))
    return tuple((key, f"FD-{key.removeprefix('fd_')} ↓") for key in keys or ("fd_digits",))


def columns_for(rows: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """``COLUMNS`` (with the rows' own FD columns) plus every optional column some row has a value for (after the
    agreement column)."""
    base: tuple[tuple[str, str], ...] = ()
    for key, title in COLUMNS:
        base += fd_columns(rows) if key == "fd_digits" else ((key, title),)
    extra = tuple(c for c in OPTIONAL_COLUMNS if any(row.get(c[0]) is not None for row in rows))
    at = [key for key, _ in base].index("agreement") + 1
    return base[:at] + extra + base[at:]


def format_cell(key: str, value: Any) -> str:
    value = _python_scalar(value)
    if value is None or (key in NOT_RECORDED_AS_NAN and isinstance(value, float) and value != value):
        return "–"  # not measured (a timing: not recorded)
    if isinstance(value, float) and value != value:  # a metric that was measured and came out NaN: said
        return "NaN"
    if isinstance(value, str):
        return value
    if key == "final_mse":
        return f"{value:.2e}"
    if key in ("agreement", "ssim", "prompt_accuracy"):
        return f"{value:.3f}"
    if key in ("setup_s", "sampling_s"):
        return f"{value:.0f}"
    return f"{value:.2f}"


def markdown_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...] | None = None) -> str:
    """``rows`` as a Markdown table of ``columns`` ((key, title) pairs; default ``columns_for(rows)``)."""
    columns = columns_for(rows) if columns is None else columns
    header = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_markdown_text(format_cell(k, row.get(k))) for k, _ in columns) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def _markdown_text(text: str) -> str:
    """A cell's text that keeps the table whole: a ``|`` in a name opened a column, a line break ended the row."""
    return " ".join(text.replace("|", "\\|").splitlines())


def _python_scalar(value: Any) -> Any:
    """A numpy scalar or a 0-dim tensor as the Python number it holds (a numpy float32 NaN was printed "nan" and
    refused by ``dumps_json``, which knows Python floats only); anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    return value


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``, through dicts, lists and tuples.

    ``json.dumps`` writes them as the bare tokens ``NaN`` and ``Infinity``, which are not JSON: jq, JavaScript and
    most JSON readers other than Python's refuse the whole report. A value that could not be measured (an undefined
    ratio) becomes ``null``, which every reader takes.
    """
    value = _python_scalar(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def dumps_json(value: Any) -> str:
    """Strict JSON text of a report (``json_ready``; ``allow_nan=False`` so nothing non-standard slips through)."""
    return json.dumps(json_ready(value), indent=2, allow_nan=False) + "\n"
