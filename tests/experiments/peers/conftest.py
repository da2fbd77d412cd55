"""A calibration set for the tiny UNet: random noisy inputs at spread timesteps (the peers only need x_t, t)."""

from __future__ import annotations

import pytest
import torch

from tadq.calibration import CalibrationSet


@pytest.fixture
def tiny_calibration() -> CalibrationSet:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=generator)
    t = torch.linspace(0, 999, 64).round().long()
    return CalibrationSet(x=x, t=t, step_index=torch.zeros(64, dtype=torch.long), eps=torch.zeros_like(x), key="tiny")
