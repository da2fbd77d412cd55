"""The per-step error figure: zero errors left out of the log axis, an optional panel relative to a reference."""

from __future__ import annotations

import matplotlib.image as mpimg
import torch

from tadq.report import save_error_curves


def test_error_curves_add_a_relative_panel_only_for_a_known_reference(tmp_path):
    base = torch.tensor([0.0, 1e-2, 2e-2, 3e-2])
    curves = {"Q-Diffusion W4A4": base, "+ correction W4A4": base * 0.5}
    single = mpimg.imread(save_error_curves(curves, tmp_path / "one.png"))
    double = mpimg.imread(save_error_curves(curves, tmp_path / "two.png", reference="Q-Diffusion W4A4"))
    missing = mpimg.imread(save_error_curves(curves, tmp_path / "missing.png", reference="not a row"))
    assert double.shape[1] > 1.5 * single.shape[1]  # two panels side by side
    assert missing.shape == single.shape


def test_a_long_panel_title_wraps_inside_the_figure(tmp_path, monkeypatch):
    from tadq.report import figures

    title = "W8A8-WSYM qdiffusion · ddim-50-eta0.0 · seed 1000 · 64 samples · int8-compiled"
    images = torch.zeros(16, 1, 8, 8)

    def edge_ink(path, text: str = title) -> float:
        """Darkest value in the image's outer columns (1.0 = white: nothing drawn there)."""
        pixels = mpimg.imread(figures.save_comparison_grid({text: images}, path))[..., :3]
        return float(min(pixels[:, 0].min(), pixels[:, -1].min()))

    assert edge_ink(tmp_path / "wrapped.png") == 1.0
    # wide characters: 40 of them (the wrap width in characters) ran off both sides, the label cut unsaid
    for wide in ("W" * 60, "/MODELS/WWWW-MMMM-QUANTIZED/W4A8-WSYM-QDIFFUSION-TAC-TCEC"):
        assert edge_ink(tmp_path / "wide.png", wide) == 1.0, wide
    monkeypatch.setattr(figures, "PANEL_TITLE_CHARS", 1000)  # unwrapped, the title runs off both sides
    monkeypatch.setattr(figures, "_fit_title", lambda ax, text, width_px: ax.set_title(text, fontsize=10))
    assert edge_ink(tmp_path / "cut.png") < 1.0


def test_a_grid_of_other_channel_counts_shows_the_channels_side_by_side_in_grey(tmp_path):
    from tadq.report import figures

    for channels in (2, 4, 5):  # 2 and 5 made matplotlib raise after sampling; 4 was drawn as RGBA
        images = torch.zeros(3, channels, 6, 10)
        images[:, -1] = 1.0  # the last channel white: with RGBA it was alpha, drawing nothing visible
        grid = figures.image_grid(images, columns=8)
        assert grid.ndim == 2 and grid.shape == (6 + 2, 8 * (channels * 10 + 1) + 1)
        assert grid[1:7, 1 + (channels - 1) * 10: 1 + channels * 10].min() == 1.0  # sample 0's last channel
        assert grid[1:7, 1: 1 + 10].max() == 0.5  # sample 0's first channel, zero in [-1, 1]
        pixels = mpimg.imread(figures.save_comparison_grid({f"{channels} channels": images}, tmp_path / "g.png"))
        assert pixels.shape[-1] == 4 and pixels[..., 3].min() == 1.0  # an opaque figure


def _saved_figure(monkeypatch, module, draw):
    """The figure ``draw()`` hands to ``module.save_figure`` (not written)."""
    kept = []
    monkeypatch.setattr(module, "save_figure", lambda fig, path, **options: kept.append(fig))
    draw()
    return kept[0]


