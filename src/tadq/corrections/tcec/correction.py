"""TCEC's online compensation of the per-step error with the cached previous output (methods.md §4 B5-B6).

Error model: the quantized network's error at step t is e_t ≈ K_t ⊙ ε̂_t, K_t (S, C) fitted by the closed form of
``tadq.corrections.scaling`` (K = 1 − the scale mapping ε̂ onto ε). Under J ≈ 0 an error left in step t+1 reaches
x_t as B_{t+1} e_{t+1} and moves x_{t-1} by A_t B_{t+1} e_{t+1}; the delayed term cancels that through step t's ε:

    ε̃_t = ε̂_t − a K_t ⊙ ε̂_t − (1−a) κ (A_t / B_t) B_{t+1} K_{t+1} ⊙ ε̂_{t+1}

and the last step also removes its own leftover (1−a) K_t ⊙ ε̂_t. The previous raw output ε̂_{t+1} and its B_{t+1}
are cached between calls (one latent per batch), so the steps must run in order over the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from tadq.corrections.scaling import fit_channel_affine
from tadq.corrections.sequential import SequentialCorrection, StepTargets
from tadq.corrections.tcec.config import TCECConfig
from tadq.registry import register_correction
from tadq.sampling import StepContext

__all__ = ["TCECCorrection", "tcec_tables"]


@register_correction(TCECConfig)
class TCECCorrection(SequentialCorrection):
    """Immediate, delayed (window 1) or hybrid compensation of ε̂ (module docstring).

    Tables: ``k`` K_t (S, C). Buffers ``mix`` (a) and ``damping`` (κ) hold the settings in use (chosen by
    calibration when ``config.select``), so a saved correction reloads with them.
    """

    def __init__(self, config: TCECConfig) -> None:
        super().__init__(config)
        self.register_table("k")
        self.register_buffer("mix", torch.tensor(float(config.mix), dtype=torch.float64))
        self.register_buffer("damping", torch.tensor(float(config.damping), dtype=torch.float64))
        self._history: tuple[int, Tensor, float] | None = None  # (step index, raw ε̂, B) of the previous call

    # -- fitting ----------------------------------------------------------------------------------------------------
    def reset_tables(self, steps: Sequence[StepContext], sample_shape: tuple[int, ...]) -> None:
        self.k = torch.zeros(len(steps), sample_shape[0], dtype=torch.float64)
        self._history = None

    def fit_output_row(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext) -> None:
        target = targets.same_input if self.config.target == "same_input" else targets.fp_trajectory
        if self.config.error_model == "on_target":
            # ε̂ ≈ a ε regressed on the clean ε (PTQD's direction): noise in ε̂ does not shrink a; e ≈ (1 − 1/a) ε̂
            fit = fit_channel_affine(target, eps_hat, relative_weight=0.0)
            slope = fit.scale.clamp(min=1e-6)
            self.k[index] = 1.0 - 1.0 / slope
            return
        fit = fit_channel_affine(eps_hat, target, relative_weight=self.config.relative_weight,
                                 mask_threshold=self.config.mask_threshold)
        self.k[index] = 1.0 - fit.scale

    def candidates(self) -> list[dict[str, Any]]:
        if not self.config.select:
            return [{}]
        grid = []
        for mix in self.config.mix_candidates:
            for damping in (self.config.damping_candidates if mix < 1.0 else (1.0,)):  # κ only acts when a < 1
                grid.append({"mix": mix, "damping": damping})
        return grid

    def selection_noise(self) -> tuple[int | None, int]:
        return self.config.held_out_seed, self.config.selection_samples

    def refit_per_candidate(self) -> bool:
        return self.config.refit_candidates

    def use_candidate(self, settings: dict[str, Any]) -> None:
        self.mix.fill_(float(settings.get("mix", self.config.mix)))
        self.damping.fill_(float(settings.get("damping", self.config.damping)))

    # -- sampling ---------------------------------------------------------------------------------------------------
    def _row(self, index: int, like: Tensor) -> Tensor:
        return self.k[index].to(dtype=like.dtype, device=like.device).view(1, -1, *([1] * (like.ndim - 2)))

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        index = self.table_index(step)
        mix = float(self.mix)
        own = self._row(index, eps) * eps  # K_t ε̂_t
        correction = mix * own
        if mix < 1.0:
            if index > 0:
                correction = correction + self._delayed(index, eps, step)
            if step.is_last:
                correction = correction + (1.0 - mix) * own
        self._history = (index, eps, step.coef_eps)
        return eps - correction

    def _delayed(self, index: int, eps: Tensor, step: StepContext) -> Tensor:
        """(1−a) κ (A_t/B_t) B_{t+1} K_{t+1} ε̂_{t+1} from the cached previous call."""
        history = self._history
        if history is None or history[0] != index - 1 or history[1].shape != eps.shape:
            raise RuntimeError("TCEC's delayed term needs the previous step's output of the same batch: run the "
                               "sampler's steps in order (a fresh run starts at step 0)")
        _, previous, previous_coef_eps = history
        if abs(step.coef_eps) < 1e-12:
            return torch.zeros_like(eps)
        factor = (1.0 - float(self.mix)) * float(self.damping) * step.coef_x / step.coef_eps * previous_coef_eps
        return factor * self._row(index - 1, eps) * previous


def tcec_tables(correction: TCECCorrection) -> dict:
    """The fitted K_t and chosen (a, κ), JSON-ready, step 0 (noisiest) first."""
    if not correction.fitted:
        raise ValueError("tcec_tables needs a fitted TCECCorrection")
    return {"sampler": correction.table_key.sampler_key, "bits": correction.table_key.bits,
            "k": correction.k.tolist(), "mix": float(correction.mix), "damping": float(correction.damping)}
