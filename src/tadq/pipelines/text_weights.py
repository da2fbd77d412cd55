"""Weight-only quantization of a text encoder's Linear layers (off by default).

The text encoder runs once per distinct prompt, not once per step, so its cost is negligible next to the UNet's;
what int8 weights buy is memory. The scheme is the simplest one that needs no calibration data: per output
channel, symmetric, Δ = max|W_row| / (2^(b−1) − 1), codes round(W/Δ) in [−(2^(b−1) − 1), 2^(b−1) − 1]. The
weights are replaced by Δ·codes (fake quantization, like the rest of tadq), which depends on the FP weights only,
so applying it at load time is exact and repeatable: calibrate and deploy with the same ``text_encoder_bits``.
Embedding tables, layer norms and biases stay FP.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["quantize_linear_weights", "TEXT_ENCODER_BITS"]

TEXT_ENCODER_BITS = (8, 4)


@torch.no_grad()
def quantize_linear_weights(module: nn.Module, bits: int = 8) -> list[str]:
    """Fake-quantize every ``nn.Linear`` weight of ``module`` in place (per output channel, symmetric); returns
    the names of the layers changed. Applied twice, it changes nothing beyond float rounding of Δ."""
    if bits not in TEXT_ENCODER_BITS:
        raise ValueError(f"text encoder weight bits must be one of {TEXT_ENCODER_BITS}, got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    names = []
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        weight = layer.weight
        scale = weight.abs().amax(dim=1, keepdim=True).float() / qmax  # (out, 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
        codes = torch.clamp(torch.round(weight.float() / scale), -qmax, qmax)
        weight.copy_((codes * scale).to(weight.dtype))
        names.append(name)
    return names
