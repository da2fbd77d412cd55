"""``TCECConfig``: timestep-aware cumulative error compensation and its [RECON] choices (docs/methods/tcec.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from tadq.corrections.base import CorrectionConfig, check_count, check_number, check_selection_seed
from tadq.corrections.pair import TrajectoryMode

__all__ = ["SELECTION_SEED_OFFSET", "TCECConfig"]

SELECTION_SEED_OFFSET = 100_000  # held-out seeds far from the calibration (0...) and evaluation (1000...) ones


def _unit_floats(name: str, values: tuple[float, ...]) -> None:
    if not values or any(not 0.0 <= float(v) <= 1.0 for v in values):
        raise ValueError(f"TCECConfig.{name} must be a non-empty tuple of numbers in [0, 1], got {values!r}")


@dataclass(frozen=True)
class TCECConfig(CorrectionConfig):
    """TCEC (Liu et al., arXiv 2508.12094): a per-step error model E_t(ε̂) = K_t ⊙ ε̂ (+ b_t), compensated online.

    The paper's final formula (its Eq. 18) was not retrieved; the compensation is the reconstruction of
    docs/methods/tcec.md, with a ∈ [0, 1] mixing the immediate (a = 1) and the delayed window-1 (a = 0) forms:

        ε̃_t = ε̂_t − a E_t(ε̂_t) − (1−a) κ (A_t/B_t) B_{t+1} E_{t+1}(ε̂_{t+1})   [− (1−a) E_t(ε̂_t) at the last step]

    The paper's own choice is ``resolution="channel", offset=False, start_candidates=(0.0,)``; the defaults are
    what the ablation on the shipped model (tcec/README.md) found to pay: per-element K_t and b_t, compensation
    starting where the held-out score says.

    Args:
        mix: a, used as is when ``select`` is off (1: immediate, 0: delayed, between: hybrid).
        damping: κ of the delayed term.
        start: Compensate only from this fraction of the step grid on (0: every step), when ``select`` is off.
            Early, noisy steps are where the x_0 clip amplifies an ε change most and where the network damps the
            errors it would remove anyway (``tadq analyze``); compensating them can cost more than it saves.
        select: Choose (a, κ, start) among ``mix_candidates`` × ``damping_candidates`` × ``start_candidates`` (and
            "off" with ``include_off``) by the held-out final-x_0 error (``selection_seed``, ``selection_samples``).
            Needs the networks, so it happens in sequential fitting (``fit_stack``); a one-shot ``fit(pair)`` uses
            ``mix``/``damping``/``start``.
        relative_weight: λ₁ of the masked relative term in the K fit (0: the least squares of docs/methods/tcec.md).
        mask_threshold: τ of the mask, in units of std(ε) of the step.
        target: ``"same_input"``: e_t = ε̂(x̂_t) − ε_θ(x̂_t), the step's own quantization error (the paper's e_t);
            ``"fp_trajectory"``: against ε_θ(x_t) on the FP trajectory; ``"next_state"``: against
            ε* = ε_θ(x_t) − (A_t/B_t) δ_t, the ε that lands the quantized state on the FP trajectory's next state
            (the cumulative error, its propagation measured by the fit rather than assumed with J ≈ 0); refused
            on dpmsolver++ 2M, whose next states also depend on each track's previous x̂_0.
        sequential: Fit K_t with the earlier steps' compensation active.
        selection_seed: Held-out calibration seed of the (a, κ) choice; must differ from ``seed`` and from every
            evaluation seed. ``None``: ``seed + SELECTION_SEED_OFFSET`` (100000).
        selection_samples: Trajectories of the held-out score.
        error_model: ``"on_estimate"``: e_t = K_t ε̂_t by least squares of e on ε̂ (docs/methods/tcec.md); with
            quantization noise in ε̂ this shrinks K toward 0 (regression dilution). ``"on_target"``: regress ε̂ on
            the clean ε (ε̂ ≈ a ε, PTQD's direction) and set K = 1 − 1/a, which noise in ε̂ does not bias.
        resolution: ``"channel"``: K_t (and b_t) of shape (C,), the paper's channel-wise model; ``"full"``: one per
            element (C, H, W), fitted over the calibration samples. On a few-channel model (the shipped one has
            C = 1) the channel-wise K_t is a single number per step and cannot follow spatially structured error.
        offset: Also fit a per-step offset b_t: e_t ≈ K_t ⊙ ε̂_t + b_t (the error's mean, which the scale alone
            cannot express).
        error_space: ``"eps"``: fit E_t to the error of ε̂; ``"state"``: fit B ⊙ E_t to the error
            the step puts into the state, step(x̃, ε̂) − step(x̃, ε), with the clip-aware element-wise B of
            ``propagation.step_coefficients`` — where x_0 clipping acts an ε error moves the state with the
            direction coefficient (≈ 1 early on), not B, so the ε-space fit weighs the wrong elements.
            ``error_model``, ``relative_weight`` and ``mask_threshold`` apply to the ε-space fit only.
        include_off: Let the held-out selection also score "no compensation", so a compensation that does not
            pay on held-out noise is switched off instead of kept as the least bad candidate.
        refit_candidates: Refit K_t sequentially for every (a, κ) candidate (exact: K_t then sees the states that
            candidate produces; one fit per candidate) instead of fitting K_t once with the first candidate
            (immediate, a = 1) and scoring the others with those tables (one fit in all).
    """

    # fields added after TCEC's first JSON form (still version 1), with what a payload written before each meant
    # (tadq.config: a tadq-written payload lacking one gets this value, not today's default): refit_candidates
    # (ceebb1c: every candidate was refitted), error_model, and the per-element model with offset, state-space fit,
    # window and "off" candidate of 0391638 (before: channel-wise K_t only, every step, no "off")
    fields_added: ClassVar[dict[str, Any]] = {
        "refit_candidates": True, "error_model": "on_estimate", "start": 0.0, "start_candidates": [0.0],
        "resolution": "channel", "offset": False, "include_off": False, "error_space": "eps",
    }

    trajectory: TrajectoryMode = "quantized"
    mix: float = 1.0
    damping: float = 1.0
    select: bool = True
    start: float = 0.0
    mix_candidates: tuple[float, ...] = (1.0, 0.5, 0.0)
    damping_candidates: tuple[float, ...] = (1.0, 0.5)
    start_candidates: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    relative_weight: float = 0.0
    mask_threshold: float = 0.05
    target: Literal["same_input", "fp_trajectory", "next_state"] = "same_input"
    sequential: bool = True
    selection_seed: int | None = None
    selection_samples: int = 64
    refit_candidates: bool = False
    error_model: Literal["on_estimate", "on_target"] = "on_estimate"
    resolution: Literal["channel", "full"] = "full"
    offset: bool = True
    include_off: bool = True
    error_space: Literal["eps", "state"] = "eps"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "mix_candidates", tuple(float(v) for v in self.mix_candidates))
        object.__setattr__(self, "damping_candidates", tuple(float(v) for v in self.damping_candidates))
        object.__setattr__(self, "start_candidates", tuple(float(v) for v in self.start_candidates))
        for name in ("select", "sequential", "refit_candidates", "offset", "include_off"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TCECConfig.{name} must be True or False, got {getattr(self, name)!r}")
        _unit_floats("mix_candidates", self.mix_candidates)
        _unit_floats("damping_candidates", self.damping_candidates)
        _unit_floats("start_candidates", self.start_candidates)
        for name in ("mix", "damping", "relative_weight", "start"):
            check_number(f"TCECConfig.{name}", getattr(self, name), 0.0, 1.0)
        check_number("TCECConfig.mask_threshold", self.mask_threshold)
        if self.error_model not in ("on_estimate", "on_target"):
            raise ValueError(f"TCECConfig.error_model={self.error_model!r}; accepted: ('on_estimate', 'on_target')")
        if self.error_space not in ("eps", "state"):
            raise ValueError(f"TCECConfig.error_space={self.error_space!r}; accepted: ('eps', 'state')")
        if self.resolution not in ("channel", "full"):
            raise ValueError(f"TCECConfig.resolution={self.resolution!r}; accepted: ('channel', 'full')")
        if self.target not in ("same_input", "fp_trajectory", "next_state"):
            raise ValueError(f"TCECConfig.target={self.target!r}; accepted: ('same_input', 'fp_trajectory', "
                             "'next_state')")
        check_selection_seed("TCECConfig", self.seed, self.selection_seed, self.held_out_seed)
        check_count("TCECConfig.selection_samples", self.selection_samples)

    @property
    def held_out_seed(self) -> int:
        """The seed that scores the (a, κ) candidates."""
        return self.seed + SELECTION_SEED_OFFSET if self.selection_seed is None else self.selection_seed
