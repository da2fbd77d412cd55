"""TCEC's propagation and compensation on every sampler kind, against the real sampler (docs/methods/tcec.md).

Each propagation test injects a known per-step error e_n into the prediction, runs tadq's own steps (trajectory
pairs from the walker, quantized vs FP from the same noise) and compares the measured final state error with the
prediction of ``tadq.corrections.tcec.propagation``. The samplers keep their states in float32 (the ODE kinds upcast
to float32 inside the step whatever the state's dtype), so the tolerance is a float32 rounding bound derived per
kind in ``_rounding`` and carried to the final state by the same chain the prediction uses.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tests.corrections.analytic import (
    SAMPLE_SHAPE,
    AnalyticDenoiser,
    InjectedError,
    Scaled,
    analytic_scheduler,
    fit_context,
)

from tadq.corrections import CorrectionStack, TCECConfig, collect_trajectory_pair, fit_stack
from tadq.corrections.sequential import paired_final_error
from tadq.corrections.tcec.propagation import (
    chain_factors,
    error_weights,
    final_contributions,
    predict_j0,
    predict_recursive,
)
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan, StepContext

torch.set_num_threads(1)

UNIT = 2.0**-24  # float32 unit roundoff
OPERATIONS = 16  # more float32 roundings than any step of steps.py takes (dpmsolver++ 2M: 12), each ≤ UNIT × result

SAMPLERS = [SamplerConfig("euler", 10), SamplerConfig("euler-ancestral", 10), SamplerConfig("dpmsolver++", 10),
            SamplerConfig("flow-euler", 10, shift=3.0)]


def _scheduler(sampler: SamplerConfig):
    return FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler.is_flow else analytic_scheduler()


class TimeOnly:
    """A prediction that depends on t only: J = 0 exactly, so the J ≈ 0 closed form is the whole story."""

    def __init__(self) -> None:
        self.pattern = torch.randn((1, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(1))

    def __call__(self, x, t, cond=None):
        return torch.cos(t.double() / 300).float().view(-1, 1, 1, 1) * self.pattern.expand(x.shape[0], -1, -1, -1)


class StateBlindError:
    """FP prediction + e, with e = c(t) × (a fixed pattern + fresh noise per call): known, and independent of x."""

    def __init__(self, fp) -> None:
        self.fp, self.generator = fp, torch.Generator().manual_seed(7)
        self.pattern = torch.randn((1, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(2))

    def __call__(self, x, t, cond=None):
        size = (0.05 + 0.1 * torch.sin(t.double() / 200)).float().view(-1, 1, 1, 1)
        return self.fp(x, t) + size * (self.pattern + 0.5 * torch.randn(x.shape, generator=self.generator))


class LinearVelocity:
    """v = a(t) x with a(t) = −0.9 cos(t/1000) in float32: a linear flow model, J_n = a(t_n) I exactly."""

    def slope(self, t: float) -> float:
        return float((-0.9 * torch.cos(torch.tensor([t], dtype=torch.float64) / 1000)).float())

    def __call__(self, x, t, cond=None):
        return (-0.9 * torch.cos(t.double() / 1000)).float().view(-1, 1, 1, 1) * x


def _vp(sigma: float) -> tuple[float, float]:
    alpha = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha, sigma * alpha


def _term_size(step: StepContext, x: float, eps: float, x_before: float, eps_before: float, z: float) -> float:
    """Σ |terms| of the step as steps.py computes it, in the next state's units: every float32 intermediate of the
    step is at most this large, so the step's rounding is at most OPERATIONS × UNIT × this.

    (x, ε, x_before, ε_before, z: the largest |·| the step sees on either track.) Per kind, with σ → σ' and
    c = √(σ²+1): euler s = c x, x̂_0 = s − σε, d = (s − x̂_0)/σ, s' = s + d (σ' − σ) has intermediates up to c|x| +
    σ|ε| (|σ' − σ| ≤ σ), divided by c' (1 at the last step); ancestral adds σ_up |z|; dpmsolver++ x' = (s_σ'/s_σ) x
    − c_h (1 + w) x̂_0 + c_h w x̂_0,before with x̂_0 = (x − s_σ ε)/α_σ; flow x' = x + (σ' − σ) v.
    """
    sigma, sigma_next = float(step.sigma_t), float(step.sigma_prev)
    if step.kind == "flow-euler":
        return x + abs(sigma_next - sigma) * eps
    if step.kind in ("euler", "euler-ancestral"):
        scale_next = 1.0 if step.is_last else math.sqrt(sigma_next**2 + 1)
        sigma_up = 0.0
        if step.kind == "euler-ancestral":
            sigma_up = math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
        return (2 * (math.sqrt(sigma**2 + 1) * x + sigma * eps) + sigma_up * z) / scale_next
    alpha, s = _vp(sigma)
    alpha_next, s_next = _vp(sigma_next)
    exp_neg_h = 0.0 if s_next == 0.0 else (s_next * alpha) / (alpha_next * s)
    c_h = abs(alpha_next * (exp_neg_h - 1.0))
    size = (s_next / s) * x + c_h * (x + s * eps) / alpha
    if step.order == 2:
        alpha_b, s_b = _vp(float(step.sigma_before))
        w = abs(step.coef_prev_x * alpha_b / (alpha_next * (exp_neg_h - 1.0)))  # C = c_h w / α_before
        size = size + w * c_h * (x + s * eps) / alpha + w * c_h * (x_before + s_b * eps_before) / alpha_b
    return size


def _rounding(pair, ctx, seed: int) -> list[float]:
    """R_n: a bound on |rounding| that step n adds to δ_{n+1} (both tracks round: 2 × OPERATIONS × UNIT × size)."""
    x = torch.maximum(pair.states.abs().flatten(1).amax(1), pair.fp_states.abs().flatten(1).amax(1))  # (S+1,)
    eps = torch.maximum(pair.eps_q.abs().flatten(1).amax(1), pair.eps_fp_trajectory.abs().flatten(1).amax(1))
    z = ctx.walker().batch(seed, range(pair.num_samples), ctx.sample_shape).noise.abs().flatten(1).amax(1)
    bounds = []
    for n, step in enumerate(pair.steps):
        before = max(n - 1, 0)
        size = _term_size(step, float(x[n]), float(eps[n]), float(x[before]), float(eps[before]), float(z[n]))
        bounds.append(2 * OPERATIONS * UNIT * size)
    return bounds


def _carried(steps, rounding: list[float], slopes: list[float]) -> float:
    """Σ_n |Φ_J[n, S]| R_n: each step's rounding carried to the final state by the J-inclusive stacked chain
    Φ_J[r, n+1] = (A_n + B_n a_n) Φ_J[r, n] + (C_n + D_n a_{n-1}) Φ_J[r, n-1] (elements are independent)."""
    count, total = len(steps), 0.0
    for r in range(count):
        before, current = 0.0, 1.0  # Φ_J[r, r], Φ_J[r, r+1]
        for n in range(r + 1, count):
            step = steps[n]
            gain_before = step.coef_prev_x + step.coef_prev_eps * slopes[n - 1]
            before, current = current, (step.coef_x + step.coef_eps * slopes[n]) * current + gain_before * before
        total += abs(current) * rounding[r]
    return total


def _pair(sampler: SamplerConfig, fp, quantized, seed: int = 3):
    ctx = fit_context(fp, quantized, _scheduler(sampler), sampler)
    return collect_trajectory_pair(ctx, num_samples=16, seed=seed, mode="quantized"), ctx


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.key)
def test_j0_closed_form_matches_the_simulated_error_when_the_prediction_ignores_the_state(sampler):
    """J = 0 exactly: δ_S = Σ_s W[s, S] e_s (multistep: W = Φ B_s + Φ D_{s+1}) must equal the simulation up to the
    float32 rounding of the two tracks, each step's carried by |Φ| — a wrong A, B, C or D of any kind exceeds it."""
    fp = TimeOnly()
    pair, ctx = _pair(sampler, fp, StateBlindError(fp))
    steps = list(pair.steps)
    errors = pair.eps_q.double() - pair.eps_fp.double()
    measured = pair.states.double() - pair.fp_states.double()
    predicted = predict_j0(errors, steps)
    bound = _carried(steps, _rounding(pair, ctx, seed=3), [0.0] * len(steps))
    assert float((predicted[-1] - measured[-1]).abs().max()) <= bound
    assert float(measured[-1].abs().max()) > 100 * bound  # not vacuous
    assert torch.allclose(predicted, predict_recursive(errors, steps), rtol=1e-10, atol=1e-12 * float(
        predicted.abs().max()))
    if pair.steps[1].order == 2:  # the one-step chain (C = D = 0) misses the reused ε and state by far
        one_step = [dataclasses.replace(step, order=1, coef_prev_x=0.0, coef_prev_eps=0.0) for step in steps]
        assert float((predict_j0(errors, one_step)[-1] - measured[-1]).abs().max()) > 100 * bound


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.key)
def test_recursion_with_the_exact_jacobian_matches_the_simulated_error(sampler):
    """ε = a_t x (v = a(t) x for flow): J_n = a_n I exactly, in float32 as the denoiser computes it, so the second-
    order recursion (first order on one-step kinds) is exact up to rounding; the rounding now also feeds back
    through J, hence the J-inclusive chain in the bound."""
    scheduler = _scheduler(sampler)
    if sampler.is_flow:
        fp = LinearVelocity()
        slope = fp.slope
    else:
        fp = AnalyticDenoiser(scheduler)
        slope = lambda t: float(fp.coefficient[t].float())  # noqa: E731
    pair, ctx = _pair(sampler, fp, InjectedError(fp))
    steps = list(pair.steps)
    slopes = [slope(step.t) for step in steps]
    errors = pair.eps_q.double() - pair.eps_fp.double()
    measured = pair.states.double() - pair.fp_states.double()
    predicted = predict_recursive(errors, steps, lambda n, delta: slopes[n] * delta)
    bound = _carried(steps, _rounding(pair, ctx, seed=3), slopes)
    assert float((predicted[-1] - measured[-1]).abs().max()) <= bound
    assert float(measured[-1].abs().max()) > 100 * bound
    if steps[1].order == 2:  # dropping the previous step's J δ from the reused ε is visible
        wrong = predict_recursive(errors, steps, lambda n, delta: slopes[n] * delta,
                                  coefficients=[(s.coef_x, s.coef_eps, s.coef_prev_x, 0.0) for s in steps])
        assert float((wrong[-1] - measured[-1]).abs().max()) > 100 * bound


