"""Figures people would rather look at than read: sample grids and per-step error curves."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from tadq.utils import save_figure  # noqa: E402

__all__ = ["gap_note", "image_grid", "plot_positive", "plot_steps", "save_comparison_grid", "save_error_curves"]

PANEL_TITLE_CHARS = 40  # a 3.2-inch panel holds about this many characters at font size 10; longer titles wrap
GRID_DPI = 130  # the sample grid PNG's resolution
GRID_MARGIN = 1.15  # a panel's size over its grid's: the axes' share of the panel after tight_layout
NOT_FINITE_RGB = (1.0, 0.0, 0.0)  # how a NaN or infinite pixel is drawn: a colour no grey or clipped pixel has


def image_grid(images: Tensor, columns: int = 8) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows·H, columns·W[, C]) array in [0, 1].

    Only grey (C = 1) and RGB (C = 3) are colour images; any other channel count (a 2- or 5-channel pixel model,
    4 channels that are not RGBA) shows each sample's channels side by side in grey, so nothing is read as alpha
    and matplotlib is never handed a shape it cannot draw. Finite values outside [-1, 1] are clipped to it; a
    NaN or infinite value comes back as NaN (an infinity was clipped to a plausible black or white pixel, a NaN
    drawn as the background), so ``save_comparison_grid`` can show it.
    """
    x = images.detach().float()
    x = torch.where(torch.isfinite(x), (x.clamp(-1, 1) + 1) / 2, torch.nan).cpu().numpy()
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


def _fit_title(ax, text: str, width_px: float, fontsize: int = 10) -> None:
    """``text`` as ``ax``'s title, wrapped at ``PANEL_TITLE_CHARS`` characters or fewer until it fits ``width_px``:
    a count of characters alone let wide ones (a model folder in capitals, "WWW...") run off the figure, the label
    cut with nothing said."""
    renderer = ax.figure.canvas.get_renderer()
    chars = PANEL_TITLE_CHARS
    while True:
        title = ax.set_title(textwrap.fill(text, chars), fontsize=fontsize)
        if chars <= 4 or title.get_window_extent(renderer).width <= width_px:
            return
        chars -= 4


def save_comparison_grid(panels: dict[str, Tensor], path: str | Path, columns: int = 8, panels_per_row: int = 4
                         ) -> Path:
    """One PNG with a titled grid per variant (FP first, ``panels_per_row`` per row), same noise in the same cell.

    NaN or infinite pixels (a diverged variant) are drawn red and the panel's title counts the samples holding
    them; they were drawn as the white background, a blank panel that said nothing."""
    path = Path(path)
    per_row = min(panels_per_row, len(panels))
    rows = -(-len(panels) // per_row)
    grids = [image_grid(images, columns) for images in panels.values()]
    # at least one PNG pixel per grid pixel: 256 samples of 32×32 in a fixed 3.2-inch panel were drawn at a third of
    # their size with nearest-neighbour sampling, most pixel rows dropped (GRID_MARGIN: the title and padding)
    width = max(3.2, GRID_MARGIN * max(grid.shape[1] for grid in grids) / GRID_DPI)
    height = max(3.6, GRID_MARGIN * max(grid.shape[0] for grid in grids) / GRID_DPI + 0.8)
    fig, axes = plt.subplots(rows, per_row, figsize=(width * per_row, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, images), grid in zip(axes.flat, panels.items(), grids, strict=False):
        if grid.ndim == 3:  # RGB: imshow has no colour for NaN in colour images
            grid[np.isnan(grid).any(axis=-1)] = NOT_FINITE_RGB
        bad = int((~torch.isfinite(images.detach())).flatten(1).any(1).sum()) if images.numel() else 0
        note = f" ({bad} of {len(images)} not finite: red)" if bad else ""
        cmap = plt.get_cmap("gray").with_extremes(bad=NOT_FINITE_RGB)
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        _fit_title(ax, title + note, 0.9 * fig.get_figwidth() * fig.dpi / per_row)  # a margin between panels
    fig.tight_layout()
    return save_figure(fig, path, dpi=GRID_DPI)


def gap_note(values: np.ndarray, zero: str = "0 at every step") -> str:
    """What a log axis cannot draw of a curve, for its legend entry: a curve with no positive value (a variant
    whose trajectory is the FP one at every step) and the steps whose value is not finite (a diverged row) were
    left out without a word, the legend naming a curve the axes did not show. ``zero``: what says the former."""
    finite = np.isfinite(values)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        return f" (not finite at {len(bad)} of {len(values)} steps from step {bad[0]}, not drawn)"
    if len(values) and not (values > 0).any():
        return f" ({zero}, not drawn)"
    return ""


def plot_steps(ax, values: np.ndarray, label: str, **look: Any):
    """``values`` against the step as a line (non-finite values left as gaps); a value with no drawn neighbour (a
    one-step sampler's only value, a step between two gaps) gets a marker, as a line through one point is
    invisible. Returns the line."""
    values = np.asarray(values, dtype=np.float64)
    drawn = np.isfinite(values)
    neighbour = np.zeros_like(drawn)
    neighbour[1:] |= drawn[:-1]
    neighbour[:-1] |= drawn[1:]
    alone = drawn & ~neighbour
    markers = {"marker": "o", "markersize": 3, "markevery": alone.tolist()} if alone.any() else {}
    (line,) = ax.plot(np.arange(len(values)), np.where(drawn, values, np.nan), label=label, **markers, **look)
    return line


def plot_positive(ax, values: np.ndarray, label: str, look: dict) -> None:
    """``plot_steps`` of the positive finite values only (a log axis): the others are gaps."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        plot_steps(ax, np.where(np.isfinite(values) & (values > 0), values, np.nan), label, **look)


def save_error_curves(
    curves: dict[str, Tensor], path: str | Path, title: str = "", reference: str | None = None,
) -> Path:
    """Per-step MSE(x_t FP, x_t quantized) for every variant, log scale, step 0 = x_T.

    Zero errors (x_T, shared by FP and quantized runs) are left out so the log axis spans the curves; a curve with
    no positive error at all, or with non-finite steps, says so in its legend entry. With ``reference`` (a key of
    ``curves``) a second panel shows each curve divided by it: how each variant bends the reference's error,
    which the log panel compresses.
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
        plot_positive(axes[0, 0], values, label + gap_note(values, "0 at every step: the FP trajectory"), look)
        if ratio:
            with np.errstate(divide="ignore", invalid="ignore"):
                relative = np.where(base > 0, values / base, np.nan)
            plot_positive(axes[0, 1], relative, label, look)
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_xlabel("sampler step (0 = initial noise)")
    ax.set_ylabel("MSE vs FP trajectory")
    ax.set_title(title or "per-step trajectory error", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    else:  # an empty figure said nothing about why
        ax.text(0.5, 0.5, "no quantized variant to compare with FP", ha="center", va="center",
                transform=ax.transAxes)
    if ratio:
        ax = axes[0, 1]
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")  # 0.5× and 2× equally far from the reference
        ax.set_xlabel("sampler step (0 = initial noise)")
        ax.set_ylabel(f"MSE / MSE of {reference}")
        none = "" if (np.isfinite(base) & (base > 0)).any() else f" (undefined: {reference}'s error is never > 0)"
        ax.set_title(textwrap.fill(f"relative to {reference}{none}", 2 * PANEL_TITLE_CHARS), fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
