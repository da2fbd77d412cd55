"""PTQD's per-step correction of the quantized noise prediction and of the sampler variance (docs/methods/ptqd.md).

Notation (docs/methods/notation.md, docs/methods/ptqd.md), per sampler step t, stored in table row ``step.index``:

    ε, ε̂     FP and quantized noise predictions (ε̂ after the corrections earlier in the stack), (N, C, H, W)
    Δ        ε̂ − ε, the quantization error; model: Δ = k_t ε + Δ', Δ' ~ N(μ_t, σ²_q,t)          (B1)
    k_t      pooled OLS slope of all elements of Δ on all elements of ε, intercept discarded     (B3)
    k⁺_t     max(k_t, 0) (``clamp_negative_k``), 0 when CNC is off
    μ_t      per-channel mean of Δ over samples and pixels: the total error, not Δ'        (B3), (C,)
    r        Δ − k⁺_t ε, the residual
    σ_q,t    per-sample population std of r over (C, H, W), averaged over samples            (B3)
    σ̃_q,t    σ_q,t / (1 + k⁺_t), the residual std left after CNC                            (B4.2)
    c_t      ε coefficient of the sampler update, ``StepContext.coef_eps``, evaluated with the sampler's own σ_t:
             DDIM √(1−ᾱ_prev−σ_t²) − √(ᾱ_prev(1−ᾱ_t)/ᾱ_t) (B4.3), DDPM B_t = −β_t/(√α_t √(1−ᾱ_t))

    CNC + BC   ε̃ = (ε̂ − μ_t) / (1 + k⁺_t)                                          (B4.1, full-code order)
    VSC        σ'_t = √max(0, σ_t² − c_t² σ̃²_q,t)                                  (B4.3; DDPM in the same form)

tadq's DDIM step uses σ' in both the direction and the noise term (PTQD's full code), DDPM's in the noise term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tadq.corrections.base import Correction
from tadq.corrections.pair import TrajectoryPair
from tadq.corrections.ptqd.config import PTQDConfig
from tadq.registry import register_correction
from tadq.sampling import NoiseStd, StepContext

__all__ = ["PTQDCorrection", "ptqd_tables", "vsc_report"]


def _fit_step(eps: Tensor, delta: Tensor, config: PTQDConfig) -> tuple[float, Tensor, float]:
    """(k_t, μ_t (C,), σ_q,t) from one step's ε and Δ, both (N, C, H, W) float64 (docs/methods/ptqd.md#statistics)."""
    e, d = eps.flatten(), delta.flatten()
    e_centred = e - e.mean()
    variance = float(e_centred.square().sum())
    k = float((e_centred * (d - d.mean())).sum()) / variance if variance > 0 else 0.0
    k_applied = _applied_k(torch.tensor(k, dtype=torch.float64), config).item()
    if 1.0 + k_applied <= 0.0:
        raise ValueError(f"fitted k = {k:.4g} <= -1 with clamp_negative_k=False: dividing by 1 + k is undefined; "
                         "set clamp_negative_k=True (the authors' k⁺ = max(k, 0))")
    mu = delta.transpose(0, 1).flatten(start_dim=1).mean(dim=1)  # (C,)
    residual = delta - k_applied * eps  # r = Δ − k⁺ ε
    sigma_q = float(residual.flatten(start_dim=1).std(dim=1, correction=0).mean())
    return k, mu, sigma_q


def _applied_k(k: Tensor, config: PTQDConfig) -> Tensor:
    """k⁺ as the hooks use it: 0 without CNC, max(k, 0) with ``clamp_negative_k``."""
    if not config.correlated:
        return torch.zeros_like(k)
    return k.clamp(min=0.0) if config.clamp_negative_k else k


