"""``TCECConfig``: timestep-aware cumulative error compensation and its [RECON] choices (methods.md §4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tadq.corrections.base import CorrectionConfig
from tadq.corrections.pair import TrajectoryMode

__all__ = ["SELECTION_SEED_OFFSET", "TCECConfig"]

SELECTION_SEED_OFFSET = 100_000  # held-out seeds far from the calibration (0...) and evaluation (1000...) ones


def _unit_floats(name: str, values: tuple[float, ...]) -> None:
    if not values or any(not 0.0 <= float(v) <= 1.0 for v in values):
        raise ValueError(f"TCECConfig.{name} must be a non-empty tuple of numbers in [0, 1], got {values!r}")


@dataclass(frozen=True)
class TCECConfig(CorrectionConfig):
    """TCEC (Liu et al., arXiv 2508.12094): per-step channel-wise error scale K_t, compensated online.

    The paper's final formula (its Eq. 18) was not retrieved; the compensation is the reconstruction of methods.md
    §4 B6, with a ∈ [0, 1] mixing the immediate (a = 1) and the delayed window-1 (a = 0) forms:

        ε̃_t = ε̂_t − a K_t ε̂_t − (1−a) κ (A_t/B_t) B_{t+1} K_{t+1} ε̂_{t+1}   [− (1−a) K_t ε̂_t at the last step]

    Args:
        mix: a, used as is when ``select`` is off (1: immediate, 0: delayed, between: hybrid).
        damping: κ of the delayed term.
        select: Choose (a, κ) among ``mix_candidates`` × ``damping_candidates`` by the held-out final-x_0 error
            (``selection_seed``, ``selection_samples``). Needs the networks, so it happens in sequential fitting
            (``fit_stack``); a one-shot ``fit(pair)`` uses ``mix``/``damping``.
        relative_weight: λ₁ of the masked relative term in the K fit (0: the least squares of methods.md §4 B5).
        mask_threshold: τ of the mask, in units of std(ε) of the step.
        target: ``"same_input"``: e_t = ε̂(x̂_t) − ε_θ(x̂_t), the step's own quantization error (the paper's e_t);
            ``"fp_trajectory"``: against ε_θ(x_t) on the FP trajectory.
        sequential: Fit K_t with the earlier steps' compensation active.
        selection_seed: Held-out calibration seed of the (a, κ) choice; must differ from ``seed`` and from every
            evaluation seed. ``None``: ``seed + SELECTION_SEED_OFFSET`` (100000).
        selection_samples: Trajectories of the held-out score.
        error_model: ``"on_estimate"``: e_t = K_t ε̂_t by least squares of e on ε̂ (methods.md §4 B5); with
            quantization noise in ε̂ this shrinks K toward 0 (regression dilution). ``"on_target"``: regress ε̂ on
            the clean ε (ε̂ ≈ a ε, PTQD's direction) and set K = 1 − 1/a, which noise in ε̂ does not bias.
        refit_candidates: Refit K_t sequentially for every (a, κ) candidate (exact: K_t then sees the states that
            candidate produces; one fit per candidate) instead of fitting K_t once with the first candidate
            (immediate, a = 1) and scoring the others with those tables (one fit in all).
    """

    trajectory: TrajectoryMode = "quantized"
    mix: float = 1.0
    damping: float = 1.0
    select: bool = True
    mix_candidates: tuple[float, ...] = (1.0, 0.5, 0.0)
    damping_candidates: tuple[float, ...] = (1.0, 0.5)
    relative_weight: float = 0.0
    mask_threshold: float = 0.05
    target: Literal["same_input", "fp_trajectory"] = "same_input"
    sequential: bool = True
    selection_seed: int | None = None
    selection_samples: int = 64
    refit_candidates: bool = False
    error_model: Literal["on_estimate", "on_target"] = "on_estimate"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mix_candidates", tuple(float(v) for v in self.mix_candidates))
        object.__setattr__(self, "damping_candidates", tuple(float(v) for v in self.damping_candidates))
        for name in ("select", "sequential", "refit_candidates"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TCECConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _unit_floats("mix_candidates", self.mix_candidates)
        _unit_floats("damping_candidates", self.damping_candidates)
        for name in ("mix", "damping", "relative_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TCECConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.mask_threshold < 0:
            raise ValueError("TCECConfig.mask_threshold must be >= 0")
        if self.error_model not in ("on_estimate", "on_target"):
            raise ValueError(f"TCECConfig.error_model={self.error_model!r}; accepted: ('on_estimate', 'on_target')")
        if self.target not in ("same_input", "fp_trajectory"):
            raise ValueError(f"TCECConfig.target={self.target!r}; accepted: ('same_input', 'fp_trajectory')")
        if self.selection_seed is not None and (self.selection_seed == self.seed or self.selection_seed < 0):
            raise ValueError("TCECConfig.selection_seed must be a non-negative calibration seed other than seed")
        if self.selection_samples < 1:
            raise ValueError("TCECConfig.selection_samples must be >= 1")

    @property
    def held_out_seed(self) -> int:
        """The seed that scores the (a, κ) candidates."""
        return self.seed + SELECTION_SEED_OFFSET if self.selection_seed is None else self.selection_seed
