"""Signal-to-noise of a quantized denoiser's output against its FP model, shared by the adapter tests."""

from __future__ import annotations

import torch
from torch import nn

from tadq.registry import adapter_for


def eps_snr_db(fp: nn.Module, qmodel, calib) -> float:
    """10·log10(‖out_FP‖² / ‖out_q − out_FP‖²) over the calibration inputs (both guidance branches)."""
    adapter = adapter_for(fp)
    cond = calib.cond.without_markers()
    with torch.no_grad():
        reference = adapter.predict_eps(fp, calib.x, calib.t, cond)
        error = qmodel(calib.x, calib.t, cond) - reference
    return float(10 * torch.log10(reference.pow(2).mean() / error.pow(2).mean()))
