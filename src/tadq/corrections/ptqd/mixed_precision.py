"""PTQD's step-aware mixed precision: low bits for the noisy early steps, high bits after (docs/methods/ptqd.md).

The paper gives the idea but no code (issue #20), so the rule is [RECON] (docs/methods/ptqd.md). Notation:

    SNR_F(t)     = ᾱ_t / (1 − ᾱ_t)                              signal-to-noise ratio of the FP state
    SNR_Q,b(t)   = ᾱ_t / (1 − ᾱ_t + c_t² σ̃²_q,b,t)              with the residual std σ̃_q,b,t of PTQD at bit-width b
    ratio_b(t)   = SNR_Q,b / SNR_F = (1 − ᾱ_t) / (1 − ᾱ_t + c_t² σ̃²_q,b,t)  ∈ (0, 1]
    rule         a step uses the cheapest b with ratio_b(t) ≥ γ; one switch index s: low for index < s, high after
                 "first_failure":  s = the first step where the low bit-width fails (every low step passes)
                 "final_failures": s = the start of the final run of failing steps (early failures stay low)

c_t is ``StepContext.coef_eps`` (DDIM's ε coefficient, or B_t^DDPM), stored in the PTQD tables. Since ratio ≤ 1,
γ → 0 gives all-low and γ > 1 all-high (unless σ̃ = 0). Bit-operations count MACs × b_w × b_a of every Conv2d and
Linear (``bitops.py``).

The ratio need not fall monotonically: a coarse DDIM grid's first jump has a large |c_t| (its x̂_0 term
√(ᾱ_prev(1−ᾱ_t)/ᾱ_t) is large), so with a flat σ̃ the first steps can fail while the middle ones pass. The two
switch rules differ exactly there; ``TradeoffPoint.low_steps_per_step_rule`` shows how many steps pass per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tadq.config import register_config_type
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.corrections.ptqd.correction import PTQDCorrection, timestep_value
from tadq.denoiser import QuantizedDenoiser
from tadq.safefiles import finite_float
from tadq.sampling import Conditioning, IdentityHooks, SamplerConfig, SamplingPlan, StepContext

SwitchRule = Literal["first_failure", "final_failures"]
SWITCH_RULES: tuple[str, ...] = ("first_failure", "final_failures")

__all__ = [
    "SWITCH_RULES", "MixedPrecisionConfig", "MixedPrecisionDenoiser", "SwitchRule", "TradeoffPoint", "bit_operations",
    "build_mixed_precision", "ptqd_of", "snr_ratio", "switch_index", "tradeoff_curve",
]


@register_config_type
@dataclass(frozen=True)
class MixedPrecisionConfig:
    """The SNR rule's threshold (docs/methods/ptqd.md#mixed-precision, [RECON]).

    Args:
        gamma: γ, the fraction of the FP SNR a quantized step must keep. The default is 0.9; since the
            ratio is 1/(1 + c_t² σ̃²/(1 − ᾱ_t)), only γ close to 1 moves the switch for small σ̃ (sweep it with
            ``tradeoff_curve``).
        switch_rule: How one switch index is read off the per-step pass/fail pattern (module docstring):
            ``"first_failure"`` (every low step passes the rule) or ``"final_failures"`` (high bits only for the
            final run of failing steps, the paper's "low early, high late" even where early steps fail).
    """

    gamma: float = 0.9
    switch_rule: SwitchRule = "first_failure"

    def __post_init__(self) -> None:
        if not finite_float(self.gamma):
            raise ValueError(f"MixedPrecisionConfig.gamma must be a finite float > 0, got {self.gamma!r}")
        if self.gamma <= 0:
            raise ValueError(f"MixedPrecisionConfig.gamma must be > 0 (≈ 0.9-1), got {self.gamma}")
        if self.switch_rule not in SWITCH_RULES:
            raise ValueError(f"MixedPrecisionConfig.switch_rule={self.switch_rule!r}; accepted values: {SWITCH_RULES}")


def ptqd_of(qmodel: QuantizedDenoiser, sampler: SamplerConfig | None = None) -> PTQDCorrection:
    """The last fitted ``PTQDCorrection`` in ``qmodel``'s stack (optionally checked against ``sampler``)."""
    found = [c for c in qmodel.corrections if isinstance(c, PTQDCorrection)]
    if not found or not found[-1].fitted:
        raise ValueError(f"the {qmodel.config.label} model has no fitted PTQD correction; run fit_ptqd first")
    if sampler is not None and found[-1].table_key.sampler_key != sampler.key:
        raise ValueError(f"the {qmodel.config.label} PTQD tables were fitted for {found[-1].table_key.sampler_key}, "
                         f"not {sampler.key}")
    return found[-1]


def snr_ratio(alpha_prod: Tensor, coef_eps: Tensor, sigma_tilde: Tensor) -> Tensor:
    """SNR_Q,b / SNR_F = (1 − ᾱ_t) / (1 − ᾱ_t + c_t² σ̃²) per step, (S,) float64."""
    noise = 1.0 - alpha_prod.double()
    return noise / (noise + coef_eps.double().square() * sigma_tilde.double().square())


def switch_index(low: PTQDCorrection, gamma: float, rule: SwitchRule = "first_failure") -> int:
    """The first high-bit step under ``rule`` (module docstring); S when the low bit-width never fails (all low)."""
    passes = snr_ratio(low.alpha_prod, low.coef_eps, low.sigma_tilde) >= gamma  # (S,)
    if rule == "first_failure":
        failing = torch.nonzero(~passes)
        return int(failing[0]) if len(failing) else int(passes.numel())
    if rule == "final_failures":
        passing = torch.nonzero(passes)
        return int(passing[-1]) + 1 if len(passing) else 0
    raise ValueError(f"switch_rule={rule!r}; accepted values: {SWITCH_RULES}")


def _time_key(t: float) -> float:
    """A timestep as the walker feeds it to the network (float32; exact for the integer grids): fractional grids
    (euler's linspace or Karras σ's, flow-euler) reach the network rounded to float32, and were truncated to ints
    that matched no step of the grid."""
    return float(torch.tensor(float(t), dtype=torch.float32))


class MixedPrecisionDenoiser(nn.Module, IdentityHooks):
    """``denoiser(x, t)`` running ``low`` for step indices < ``switch`` and ``high`` after, with their corrections.

    The sampling loop passes only t to the network, so t is mapped back to the step index through the configured
    sampler's grid (an off-grid t raises). It is also the hook that routes each step to the stack of the network
    that ran it; ``tadq.sample`` picks it up through ``correction_hooks``.

    Args:
        low: The low bit-width model with its fitted PTQD stack (e.g. W4A4).
        high: The high bit-width model with its own fitted stack (e.g. W4A8).
        scheduler: The model's training scheduler.
        sampler: The deployment sampler (both stacks must be fitted for it).
        switch: First step index that uses ``high``; 0 = all high, S = all low.
    """

    def __init__(self, low: QuantizedDenoiser, high: QuantizedDenoiser, scheduler, sampler: SamplerConfig,
                 switch: int) -> None:
        super().__init__()
        if low.sample_shape != high.sample_shape:
            raise ValueError(f"low and high models differ in sample shape: {low.sample_shape} vs {high.sample_shape}")
        self.low, self.high, self.sampler = low, high, sampler
        self.steps = SamplingPlan.build(scheduler, sampler).steps
        if isinstance(switch, bool) or not isinstance(switch, int) or not 0 <= switch <= len(self.steps):
            raise ValueError(f"switch must be an int in [0, {len(self.steps)}], got {switch!r}")
        self.switch = switch
        self._index_of_t = {_time_key(step.t): step.index for step in self.steps}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.low.sample_shape

    def schedule(self) -> list[str]:
        """The bit label of each step, noisiest first."""
        return [self._member(i).config.label for i in range(len(self.steps))]

    def _member(self, index: int) -> QuantizedDenoiser:
        return self.low if index < self.switch else self.high

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """ε̂ (B, C, H, W) of the network chosen for each sample's step (t (B,) must lie on the sampler grid)."""
        times = [_time_key(v) for v in t.tolist()]
        off_grid = sorted(set(times) - set(self._index_of_t))
        if off_grid:
            raise ValueError(f"t={[f'{v:g}' for v in off_grid[:3]]} is not on the grid of {self.sampler.key}; the "
                             "mixed-precision switch is defined per step of that sampler only")
        low_mask = torch.tensor([self._index_of_t[v] < self.switch for v in times], device=x.device)
        if bool(low_mask.all()):
            return self.low(x, t, cond)
        if not bool(low_mask.any()):
            return self.high(x, t, cond)
        eps = torch.empty_like(x)
        rows = torch.arange(x.shape[0], device=x.device)
        eps[low_mask] = self.low(x[low_mask], t[low_mask], None if cond is None else cond.rows(rows[low_mask]))
        eps[~low_mask] = self.high(x[~low_mask], t[~low_mask], None if cond is None else cond.rows(rows[~low_mask]))
        return eps

    def set_step(self, step: StepContext | None) -> None:
        """Forward the walker's step to both members (step-aware corrections such as TFMQ)."""
        self.low.set_step(step)
        self.high.set_step(step)

    def correction_hooks(self) -> tuple[IdentityHooks, ...]:
        """Itself, routing every hook to the corrections of the network that runs the step."""
        self.low.corrections.check_model(self.low.config.label)
        self.high.corrections.check_model(self.high.config.label)
        return (self,)

    def _check_sampler(self, step: StepContext) -> None:
        if step.sampler_key != self.sampler.key:
            raise ValueError(f"MixedPrecisionDenoiser is configured for {self.sampler.key}, sampled with "
                             f"{step.sampler_key}; build it for the sampler you use")

    def check_plan(self, steps: Sequence[StepContext]) -> None:
        """Both members' tables checked against the whole plan before the sampling loop starts (as a correction
        stack passed as hooks is): a schedule that differs at a late step only was refused there, mid-run."""
        for step in steps[:1]:
            self._check_sampler(step)
        self.low.corrections.check_plan(steps)
        self.high.corrections.check_plan(steps)

    def _stack(self, step: StepContext):
        self._check_sampler(step)
        return self._member(step.index).corrections

    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        return self._stack(step).before_model(x, step)

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        return self._stack(step).after_model(eps, x, step)

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor:
        return self._stack(step).noise_std(std, step)

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor:
        return self._stack(step).after_step(x_prev, step)

    def bit_operations(self) -> int:
        """Bit-operations of one sample over all steps of this schedule."""
        per_forward = {"low": bit_operations(self.low), "high": bit_operations(self.high)}
        return self.switch * per_forward["low"] + (len(self.steps) - self.switch) * per_forward["high"]


def build_mixed_precision(low: QuantizedDenoiser, high: QuantizedDenoiser, scheduler, sampler: SamplerConfig,
                          config: MixedPrecisionConfig) -> MixedPrecisionDenoiser:
    """The mixed-precision denoiser with the switch chosen by the SNR rule at ``config.gamma``."""
    ptqd_of(high, sampler)  # the high model needs its own fitted statistics too (docs/methods/ptqd.md#mixed-precision)
    switch = switch_index(ptqd_of(low, sampler), config.gamma, config.switch_rule)
    return MixedPrecisionDenoiser(low, high, scheduler, sampler, switch)


@dataclass(frozen=True)
class TradeoffPoint:
    """One point of the bit-operations curve.

    Args:
        gamma: γ of the SNR rule.
        switch: First step index on high bits (S: all low).
        switch_t: Timestep of that step as the sampler fed it (a float on fractional grids; ``None`` when all
            steps are low).
        low_steps_per_step_rule: Steps where low bits pass the per-step rule (equals ``switch`` when the pass/fail
            pattern is a single switch, as docs/methods/ptqd.md#mixed-precision expects).
        bit_operations: Bit-operations per sample over all steps.
    """

    gamma: float
    switch: int
    switch_t: int | float | None
    low_steps_per_step_rule: int
    bit_operations: int


def tradeoff_curve(low: QuantizedDenoiser, high: QuantizedDenoiser, scheduler, sampler: SamplerConfig,
                   gammas: Sequence[float], switch_rule: SwitchRule = "first_failure") -> list[TradeoffPoint]:
    """(bit-operations, switch) for each γ, to pair with FD-digits sampled from each schedule.

    Build each point's denoiser with ``MixedPrecisionDenoiser(low, high, scheduler, sampler, point.switch)``.
    """
    low_ptqd = ptqd_of(low, sampler)
    ptqd_of(high, sampler)
    per_forward = {"low": bit_operations(low), "high": bit_operations(high)}
    ratio = snr_ratio(low_ptqd.alpha_prod, low_ptqd.coef_eps, low_ptqd.sigma_tilde)
    steps = len(ratio)
    points = []
    for gamma in gammas:
        MixedPrecisionConfig(gamma=gamma, switch_rule=switch_rule)  # validates both
        switch = switch_index(low_ptqd, gamma, switch_rule)
        points.append(TradeoffPoint(
            gamma=float(gamma), switch=switch,
            switch_t=timestep_value(float(low_ptqd.timesteps[switch])) if switch < steps else None,
            low_steps_per_step_rule=int((ratio >= gamma).sum()),
            bit_operations=switch * per_forward["low"] + (steps - switch) * per_forward["high"],
        ))
    return points
