"""Figures people would rather look at than read: sample grids and per-step error curves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from torch import Tensor  # noqa: E402

from tadq.utils import save_figure  # noqa: E402

__all__ = ["image_grid", "save_comparison_grid", "save_error_curves"]

PANEL_TITLE_CHARS = 40  # a 3.2-inch panel holds about this many characters at font size 10; longer titles wrap


def image_grid(images: Tensor, columns: int = 8) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows·H, columns·W[, C]) array in [0, 1].

    Only grey (C = 1) and RGB (C = 3) are colour images; any other channel count (a 2- or 5-channel pixel model,
    4 channels that are not RGBA) shows each sample's channels side by side in grey, so nothing is read as alpha
    and matplotlib is never handed a shape it cannot draw.
    """
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu().numpy()
    n, c, h, w = x.shape
    if c not in (1, 3):
        x = x.transpose(0, 2, 1, 3).reshape(n, 1, h, c * w)
        n, c, h, w = x.shape
    rows = int(np.ceil(n / columns))
    grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.float32)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = x[i].transpose(1, 2, 0)
    return grid[..., 0] if c == 1 else grid


def save_comparison_grid(panels: dict[str, Tensor], path: str | Path, columns: int = 8, panels_per_row: int = 4
                         ) -> Path:
    """One PNG with a titled grid per variant (FP first, ``panels_per_row`` per row), same noise in the same cell."""
    path = Path(path)
    per_row = min(panels_per_row, len(panels))
    rows = -(-len(panels) // per_row)
    fig, axes = plt.subplots(rows, per_row, figsize=(3.2 * per_row, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, images) in zip(axes.flat, panels.items(), strict=False):
        ax.imshow(image_grid(images, columns), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(textwrap.fill(title, PANEL_TITLE_CHARS), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def save_error_curves(
    curves: dict[str, Tensor], path: str | Path, title: str = "", reference: str | None = None,
) -> Path:
    """Per-step MSE(x_t FP, x_t quantized) for every variant, log scale, step 0 = x_T.

    Zero errors (x_T, shared by FP and quantized runs) are left out so the log axis spans the curves. With
    ``reference`` (a key of ``curves``) a second panel shows each curve divided by it: how each variant bends the
    reference's error, which the log panel compresses.
    """
    path = Path(path)
    ratio = reference is not None and reference in curves
    fig, axes = plt.subplots(1, 2 if ratio else 1, figsize=(12.4 if ratio else 6.4, 4.2), squeeze=False)
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20")
    styles = ("-", "--", "-.", ":")
    base = curves[reference].detach().cpu().double().numpy() if ratio else None
    for position, (label, curve) in enumerate(curves.items()):
        values = curve.detach().cpu().double().numpy()
        look = {"color": colors(position % colors.N), "linestyle": styles[(position // 10) % len(styles)]}
        axes[0, 0].plot(np.arange(len(values)), np.where(values > 0, values, np.nan), label=label, **look)
        if ratio:
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.where(base > 0, values / base, np.nan)
            axes[0, 1].plot(np.arange(len(values)), relative, label=label, **look)
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_xlabel("sampler step (0 = initial noise)")
    ax.set_ylabel("MSE vs FP trajectory")
    ax.set_title(title or "per-step trajectory error", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if ratio:
        ax = axes[0, 1]
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")  # 0.5× and 2× equally far from the reference
        ax.set_xlabel("sampler step (0 = initial noise)")
        ax.set_ylabel(f"MSE / MSE of {reference}")
        ax.set_title(f"relative to {reference}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
