"""The report figure of PTQD's fitted statistics: k_t, μ_t per channel and σ_q,t against the sampler step."""

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

__all__ = ["save_ptqd_tables_plot"]


def save_ptqd_tables_plot(tables: Mapping[str, Any] | Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Three panels (k_t, μ_t per channel, σ_q,t vs step index; step 0 is the noisiest) as one PNG.

    Args:
        tables: ``ptqd_tables(correction)``, or a mapping label → such tables to overlay several fits
            (e.g. ``{"W4A8": ..., "W4A4": ...}``).
        path: Where to write the PNG.

    Returns:
        ``path``.
    """
    series = {"": tables} if "k" in tables else dict(tables)
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for label, table in series.items():
        prefix = f"{label} " if label else ""  # plot_steps: a one-step sampler's single value gets a marker
        plot_steps(axes[0], table["k"], f"{prefix}k_t")
        mu = np.asarray(table["mu"], dtype=float).reshape(len(table["k"]), -1)  # (S, C)
        for channel in range(mu.shape[1]):
            plot_steps(axes[1], mu[:, channel], f"{prefix}μ_t[c={channel}]")
        plot_steps(axes[2], table["sigma_q"], f"{prefix}σ_q,t")
    titles = ("correlation coefficient k_t", "bias μ_t (per channel)", "residual std σ_q,t")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("sampler step (0 = noisiest)")
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.legend(fontsize=7)
    first = next(iter(series.values()))
    fig.suptitle(f"PTQD statistics, {first.get('sampler', '')}", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)