def _drawn_in_axes(fig) -> tuple[list[str], int]:
    """The legend texts of ``fig``'s first axes, and how many pixels of its first line's colour those axes (only:
    other panels restart the colour cycle) show once the legend (which holds a sample of every colour) is
    removed."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    import numpy as np

    ax = fig.axes[0]
    legend = ax.get_legend()
    texts = [text.get_text() for text in legend.get_texts()] if legend is not None else []
    if legend is not None:
        legend.remove()
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float) / 255
    box = ax.get_window_extent()  # display pixels from the bottom left; the buffer's rows start at the top
    height = pixels.shape[0]
    pixels = pixels[height - int(box.y1): height - int(box.y0), int(box.x0): int(box.x1)]
    plt.close(fig)
    colour = np.array(mcolors.to_rgb(ax.get_lines()[0].get_color()))
    return texts, int((np.abs(pixels - colour).max(-1) < 0.1).sum())


def test_an_error_curve_with_one_positive_step_is_drawn(tmp_path, monkeypatch):
    # a one-step sampler: x_T (zero error) and one state; a line through one point drew nothing at all
    from tadq.report import figures

    one_step = {"naive W4A4": torch.tensor([0.0, 1e-3])}
    _, ink = _drawn_in_axes(_saved_figure(monkeypatch, figures, lambda: save_error_curves(one_step, tmp_path / "o")))
    assert ink > 0


def test_error_curves_say_what_the_log_axis_cannot_draw(tmp_path, monkeypatch):
    curves = {"identical W8A8": torch.zeros(4), "diverged W4A4": torch.tensor([0.0, 1e-2, float("nan"), float("inf")]),
              "fine W4A8": torch.tensor([0.0, 1e-3, 2e-3, 3e-3])}
    from tadq.report import figures

    texts, _ = _drawn_in_axes(_saved_figure(monkeypatch, figures, lambda: save_error_curves(curves, tmp_path / "c")))
    assert texts[0].startswith("identical W8A8") and "0 at every step" in texts[0]
    assert texts[1].startswith("diverged W4A4") and "not finite at 2 of 4 steps from step 2" in texts[1]
    assert texts[2] == "fine W4A8"


def test_non_finite_samples_are_shown_and_counted_in_the_grid(tmp_path, monkeypatch):
    import numpy as np

    from tadq.report import figures

    images = torch.zeros(4, 1, 6, 6)
    images[1] = float("nan")
    images[2, 0, 0, 0] = float("inf")  # was clipped to a plausible white pixel
    grid = figures.image_grid(images, columns=4)
    assert np.isnan(grid).sum() == 6 * 6 + 1
    for values in (images, images.expand(-1, 3, -1, -1).clone()):
        path = figures.save_comparison_grid({"diverged": values}, tmp_path / f"{values.shape[1]}.png")
        pixels = mpimg.imread(path)[..., :3]
        red = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
        assert red.any()  # a NaN sample was drawn as the white background: a blank cell
    kept = {}
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, **options: kept.setdefault("fig", fig))
    figures.save_comparison_grid({"diverged": images}, tmp_path / "t.png")
    assert kept["fig"].axes[0].get_title().replace("\n", " ") == "diverged (2 of 4 not finite: red)"


def test_one_step_correction_tables_are_drawn(tmp_path, monkeypatch):
    """A one-step sampler's fitted tables hold one value each: ptqd_tables.png and correction_tables.png drew each
    as a line through one point, which shows nothing."""
    from tadq.corrections import plots
    from tadq.corrections.ptqd import plots as ptqd_plots

    ptqd = {"k": [0.9], "mu": [[0.1]], "sigma_q": [0.05], "sampler": "ddim-1"}
    tac = {"W4A8": {"0:TAC": {"ibc": True, "ner": True, "input_bias": [[0.2, 0.4]], "scale": [[1.1, 1.3]]}}}
    for module, draw in ((ptqd_plots, lambda: ptqd_plots.save_ptqd_tables_plot(ptqd, tmp_path / "p.png")),
                         (plots, lambda: plots.save_correction_tables_plot(tac, tmp_path / "c.png"))):
        _, ink = _drawn_in_axes(_saved_figure(monkeypatch, module, draw))
        assert ink > 0, module.__name__


def test_a_large_grid_gets_a_png_pixel_per_image_pixel(tmp_path, monkeypatch):
    """256 samples of 16×16 (tadq sample --num-samples 256) were squeezed into a 3.2-inch panel: the 2177-pixel
    tall grid drawn into about 400 PNG rows by nearest-neighbour sampling, four of every five pixel rows dropped."""
    from tadq.report import figures

    images = torch.rand(256, 1, 16, 16) * 2 - 1
    grid = figures.image_grid(images, columns=8)
    fig = _saved_figure(monkeypatch, figures, lambda: figures.save_comparison_grid({"many": images}, tmp_path / "g"))
    fig.canvas.draw()
    box = fig.axes[0].get_window_extent()
    scale = figures.GRID_DPI / fig.dpi  # the extent is in the figure's pixels; the PNG is saved at GRID_DPI
    assert box.height * scale >= grid.shape[0] and box.width * scale >= grid.shape[1]
    small = _saved_figure(monkeypatch, figures, lambda: figures.save_comparison_grid({"few": images[:64]}, tmp_path))
    assert tuple(small.get_size_inches()) == (3.2, 3.6)  # a grid that fitted keeps the figure it had