@register_correction(PTQDConfig)
class PTQDCorrection(Correction):
    """CNC + BC on ε̂ after the network, VSC on the sampler's σ_t (docs/methods/ptqd.md#correction).

    Tables (buffers, one row per sampler step): ``k`` (S,) the fitted slope (before clamping), ``mu`` (S, C),
    ``sigma_q`` (S,), and for reports and the mixed-precision rule ``timesteps`` (S,), ``alpha_prod`` ᾱ_t (S,),
    ``std_dev`` σ_t (S,) and ``coef_eps`` c_t (S,) of the fitted sampler. ``timesteps`` is float64 (exact for the
    float32 t of fractional grids: euler on Karras σ's, flow-euler's σ·1000); int64 truncated those, and an int64
    table saved before is read as float64.
    """

    earlier_table_dtypes = {"timesteps": (torch.int64,)}
    # read as Python floats at every step (k⁺, σ̃) or only by reports; μ acts on ε and moves with the module
    host_tables = ("k", "sigma_q", "alpha_prod", "std_dev", "coef_eps", "timesteps")

    def __init__(self, config: PTQDConfig) -> None:
        super().__init__(config)
        for name in ("k", "mu", "sigma_q", "alpha_prod", "std_dev", "coef_eps"):
            self.register_table(name)
        self.register_table("timesteps")
        self._fitted: tuple[Tensor, Tensor] | None = None  # (k, μ) as fitted, while the guard switches them

    # -- the held-out guard (``PTQDConfig.select``) -------------------------------------------------------------------
    def candidates(self) -> list[dict[str, Any]]:
        """With ``select``: CNC + BC as configured, BC alone, CNC alone, none (duplicates dropped)."""
        if not self.config.select:
            return [{}]
        options = [(self.config.correlated, self.config.bias), (False, self.config.bias),
                   (self.config.correlated, False), (False, False)]
        unique = list(dict.fromkeys(options))
        return [{"cnc": cnc, "bc": bc} for cnc, bc in unique]

    def selection_noise(self) -> tuple[int | None, int]:
        return (self.config.held_out_seed if self.config.select else None), self.config.selection_samples

    def selection_score(self) -> str:
        return self.config.selection_score

    def use_candidate(self, settings: dict[str, Any]) -> None:
        """A switched-off part has its fitted table zeroed (k = 0: no CNC; μ = 0: no BC), so the saved tables are
        the chosen correction and load without knowing there was a choice."""
        if not settings:
            return
        if self._fitted is None:
            self._fitted = (self.k.clone(), self.mu.clone())
        k, mu = self._fitted
        self.k = k.clone() if settings["cnc"] else torch.zeros_like(k)
        self.mu = mu.clone() if settings["bc"] else torch.zeros_like(mu)

    def fit_tables(self, pair: TrajectoryPair) -> None:
        self._fitted = None
        rows = [_fit_step(pair.eps_fp[i].double(), pair.error(i), self.config) for i in range(pair.num_steps)]
        self.k = torch.tensor([row[0] for row in rows], dtype=torch.float64)
        self.mu = torch.stack([row[1] for row in rows])  # (S, C)
        self.sigma_q = torch.tensor([row[2] for row in rows], dtype=torch.float64)
        self.timesteps = torch.tensor([float(step.t) for step in pair.steps], dtype=torch.float64)
        self.alpha_prod = torch.tensor([step.alpha_prod_t for step in pair.steps], dtype=torch.float64)
        self.std_dev = torch.tensor([step.std_dev_t for step in pair.steps], dtype=torch.float64)
        self.coef_eps = torch.tensor([step.coef_eps for step in pair.steps], dtype=torch.float64)

    @property
    def k_applied(self) -> Tensor:
        """k⁺_t (S,) as applied by CNC."""
        return _applied_k(self.k, self.config)

    @property
    def sigma_tilde(self) -> Tensor:
        """σ̃_q,t = σ_q,t / (1 + k⁺_t) (S,), the residual std after CNC (docs/methods/ptqd.md)."""
        return self.sigma_q / (1.0 + self.k_applied)

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        """ε̃ = (ε̂ − μ_t) / (1 + k⁺_t); eps is (B, C, H, W)."""
        index = self.table_index(step)
        if self.config.bias:
            mu = self.mu[index].to(dtype=eps.dtype, device=eps.device)  # (C,)
            if mu.shape[0] != eps.shape[1]:
                raise ValueError(f"PTQD was fitted on {mu.shape[0]} channels, ε has {eps.shape[1]}")
            eps = eps - mu.view(1, -1, *([1] * (eps.ndim - 2)))
        if self.config.correlated:
            eps = eps / (1.0 + float(self.k_applied[index]))
        return eps

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor | NoiseStd:
        """σ' = √max(0, σ² − c_t² σ̃²_q,t): the residual variance absorbed into the sampler noise (VSC).

        With ``vsc_form="noise_only"`` only the noise term gets σ' (a ``NoiseStd``); the DDIM direction term keeps σ.
        """
        index = self.table_index(step)
        if not self.config.variance:
            return std
        absorbed = (step.coef_eps * float(self.sigma_tilde[index])) ** 2  # c_t² σ̃², with the original σ_t's c_t
        if absorbed == 0.0 or not bool((std > 0).any()):
            return std
        calibrated = torch.sqrt(torch.clamp(std * std - absorbed, min=0.0))
        if self.config.vsc_form == "noise_only":
            return NoiseStd(noise=calibrated, direction=std)
        return calibrated

    def vsc_active(self, step: StepContext) -> bool:
        """Whether VSC changes σ at this step: it needs VSC on, σ_t > 0 (η > 0 or DDPM) and σ̃_q > 0."""
        index = self.table_index(step)
        return self.config.variance and step.std_dev_t > 0 and float(self.sigma_tilde[index]) > 0


