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

On a multistep step (dpmsolver++ 2M, x' = A x + B ε + C x_before + D ε_before) the leftover also reaches the next
state through the reused previous state and ε, so the delayed term cancels all three carried pieces (grid order n,
ℓ_n = (1−a) E_n the leftover, u_n = ℓ_n − delayed_n the ε residual the update reuses; docs/methods/tcec.md):

    delayed_n = κ [A_n B_{n-1} ℓ_{n-1} + C_n B_{n-2} ℓ_{n-2} + D_n u_{n-1}] / B_n

which is the one-step term when C = D = 0 (one-step steps compute exactly that). The immediate form needs nothing
extra: the corrected ε is what the update reuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tadq.corrections.scaling import broadcast_row, fit_channel_affine, fit_through_coefficient, pixel_means
from tadq.corrections.sequential import SequentialCorrection, StepTargets
from tadq.corrections.tcec.config import TCECConfig
from tadq.corrections.tcec.propagation import step_coefficients
from tadq.registry import register_correction
from tadq.sampling import StepContext, sampler_step

__all__ = ["TCECCorrection", "tcec_tables"]


@dataclass(frozen=True)
class _History:
    """What the delayed term of the next step needs from this one (one batch).

    ``state``: B_n E_n, the estimated error this step leaves in the state, before the (1−a) factor (the one-step
    delayed term uses only it). For a multistep next step also ``state_before`` (B_{n-1} E_{n-1}; ``None`` when step
    n−1 was not compensated), ``own`` E_n and ``delayed`` the delayed term this step subtracted (``None``: none).
    """

    index: int
    state: Tensor
    state_before: Tensor | None
    own: Tensor
    delayed: Tensor | None


@register_correction(TCECConfig)
class TCECCorrection(SequentialCorrection):
    """Immediate, delayed (window 1) or hybrid compensation of ε̂ (module docstring).

    Tables: ``k`` K_t and ``b`` b_t, (S, C) or (S, C, H, W). Buffers ``mix`` (a), ``damping`` (κ), ``start`` (the
    window's first step as a fraction of the grid) and ``strength`` (1, or 0 when the selection switched the
    compensation off) hold the settings in use, so a saved correction reloads with them.
    """

    host_tables = ("mix", "damping", "strength", "start")  # read as Python floats at every step

    def __init__(self, config: TCECConfig) -> None:
        super().__init__(config)
        self.register_table("k")
        self.register_table("b")
        self.register_buffer("mix", torch.tensor(float(config.mix), dtype=torch.float64))
        self.register_buffer("damping", torch.tensor(float(config.damping), dtype=torch.float64))
        self.register_buffer("strength", torch.tensor(1.0, dtype=torch.float64))
        self.register_buffer("start", torch.tensor(float(config.start), dtype=torch.float64))
        self._history: _History | None = None  # the previous call's pieces of the delayed term

    def earlier_state(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """A TCEC saved before the offset, window and "off" candidate (0391638) holds ``k`` (S, C), ``mix`` and
        ``damping`` only: it compensated every step with K_t alone. Its config reads as that form (``resolution=
        "channel"``, ``offset=False``: ``TCECConfig.fields_added``), so ``b`` is zeros, ``strength`` 1, ``start`` 0.
        Any other config, or a file holding one of the three, is not that tadq's and gets nothing."""
        later = ("b", "strength", "start")
        if ("k" not in stored or self.config.offset or self.config.resolution != "channel"
                or any(name in stored for name in later)):
            return {}
        return {"b": torch.zeros_like(stored["k"]), "strength": torch.tensor(1.0, dtype=torch.float64),
                "start": torch.tensor(0.0, dtype=torch.float64)}

    # -- fitting ----------------------------------------------------------------------------------------------------
    def check_fittable(self, steps: Sequence[StepContext]) -> None:
        multistep = [step.index for step in steps if step.order > 1]
        if multistep and self.config.target == "next_state":
            raise NotImplementedError(
                f"TCECConfig(target='next_state') is not implemented for {steps[0].sampler_key}: {len(multistep)} of "
                "its steps also use the previous step's x̂_0, so the FP and the quantized next states depend on each "
                "track's previous prediction, which the per-step fit targets (StepTargets) do not carry. Use "
                "target='same_input' or 'fp_trajectory' (both work on multistep samplers), or dpmsolver++ with "
                "order=1.")

    def reset_tables(self, steps: Sequence[StepContext], sample_shape: tuple[int, ...]) -> None:
        self.check_fittable(steps)
        shape = (len(steps), sample_shape[0]) if self.config.resolution == "channel" else (len(steps), *sample_shape)
        self.k = torch.zeros(shape, dtype=torch.float64)
        self.b = torch.zeros(shape, dtype=torch.float64)
        self._history = None

    def fit_output_row(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext) -> None:
        per_element, offset = self.config.resolution == "full", self.config.offset
        if self.config.target == "next_state":
            # the whole cumulative error the step would leave against the FP trajectory's next state
            self._fit_in_state(index, eps_hat, targets, step, _mean_step(targets.x_fp, targets.fp_trajectory, step))
            return
        target = targets.same_input if self.config.target == "same_input" else targets.fp_trajectory
        if self.config.error_space == "state":
            # the step's own error as it enters the state, clipping included
            previous = _shared_previous(targets.x_in, step)
            self._fit_in_state(index, eps_hat, targets, step, _mean_step(targets.x_in, target, step, previous))
            return
        # ε ≈ s ε̂ + d by least squares of the target on ε̂ (docs/methods/tcec.md): e = ε̂ − ε ≈ (1 − s) ε̂ − d
        fit = fit_channel_affine(eps_hat, target, relative_weight=self.config.relative_weight,
                                 mask_threshold=self.config.mask_threshold, offset=offset, per_element=per_element)
        k, b = 1.0 - fit.scale, -fit.offset
        if self.config.error_model == "on_target":
            # ε̂ ≈ s ε + d regressed on the clean ε (PTQD's direction): noise in ε̂ does not shrink s;
            # then ε ≈ (ε̂ − d)/s, so e = ε̂ − ε ≈ (1 − 1/s) ε̂ + d/s. Where s ≤ 0 (ε̂ does not follow ε, e.g. a last
            # step whose ε is below the quantization noise) that map does not exist: the estimate's fit stays there
            # (a clamp to s = 1e-6 made K = −10⁶, and the samples diverged)
            on_target = fit_channel_affine(target, eps_hat, relative_weight=0.0, offset=offset,
                                           per_element=per_element)
            invertible = on_target.scale > 0
            slope = torch.where(invertible, on_target.scale, torch.ones_like(on_target.scale))
            k = torch.where(invertible, 1.0 - 1.0 / slope, k)
            b = torch.where(invertible, on_target.offset / slope, b)
        self.k[index], self.b[index] = k, b

    def _fit_in_state(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext,
                      reference_next: Tensor) -> None:
        """B ⊙ E_t ≈ r with r = step(x̃_t, ε̂) − ``reference_next`` (the state the step should reach; the shared noise
        cancels) and the clip-aware per-element B of ``propagation.step_coefficients``: removing E_t from ε̂ then
        removes r from the next state, to first order."""
        residual = _mean_step(targets.x_in, eps_hat, step, _shared_previous(targets.x_in, step)) - reference_next
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
            delayed = None
            if index > first:
                delayed = self._delayed(index, eps, step)
                correction = correction + delayed
            if step.is_last:
                correction = correction + (1.0 - mix) * own
            previous = self._history
            self._history = _History(index=index, state=step.coef_eps * own,
                                     state_before=None if delayed is None or previous is None else previous.state,
                                     own=own, delayed=delayed)
        return eps - float(self.strength) * correction

    def _delayed(self, index: int, eps: Tensor, step: StepContext) -> Tensor:
        """(1−a) κ (A_t/B_t) B_{t+1} E_{t+1}(ε̂_{t+1}) from the cached previous call; on a multistep step also the
        previous state's and ε's share (module docstring)."""
        history = self._history
        if history is None or history.index != index - 1 or history.state.shape != eps.shape:
            raise RuntimeError("TCEC's delayed term needs the previous step's output of the same batch: run the "
                               "sampler's steps in order (a fresh run starts at step 0)")
        if abs(step.coef_eps) < 1e-12:
            return torch.zeros_like(eps)
        leftover = 1.0 - float(self.mix)
        factor = leftover * float(self.damping) * step.coef_x / step.coef_eps
        term = factor * history.state
        if step.order == 1:
            return term
        damping = float(self.damping)
        if history.state_before is not None and step.coef_prev_x != 0.0:
            term = term + (leftover * damping * step.coef_prev_x / step.coef_eps) * history.state_before
        residual = leftover * history.own if history.delayed is None else leftover * history.own - history.delayed
        return term + (damping * step.coef_prev_eps / step.coef_eps) * residual


def _mean_step(x: Tensor, eps: Tensor, step: StepContext, previous: Tensor | None = None) -> Tensor:
    """The update without its noise term (z = 0, the sampler's own σ_t elsewhere, e.g. in DDIM's direction term):
    the state-space fits subtract two updates that share z in deployment, so its σ_t z cancels. Without a z the
    stochastic samplers (DDIM η > 0, DDPM, euler-ancestral) refused the step and the fit failed at its first row."""
    return sampler_step(x, eps, step, noise=torch.zeros_like(x), previous=previous)


def _shared_previous(x: Tensor, step: StepContext) -> Tensor | None:
    """A stand-in previous x̂_0 for a multistep step whose two evaluations are subtracted.

    The state-space fit compares step(x̃, ε̂) with step(x̃, ε) on the same input; both reuse the same previous
    prediction, whose share cancels in the difference (the multistep kinds do not clip, so the update is linear),
    so any common value gives B (ε̂ − ε). ``None`` on one-step steps, which do not take one.
    """
    return torch.zeros_like(x) if step.order > 1 else None


def tcec_tables(correction: TCECCorrection) -> dict:
    """K_t, b_t (pixel means at full resolution) and the chosen (a, κ, strength, start), JSON-ready, step 0
    (noisiest) first."""
    if not correction.fitted:
        raise ValueError("tcec_tables needs a fitted TCECCorrection")
    return {"sampler": correction.table_key.sampler_key, "bits": correction.table_key.bits,
            "k": pixel_means(correction.k).tolist(), "b": pixel_means(correction.b).tolist(),
            "mix": float(correction.mix), "damping": float(correction.damping),
            "strength": float(correction.strength), "start": float(correction.start)}

