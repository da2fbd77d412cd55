"""The report figure of the sampler-level corrections' fitted tables against the step: TAC's input bias b_t and
NER scale K_t, TCEC's error scale K_t and offset b_t (channel means; step 0 is the noisiest; a dotted line marks where
the chosen TCEC compensation starts)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tadq.report.figures import plot_steps  # noqa: E402
from tadq.utils import save_figure  # noqa: E402

__all__ = ["save_correction_tables_plot"]

PANELS = (("TAC", "input_bias", "TAC IBC: input bias b_t (channel mean)"),
          ("TAC", "scale", "TAC NER: scale K_t (channel mean)"),
          ("TCEC", "k", "TCEC: error scale K_t (channel mean)"),
          ("TCEC", "b", "TCEC: error offset b_t (channel mean)"))


def save_correction_tables_plot(rows: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """One panel per table, one line per row label; ``rows`` maps a row label to its ``correction_tables`` dict."""
    path = Path(path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.5 * len(PANELS), 3.8))
    for ax, (kind, field, title) in zip(axes, PANELS, strict=True):
        for label, tables in rows.items():
            for key, table in tables.items():
                if key.split(":")[-1] != kind:
                    continue
                if kind == "TAC" and not table["ibc" if field == "input_bias" else "ner"]:
                    continue  # that part of TAC is switched off in this row
                if field not in table:
                    continue  # saved before that table existed
                values = np.asarray(table[field], dtype=float)
                line = plot_steps(ax, values.reshape(len(values), -1).mean(1), label)  # one step: a marker
                if kind == "TCEC" and table.get("start", 0.0) > 0:
                    ax.axvline(round(table["start"] * len(values)), color=line.get_color(), linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampler step (0 = noisiest)")
        ax.axhline(1.0 if field == "scale" else 0.0, color="grey", linewidth=0.6)
        if ax.get_legend_handles_labels()[0]:  # the reference line has no label
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not fitted in these rows", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8, color="grey")
    fig.suptitle("fitted sampler-level correction tables", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
