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

    def edge_ink(path) -> float:
        """Darkest value in the image's outer columns (1.0 = white: nothing drawn there)."""
        pixels = mpimg.imread(figures.save_comparison_grid({title: images}, path))[..., :3]
        return float(min(pixels[:, 0].min(), pixels[:, -1].min()))

    assert edge_ink(tmp_path / "wrapped.png") == 1.0
    monkeypatch.setattr(figures, "PANEL_TITLE_CHARS", 1000)  # unwrapped, the title runs off both sides
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