def vsc_report(correction: PTQDCorrection) -> str:
    """One sentence for the report on what VSC did on the fitted sampler (docs/methods/ptqd.md)."""
    if not correction.fitted:
        raise ValueError("vsc_report needs a fitted PTQDCorrection")
    key = correction.table_key
    if not correction.config.variance:
        return f"VSC off (variance=False) on {key.sampler_key}."
    stochastic = correction.std_dev > 0
    if not bool(stochastic.any()):
        return (f"VSC inactive on {key.sampler_key}: σ_t = 0 at every step (a deterministic sampler: DDIM with η = 0, "
                "euler, dpmsolver++ or flow-euler), so there is no sampler noise to absorb the residual variance "
                "into; only CNC and BC act.")
    variance = correction.std_dev.square()  # σ_t²
    absorbed = (correction.coef_eps * correction.sigma_tilde).square()  # c_t² σ̃²
    clamped = stochastic & (absorbed >= variance)
    ratio = (variance - absorbed).clamp(min=0).sqrt()[stochastic] / correction.std_dev[stochastic]  # σ'/σ_t
    return (f"VSC active on {int(stochastic.sum())} of {len(stochastic)} steps of {key.sampler_key}; σ' clamped to 0 "
            f"on {int(clamped.sum())} (c_t σ̃_q ≥ σ_t); σ'/σ_t from {float(ratio.min()):.4f} to "
            f"{float(ratio.max()):.4f}.")


def timestep_value(t: float) -> int | float:
    """A ``timesteps`` entry as the sampler fed it: an int on integer grids, the float otherwise."""
    return int(t) if float(t).is_integer() else float(t)


def ptqd_tables(correction: PTQDCorrection) -> dict[str, Any]:
    """The fitted per-step statistics as JSON-ready lists, step 0 (noisiest) first, for reports and plots."""
    if not correction.fitted:
        raise ValueError("ptqd_tables needs a fitted PTQDCorrection")
    key = correction.table_key
    return {
        "sampler": key.sampler_key, "bits": key.bits, "guidance_scale": key.guidance_scale,
        "config": {name: getattr(correction.config, name) for name in correction.config.__dataclass_fields__},
        "t": [timestep_value(t) for t in correction.timesteps.tolist()], "k": correction.k.tolist(),
        "k_applied": correction.k_applied.tolist(),
        "mu": correction.mu.tolist(), "sigma_q": correction.sigma_q.tolist(),
        "sigma_tilde": correction.sigma_tilde.tolist(), "std_dev": correction.std_dev.tolist(),
        "vsc": vsc_report(correction),
    }
