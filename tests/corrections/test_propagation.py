"""TCEC's closed-form error propagation against simulated trajectories of the analytic denoiser."""

from __future__ import annotations

import pytest
import torch
from tests.corrections.analytic import AnalyticDenoiser, InjectedError, analytic_scheduler, fit_context

from tadq.corrections import collect_trajectory_pair
from tadq.corrections.tcec.propagation import chain_factors, final_contributions, predict_j0, predict_recursive
from tadq.sampling import SamplerConfig

FP32_EPS = 2.0**-24


def _pair(sampler: SamplerConfig):
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    pair = collect_trajectory_pair(fit_context(fp, InjectedError(fp), scheduler, sampler), num_samples=16, seed=3,
                                   mode="quantized")
    return fp, pair


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_recursion_with_the_exact_jacobian_matches_the_simulated_error(eta):
    sampler = SamplerConfig(kind="ddim", num_steps=10, eta=eta)
    fp, pair = _pair(sampler)
    steps = list(pair.steps)
    errors = pair.eps_q.double() - pair.eps_fp.double()
    measured = pair.states.double() - pair.fp_states.double()
    slopes = [float(fp.coefficient[step.t]) for step in steps]  # J_n = a_t I for ε = a_t x
    predicted = predict_recursive(errors, steps, lambda n, delta: slopes[n] * delta)
    # Tolerance: each float32 update rounds x̂ and x by ≤ 2 ulp of the largest state; every later step multiplies
    # earlier rounding by |A + B a| ≤ growth, so S steps accumulate at most S · 4ε · max|x| · growth^S.
    growth = max(1.0, *(abs(s.coef_x + s.coef_eps * a) for s, a in zip(steps, slopes, strict=True)))
    bound = len(steps) * 4 * FP32_EPS * float(pair.states.abs().max()) * growth ** len(steps)
    assert float((predicted - measured).abs().max()) <= bound
    assert float(measured[-1].abs().max()) > 100 * bound  # the test is not vacuous


def test_j0_closed_form_equals_the_j0_recursion_and_misses_the_feedback():
    sampler = SamplerConfig(kind="ddim", num_steps=8, eta=0.0)
    _, pair = _pair(sampler)
    steps = list(pair.steps)
    errors = pair.eps_q.double() - pair.eps_fp.double()
    closed = predict_j0(errors, steps)
    assert torch.allclose(closed, predict_recursive(errors, steps), rtol=1e-12, atol=1e-14)
    measured = pair.states.double() - pair.fp_states.double()
    assert not torch.allclose(closed[-1], measured[-1], rtol=1e-3)  # J = a_t ≠ 0 in the analytic model


def test_chain_factors_and_final_shares():
    sampler = SamplerConfig(kind="ddim", num_steps=5, eta=0.0)
    _, pair = _pair(sampler)
    steps = list(pair.steps)
    factors = chain_factors(steps)
    assert factors[2, 3] == 1.0 and factors[2, 2] == 0.0
    assert factors[0, 5] == pytest.approx(steps[1].coef_x * steps[2].coef_x * steps[3].coef_x * steps[4].coef_x)
    errors = pair.eps_q.double() - pair.eps_fp.double()
    shares = final_contributions(errors, steps)
    last = (steps[-1].coef_eps * errors[-1]).square().mean()
    assert shares.shape == (5,) and float(shares[-1]) == pytest.approx(float(last))


class ShrunkNoise:
    """ε = 0.9 x: not the optimal denoiser, so x̂_0 = x (1 − 0.9√(1−ᾱ))/√ᾱ leaves [-1, 1] at the noisy steps."""

    coefficient = 0.9

    def __call__(self, x, t, cond=None):
        return self.coefficient * x


def test_clip_aware_coefficients_follow_the_clipped_sampler():
    from diffusers import DDPMScheduler

    from tadq.corrections.tcec.propagation import clip_aware_coefficients

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    fp = ShrunkNoise()
    sampler = SamplerConfig(kind="ddim", num_steps=10, eta=0.0)
    quantized = InjectedError(fp, noise_std=1e-3, bias=(0.001, -0.001), k_scale=0.0)  # small: linear regime
    pair = collect_trajectory_pair(fit_context(fp, quantized, scheduler, sampler), num_samples=16, seed=3,
                                   mode="quantized")
    steps = list(pair.steps)
    errors = pair.eps_q.double() - pair.eps_fp.double()
    measured = pair.states.double() - pair.fp_states.double()

    def jvp(n, delta):
        return fp.coefficient * delta

    pairs = clip_aware_coefficients(steps, pair.fp_states, pair.eps_fp_trajectory)
    assert bool((pairs[0][0] == 0.0).any())  # the first step clips x_0 somewhere: A = 0 there
    aware = predict_recursive(errors, steps, jvp, coefficients=pairs)
    plain = predict_recursive(errors, steps, jvp)
    gap_aware = float((aware[-1] - measured[-1]).norm() / measured[-1].norm())
    gap_plain = float((plain[-1] - measured[-1]).norm() / measured[-1].norm())
    assert gap_aware < 0.2 and gap_plain > 1.0  # the rest: pixels crossing the clip boundary (non-linear)
