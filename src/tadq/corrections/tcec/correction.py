"""TCEC's online compensation of the per-step error with the cached previous output (docs/methods/tcec.md).

Error model: the quantized network's error at step t is e_t ≈ E_t(ε̂_t) = K_t ⊙ ε̂_t (+ b_t with ``offset``), K_t and
b_t (S, C) or, at full resolution, (S, C, H, W), fitted by the closed form of ``tadq.corrections.scaling``. Under
J ≈ 0 an error left in step t+1 reaches x_t as B_{t+1} e_{t+1} and moves x_{t-1} by A_t B_{t+1} e_{t+1}; the delayed
term cancels that through step t's ε:

    ε̃_t = ε̂_t − a E_t(ε̂_t) − (1−a) κ (A_t / B_t) B_{t+1} E_{t+1}(ε̂_{t+1})

and the last step also removes its own leftover (1−a) E_t(ε̂_t). The previous step's estimated error B_{t+1} E_{t+1}
is cached between calls (one latent per batch), so the steps must run in order over the same batch. Steps before
``start`` (a fraction of the grid) are left alone, and the window's first step has no delayed term. A ``strength``
of 0 (the "no compensation" candidate of the held-out selection) turns the correction off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tadq.corrections.scaling import broadcast_row, fit_channel_affine, fit_through_coefficient, pixel_means
from tadq.corrections.sequential import SequentialCorrection, StepTargets
from tadq.corrections.tcec.config import TCECConfig
from tadq.corrections.tcec.propagation import step_coefficients
from tadq.registry import register_correction
from tadq.sampling import StepContext, require_one_step, sampler_step

__all__ = ["TCECCorrection", "tcec_tables"]


@register_correction(TCECConfig)
class TCECCorrection(SequentialCorrection):
    """Immediate, delayed (window 1) or hybrid compensation of ε̂ (module docstring).

    Tables: ``k`` K_t and ``b`` b_t, (S, C) or (S, C, H, W). Buffers ``mix`` (a), ``damping`` (κ), ``start`` (the
    window's first step as a fraction of the grid) and ``strength`` (1, or 0 when the selection switched the
    compensation off) hold the settings in use, so a saved correction reloads with them.
    """

    def __init__(self, config: TCECConfig) -> None:
        super().__init__(config)
        self.register_table("k")
        self.register_table("b")
        self.register_buffer("mix", torch.tensor(float(config.mix), dtype=torch.float64))
        self.register_buffer("damping", torch.tensor(float(config.damping), dtype=torch.float64))
        self.register_buffer("strength", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("start", torch.tensor(float(config.start), dtype=torch.float64))
        self._history: tuple[int, Tensor] | None = None  # (step index, B E(ε̂)) of the previous call

    # -- fitting ----------------------------------------------------------------------------------------------------
    def reset_tables(self, steps: Sequence[StepContext], sample_shape: tuple[int, ...]) -> None:
        require_one_step(steps, "TCEC", "its propagation (δ' = (A + B J) δ + B e) and delayed term carry an error "
                         "one step only, while a multistep update carries it two steps through C_x and C_ε")
        shape = (len(steps), sample_shape[0]) if self.config.resolution == "channel" else (len(steps), *sample_shape)
        self.k = torch.zeros(shape, dtype=torch.float64)
        self.b = torch.zeros(shape, dtype=torch.float64)
        self._history = None

    def fit_output_row(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext) -> None:
        per_element, offset = self.config.resolution == "full", self.config.offset
        if self.config.target == "next_state":
            # the whole cumulative error the step would leave against the FP trajectory's next state
            self._fit_in_state(index, eps_hat, targets, step, sampler_step(targets.x_fp, targets.fp_trajectory, step))
            return
        target = targets.same_input if self.config.target == "same_input" else targets.fp_trajectory
        if self.config.error_space == "state":
            # the step's own error as it enters the state, clipping included
            self._fit_in_state(index, eps_hat, targets, step, sampler_step(targets.x_in, target, step))
            return
        if self.config.error_model == "on_target":
            # ε̂ ≈ s ε + d regressed on the clean ε (PTQD's direction): noise in ε̂ does not shrink s;
            # then ε ≈ (ε̂ − d)/s, so e = ε̂ − ε ≈ (1 − 1/s) ε̂ + d/s
            fit = fit_channel_affine(target, eps_hat, relative_weight=0.0, offset=offset, per_element=per_element)
            slope = fit.scale.clamp(min=1e-6)
            self.k[index], self.b[index] = 1.0 - 1.0 / slope, fit.offset / slope
            return
        # ε ≈ s ε̂ + d by least squares of the target on ε̂ (docs/methods/tcec.md): e = ε̂ − ε ≈ (1 − s) ε̂ − d
        fit = fit_channel_affine(eps_hat, target, relative_weight=self.config.relative_weight,
                                 mask_threshold=self.config.mask_threshold, offset=offset, per_element=per_element)
        self.k[index], self.b[index] = 1.0 - fit.scale, -fit.offset

    def _fit_in_state(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext,
                      reference_next: Tensor) -> None:
        """B ⊙ E_t ≈ r with r = step(x̃_t, ε̂) − ``reference_next`` (the state the step should reach; the shared noise
        cancels) and the clip-aware per-element B of ``propagation.step_coefficients``: removing E_t from ε̂ then
        removes r from the next state, to first order."""
        residual = sampler_step(targets.x_in, eps_hat, step) - reference_next
        _, coefficient = step_coefficients(step, targets.x_in, eps_hat)
        fit = fit_through_coefficient(eps_hat, coefficient, residual, offset=self.config.offset,
                                      per_element=self.config.resolution == "full")
        self.k[index], self.b[index] = fit.scale, fit.offset

    def candidates(self) -> list[dict[str, Any]]:
        if not self.config.select:
            return [{}]
        grid = []
        for start in self.config.start_candidates:
            for mix in self.config.mix_candidates:
                for damping in (self.config.damping_candidates if mix < 1.0 else (1.0,)):  # κ only acts when a < 1
                    grid.append({"mix": mix, "damping": damping, "strength": 1.0, "start": start})
        if self.config.include_off:
            grid.append({"mix": 1.0, "damping": 1.0, "strength": 0.0, "start": 0.0})
        return grid

    def selection_noise(self) -> tuple[int | None, int]:
        return self.config.held_out_seed, self.config.selection_samples

    def refit_per_candidate(self) -> bool:
        return self.config.refit_candidates

    def use_candidate(self, settings: dict[str, Any]) -> None:
        self.mix.fill_(float(settings.get("mix", self.config.mix)))
        self.damping.fill_(float(settings.get("damping", self.config.damping)))
        self.strength.fill_(float(settings.get("strength", 1.0)))
        self.start.fill_(float(settings.get("start", self.config.start)))

    @property
    def first_step(self) -> int:
        """The first compensated step index: ``start`` × the number of steps, rounded."""
        return int(round(float(self.start) * self.k.shape[0]))

    # -- sampling ---------------------------------------------------------------------------------------------------
    def estimated_error(self, index: int, eps: Tensor) -> Tensor:
        """E_t(ε̂) = K_t ⊙ ε̂ (+ b_t): the error model's estimate of the step's quantization error."""
        error = broadcast_row(self.k[index], eps) * eps
        return error + broadcast_row(self.b[index], eps) if self.config.offset else error

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        index = self.table_index(step)
        first = self.first_step
        if float(self.strength) == 0.0 or index < first:
            return eps
        mix = float(self.mix)
        own = self.estimated_error(index, eps)
        correction = mix * own
        if mix < 1.0:
            if index > first:
                correction = correction + self._delayed(index, eps, step)
            if step.is_last:
                correction = correction + (1.0 - mix) * own
            self._history = (index, step.coef_eps * own)
        return eps - float(self.strength) * correction

    def _delayed(self, index: int, eps: Tensor, step: StepContext) -> Tensor:
        """(1−a) κ (A_t/B_t) B_{t+1} E_{t+1}(ε̂_{t+1}) from the cached previous call."""
        history = self._history
        if history is None or history[0] != index - 1 or history[1].shape != eps.shape:
            raise RuntimeError("TCEC's delayed term needs the previous step's output of the same batch: run the "
                               "sampler's steps in order (a fresh run starts at step 0)")
        if abs(step.coef_eps) < 1e-12:
            return torch.zeros_like(eps)
        factor = (1.0 - float(self.mix)) * float(self.damping) * step.coef_x / step.coef_eps
        return factor * history[1]


def tcec_tables(correction: TCECCorrection) -> dict:
    """K_t, b_t (pixel means at full resolution) and the chosen (a, κ, strength, start), JSON-ready, step 0
    (noisiest) first."""
    if not correction.fitted:
        raise ValueError("tcec_tables needs a fitted TCECCorrection")
    return {"sampler": correction.table_key.sampler_key, "bits": correction.table_key.bits,
            "k": pixel_means(correction.k).tolist(), "b": pixel_means(correction.b).tolist(),
            "mix": float(correction.mix), "damping": float(correction.damping),
            "strength": float(correction.strength), "start": float(correction.start)}