def test_multistep_chain_factors_weights_and_shares_agree():
    steps = SamplingPlan.build(analytic_scheduler(), SamplerConfig("dpmsolver++", 6)).steps
    assert [step.order for step in steps] == [1, 2, 2, 2, 2, 1]
    factors = chain_factors(steps)
    assert factors[1, 2] == 1.0 and factors[1, 1] == 0.0
    # Φ[0, 3] = A_2 Φ[0, 2] + C_2 Φ[0, 1] = A_1 A_2 + C_2
    assert float(factors[0, 3]) == pytest.approx(steps[1].coef_x * steps[2].coef_x + steps[2].coef_prev_x)
    weights = error_weights(steps)
    assert float(weights[0, 2]) == pytest.approx(steps[1].coef_x * steps[0].coef_eps + steps[1].coef_prev_eps)
    errors = torch.randn(6, 3, *SAMPLE_SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shares = final_contributions(errors, steps)
    expected = torch.stack([(weights[s, -1] * errors[s]).square().mean() for s in range(6)])
    assert torch.allclose(shares, expected, rtol=1e-12)
    per_element = [(torch.full_like(errors[0], s.coef_x), torch.full_like(errors[0], s.coef_eps)) for s in steps]
    assert torch.allclose(final_contributions(errors, steps, per_element), expected, rtol=1e-12)
    assert torch.allclose(predict_recursive(errors, steps, coefficients=per_element), predict_j0(errors, steps),
                          rtol=1e-12, atol=1e-12)


MULTISTEP = SamplerConfig("dpmsolver++", 10)


@pytest.mark.parametrize("fit", [{}, {"error_space": "state"}, {"target": "fp_trajectory"}],
                         ids=["default", "state", "fp_trajectory"])
@pytest.mark.parametrize("mix", [1.0, 0.5, 0.0])
def test_tcec_cancels_the_cumulative_error_on_dpmsolver_2m_when_the_jacobian_is_zero(mix, fit):
    """With J = 0 and an exact error model every form cancels the error exactly: the delayed term on a 2M step
    must also cancel the leftover that reaches the next state through the reused ε and state (C, D). Tolerance:
    the final MSE of float32 rounding is many orders below the uncorrected one (plain > 1e-4, residual < 1e-9 ×)."""
    scheduler = analytic_scheduler()
    fp = TimeOnly()
    ctx = fit_context(fp, Scaled(fp), scheduler, MULTISTEP)
    stack = CorrectionStack([correction_for(TCECConfig(select=False, mix=mix, num_samples=8, **fit))])
    fit_stack(stack, ctx)
    assert stack[0].table_key.sampler_key == MULTISTEP.key
    plain = paired_final_error(ctx, (), num_samples=4, seed=9)
    corrected = paired_final_error(ctx, tuple(stack), num_samples=4, seed=9)
    assert plain > 1e-4 and corrected < 1e-9 * plain


def test_tcec_window_on_dpmsolver_2m_leaves_exactly_the_early_errors():
    """start = 0.5, delayed form: the steps before the window keep their errors, the window cancels its own and
    does not touch the earlier ones, so with J = 0 the final error is the J ≈ 0 closed form of the early errors
    alone. A delayed term that counted the uncompensated δ_{first-1} through C (or skipped D) would miss it."""
    scheduler = analytic_scheduler()
    fp = TimeOnly()
    ctx = fit_context(fp, Scaled(fp), scheduler, MULTISTEP)
    stack = CorrectionStack([correction_for(TCECConfig(select=False, mix=0.0, start=0.5, num_samples=8))])
    fit_stack(stack, ctx)
    first = stack[0].first_step
    pair = collect_trajectory_pair(ctx, num_samples=4, seed=9, mode="quantized")  # uncorrected: e_n of every step
    early = pair.eps_q.double() - pair.eps_fp.double()
    early[first:] = 0.0
    expected = predict_j0(early, list(pair.steps))[-1]
    walk = collect_trajectory_pair(ctx, num_samples=4, seed=9, mode="quantized", hooks=tuple(stack))
    measured = walk.states[-1].double() - walk.fp_states[-1].double()
    assert float(expected.abs().max()) > 1e-2
    assert float((measured - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_tcec_next_state_target_is_refused_on_dpmsolver_2m_by_name():
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([correction_for(TCECConfig(select=False, target="next_state", num_samples=8))])
    with pytest.raises(NotImplementedError, match=r"next_state.*dpmsolver\+\+2-10.*previous step's x̂_0"):
        fit_stack(stack, fit_context(fp, InjectedError(fp), scheduler, MULTISTEP))


STOCHASTIC = [SamplerConfig("ddim", 6, eta=1.0), SamplerConfig("ddpm", 6), SamplerConfig("euler-ancestral", 6)]


@pytest.mark.parametrize("fit", [{"error_space": "state"}, {"target": "next_state"}], ids=["state", "next_state"])
@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: s.key)
def test_tcec_state_space_fits_cancel_the_error_on_stochastic_samplers(sampler, fit):
    """The state-space fits compare two updates of one step that share its noise z in deployment; they took the
    step without a z, which a sampler with σ_t > 0 refused at the first row. With J = 0 the fit is exact, so the
    final error cancels down to float32 rounding (as on the deterministic kinds above)."""
    scheduler = _scheduler(sampler)
    fp = TimeOnly()
    ctx = fit_context(fp, Scaled(fp), scheduler, sampler)
    stack = CorrectionStack([correction_for(TCECConfig(select=False, num_samples=8, **fit))])
    fit_stack(stack, ctx)
    plain = paired_final_error(ctx, (), num_samples=4, seed=9)
    corrected = paired_final_error(ctx, tuple(stack), num_samples=4, seed=9)
    assert plain > 1e-4 and corrected < 1e-9 * plain
