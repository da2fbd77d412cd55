"""``PTQDConfig``: which of PTQD's three corrections act, and how their statistics are collected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tadq.corrections.base import CorrectionConfig

__all__ = ["PTQDConfig"]


@dataclass(frozen=True)
class PTQDConfig(CorrectionConfig):
    """PTQD (He et al., NeurIPS 2023): correlated-noise, bias and variance-schedule corrections.

    Defaults follow the authors' full code (docs/methods/ptqd.md), except ``num_samples`` (256 instead of 1024, a CPU
    budget; the fit is O(S) network calls per sample).

    Args:
        correlated: CNC, divide by (1 + k⁺_t) (docs/methods/ptqd.md#correction).
        bias: BC, subtract the per-channel mean error μ_t before dividing (B4.1, full-code order).
        variance: VSC, shrink the sampler's σ_t by the residual variance c_t² σ̃²_q,t (B4.3; DDIM with η > 0 and
            DDPM; at η = 0 it has nothing to absorb).
        trajectory: ``"teacher_forced"`` (the authors' choice, B2: both networks on the FP state, trajectory
            advanced with the FP ε) or ``"quantized"`` (the deployed quantized trajectory).
        vsc_form: Where DDIM uses the calibrated σ': ``"noise_only"`` (the noise term only, the direction term keeps
            σ_t; PTQD's "key code") or ``"full_code"`` (both terms, PTQD's full code). docs/methods/ptqd.md (2) leaves
            the choice open; on the analytic model only ``noise_only`` moves the final variance toward FP
            (README of this folder), so it is the default. DDPM has no direction term: both forms coincide.
        clamp_negative_k: Use k⁺ = max(k, 0) as the authors' code does (B3); ``False`` uses k as fitted and
            requires 1 + k > 0.
        num_samples: Trajectories of the fitting pair (the authors: 1024).
        seed: Noise seed of the fitting pair. It must be a calibration seed, different from every evaluation seed.
    """

    correlated: bool = True
    bias: bool = True
    variance: bool = True
    clamp_negative_k: bool = True
    vsc_form: Literal["noise_only", "full_code"] = "noise_only"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("correlated", "bias", "variance", "clamp_negative_k"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PTQDConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.vsc_form not in ("noise_only", "full_code"):
            raise ValueError(f"PTQDConfig.vsc_form must be 'noise_only' or 'full_code', got {self.vsc_form!r}")
