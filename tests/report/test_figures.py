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
