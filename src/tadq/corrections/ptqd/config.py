"""``PTQDConfig``: which of PTQD's three corrections act, and how their statistics are collected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tadq.corrections.base import CorrectionConfig, check_selection_seed
from tadq.corrections.sequential import check_selection_score
from tadq.corrections.tcec.config import SELECTION_SEED_OFFSET

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
        select: A held-out guard (not in the paper): after the fit, score CNC + BC as configured, BC alone, CNC
            alone and no correction on held-out calibration noise (``held_out_seed``, ``selection_samples``, final
            x_0 MSE against FP from the same noise) and keep the best, so PTQD never stays on where the fitted
            statistics make the samples worse than its base (docs/methods/ptqd.md#held-out-guard). VSC keeps its
            setting in every candidate.
        selection_seed: Held-out seed of that choice; ``None``: ``seed + SELECTION_SEED_OFFSET`` (100000).
        selection_samples: Trajectories of the held-out score.
        selection_score: ``"final_mse"`` (mean squared error over all held-out trajectories) or ``"log_mse"``
            (mean of each trajectory's log MSE: mean PSNR's ranking, robust to a few heavy-tailed trajectories;
            ``tadq.corrections.sequential.SELECTION_SCORES``).
    """

    # fields added after PTQD's first JSON form (still version 1), with what a payload written before each meant
    # (tadq.config: a tadq-written payload lacking one gets this value, not today's default): before f8df7ec VSC
    # used σ' in both DDIM terms (full_code); the held-out guard came later, off
    fields_added: ClassVar[dict[str, Any]] = {
        "vsc_form": "full_code", "select": False, "selection_seed": None, "selection_samples": 64,
        "selection_score": "final_mse",
    }

    correlated: bool = True
    bias: bool = True
    variance: bool = True
    clamp_negative_k: bool = True
    vsc_form: Literal["noise_only", "full_code"] = "noise_only"
    select: bool = False
    selection_seed: int | None = None
    selection_samples: int = 64
    selection_score: Literal["final_mse", "log_mse"] = "final_mse"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("correlated", "bias", "variance", "clamp_negative_k", "select"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PTQDConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.vsc_form not in ("noise_only", "full_code"):
            raise ValueError(f"PTQDConfig.vsc_form must be 'noise_only' or 'full_code', got {self.vsc_form!r}")
        check_selection_seed("PTQDConfig", self.seed, self.selection_seed, self.held_out_seed)
        if isinstance(self.selection_samples, bool) or not isinstance(self.selection_samples, int) \
                or self.selection_samples < 1:
            raise ValueError(f"PTQDConfig.selection_samples must be a positive int, got {self.selection_samples!r}")
        check_selection_score(self.selection_score, "PTQDConfig.selection_score")
        if self.select and not (self.correlated or self.bias):
            raise ValueError("PTQDConfig.select chooses among CNC and BC: it needs correlated or bias on")

    @property
    def held_out_seed(self) -> int:
        """The seed that scores the guard's candidates."""
        return self.seed + SELECTION_SEED_OFFSET if self.selection_seed is None else self.selection_seed
