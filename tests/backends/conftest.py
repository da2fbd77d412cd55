"""Fixtures shared by the backend tests."""

from __future__ import annotations

import pytest
import torch
from tests.backends.machine import cpu_int_mm_is_exact, exact_int_mm


@pytest.fixture
def int_mm_on_cpu(monkeypatch):
    """``torch._int_mm`` for the CPU stand-in of the int8-cuda layers: the op itself where this CPU sums exactly,
    else ``exact_int_mm``, so the zero-point algebra and im2col around the GEMM are checked on every CPU."""
    if not cpu_int_mm_is_exact():
        monkeypatch.setattr(torch, "_int_mm", exact_int_mm)
