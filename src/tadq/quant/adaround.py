"""AdaRound: learn whether each weight rounds down or up (Nagel et al. 2020; docs/methods/qdiffusion.md#adaround).

Notation: ``Ŵ = Δ·(clamp(⌊W/Δ⌋ + h(V) + z, qmin, qmax) − z)`` with the rectified sigmoid
``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)``, ζ = 1.1, γ = −0.1. V starts where h(V) = frac(W/Δ), so the soft
weight starts at the float weight; the regulariser ``Σ 1 − |2h(V) − 1|^β`` pushes every h to 0 or 1 as β anneals.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["AdaRound", "ZETA", "GAMMA"]

ZETA, GAMMA = 1.1, -0.1


class AdaRound(nn.Module):
    """Rounding variables for one weight tensor with a fixed (Δ, z).

    Args:
        weight: the float weight W (any shape; Δ broadcasts against it).
        scale: Δ broadcast to ``weight``.
    """

    def __init__(self, weight: Tensor, scale: Tensor) -> None:
        super().__init__()
        scaled = weight.detach() / scale
        floor = torch.floor(scaled)
        rest = (scaled - floor).clamp(1e-4, 1 - 1e-4)
        self.register_buffer("floor", floor)
        self.register_buffer("start", rest)  # frac(W/Δ): nearest rounding is h ≥ 0.5; kept for diagnostics
        # h(V) = rest  ⇔  σ(V) = (rest − γ)/(ζ − γ)  ⇔  V = −log((ζ − γ)/(rest − γ) − 1)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def start_offset(self) -> Tensor:
        """frac(W/Δ) (clamped to [1e-4, 1 − 1e-4]): where h(V) started; nearest rounding rounds up where ≥ 0.5."""
        return self.start

    def h(self) -> Tensor:
        """Soft rounding offset in [0, 1] (hard: 1 where V ≥ 0)."""
        if self.hard:
            return (self.v >= 0).to(self.v.dtype)
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def regularizer(self, beta: float) -> Tensor:
        """Σ 1 − |2h − 1|^β: zero only when every h is exactly 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def forward(self, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
        del x  # the rounding is tied to the weight it was built from
        codes = torch.clamp(self.floor + self.h() + zero_point, qmin, qmax)
        return (codes - zero_point) * scale
