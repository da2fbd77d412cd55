"""The sampler-level corrections on euler, dpmsolver++ and flow-euler: fitted, keyed by the new sampler keys, and
exact where their maths says so (TCEC with J = 0 checks each kind's (A, B) coefficients). TAC and TCEC on
dpmsolver++ 2M: tests/corrections/test_tac_multistep.py and tests/corrections/test_tcec_samplers.py."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tests.corrections.analytic import (
    SAMPLE_SHAPE,
    SHIFT,
    AnalyticDenoiser,
    InjectedError,
    Scaled,
    Shifted,
    analytic_scheduler,
    fit_context,
)

from tadq.corrections import CorrectionStack, PTQDConfig, TACConfig, TCECConfig, fit_stack
from tadq.corrections.pair import collect_trajectory_pair
from tadq.corrections.ptqd.correction import PTQDCorrection, vsc_report
from tadq.corrections.sequential import paired_final_error
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan, sample

EULER = SamplerConfig("euler", num_steps=10)


class TimeOnly:
    """A prediction that depends on t only (J = 0): TCEC's compensation is then exact for a one-step linear update
    x' = A x + B·prediction, so a wrong (A, B) of a sampler kind leaves a visible final error."""

    def __init__(self) -> None:
        self.pattern = torch.randn((1, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(1))

    def __call__(self, x, t, cond=None):
        return torch.cos(t.double() / 300).float().view(-1, 1, 1, 1) * self.pattern.expand(x.shape[0], -1, -1, -1)


def _scheduler(sampler: SamplerConfig):
    return FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler.is_flow else analytic_scheduler()


@pytest.mark.parametrize("configs", [[TACConfig()], [TCECConfig()], [TACConfig(), TCECConfig(seed=1)]],
                         ids=["tac", "tcec", "tac+tcec"])
def test_tac_and_tcec_fit_and_lower_the_final_error_on_euler(configs) -> None:
    configs = [type(c)(**{**c.__dict__, "num_samples": 32}) for c in configs]
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([correction_for(config) for config in configs])
    fit_stack(stack, fit_context(fp, InjectedError(fp), scheduler, EULER))
    assert all(member.table_key.sampler_key == "euler-10" for member in stack)
    options = {"num_samples": 32, "seed": 777}
    ctx = fit_context(fp, InjectedError(fp, seed=5), scheduler, EULER)
    plain = paired_final_error(ctx, (), **options)
    corrected = paired_final_error(ctx, tuple(stack), **options)
    assert corrected < 0.9 * plain
    # the tables belong to euler-10: a DDIM run on the same model refuses them at the first hook
    ddim = SamplingPlan.build(scheduler, SamplerConfig("ddim", num_steps=10))
    with pytest.raises(ValueError, match="euler-10"):
        sample(InjectedError(fp), ddim, num_samples=2, seed=0, sample_shape=SAMPLE_SHAPE, hooks=tuple(stack),
               progress=False)
    images = sample(InjectedError(fp), SamplingPlan.build(scheduler, EULER), num_samples=2, seed=0,
                    sample_shape=SAMPLE_SHAPE, hooks=tuple(stack), progress=False).images
    assert bool(torch.isfinite(images).all())


@pytest.mark.parametrize("sampler", [EULER, SamplerConfig("euler-ancestral", 10),
                                     SamplerConfig("dpmsolver++", 10, order=1),
                                     SamplerConfig("flow-euler", 10, shift=3.0)], ids=lambda s: s.key)
@pytest.mark.parametrize("mix", [1.0, 0.0])
def test_tcec_cancels_the_cumulative_error_exactly_when_the_jacobian_is_zero(sampler: SamplerConfig, mix: float):
    """Immediate (a = 1) and delayed (a = 0, which uses A_t/B_t of consecutive steps) compensation both rest on the
    kind's (A, B); with J = 0 they cancel the error up to float32 rounding of the states."""
    scheduler = _scheduler(sampler)
    fp = TimeOnly()
    stack = CorrectionStack([correction_for(TCECConfig(select=False, mix=mix, num_samples=8))])
    ctx = fit_context(fp, Scaled(fp), scheduler, sampler)
    fit_stack(stack, ctx)
    assert stack[0].table_key.sampler_key == sampler.key
    plain = paired_final_error(ctx, (), num_samples=4, seed=9)
    corrected = paired_final_error(ctx, tuple(stack), num_samples=4, seed=9)
    assert plain > 1e-4 and corrected < 1e-9 * plain


@pytest.mark.parametrize("sampler", [EULER, SamplerConfig("flow-euler", 10, shift=3.0)], ids=lambda s: s.key)
def test_ibc_recovers_the_input_bias_through_the_kinds_eps_coefficient(sampler: SamplerConfig) -> None:
    """x̂_n − x_n is the last step's own B_{n-1} c once IBC removed the earlier bias: B is the kind's coef_eps."""
    scheduler = _scheduler(sampler)
    fp = TimeOnly()
    stack = CorrectionStack([correction_for(TACConfig(ibc=True, ner=False, ibc_resolution="channel",
                                                      num_samples=16))])
    fit_stack(stack, fit_context(fp, Shifted(fp), scheduler, sampler))
    steps = SamplingPlan.build(scheduler, sampler).steps
    bias = stack[0].input_bias  # (S, C)
    expected = torch.stack([steps[n - 1].coef_eps * SHIFT.double() for n in range(1, len(steps))])
    assert torch.allclose(bias[1:], expected, atol=1e-5)


def test_ptqd_fits_on_dpmsolver_2m_with_the_previous_step_carried_and_says_vsc_is_inactive() -> None:
    """PTQD corrects ε itself (CNC, BC), which the 2M update uses in both of its roles, so it holds there; the
    trajectory pair carries each track's previous x̂_0."""
    sampler = SamplerConfig("dpmsolver++", 10)
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    pair = collect_trajectory_pair(fit_context(fp, InjectedError(fp), scheduler, sampler), num_samples=64, seed=1,
                                   mode="quantized")
    correction = PTQDCorrection(PTQDConfig())
    correction.fit(pair)
    assert correction.table_key.sampler_key == "dpmsolver++2-10"
    assert "VSC inactive" in vsc_report(correction) and "dpmsolver++" in vsc_report(correction)
    plan = SamplingPlan.build(scheduler, sampler)
    fp_images = sample(fp, plan, num_samples=32, seed=5, sample_shape=SAMPLE_SHAPE, progress=False).images
    options = {"num_samples": 32, "seed": 5, "sample_shape": SAMPLE_SHAPE, "progress": False}
    plain = sample(InjectedError(fp, seed=9), plan, **options).images
    corrected = sample(InjectedError(fp, seed=9), plan, hooks=[correction], **options).images
    assert float((corrected - fp_images).square().mean()) < float((plain - fp_images).square().mean())


class LinearVelocity:
    """v = a(t) x with a(t) = -0.9 cos(t/1000): a linear flow model, so J_n = a(t_n) I exactly."""

    def slope(self, t: float) -> float:
        return -0.9 * float(torch.cos(torch.tensor(t, dtype=torch.float64) / 1000))

    def __call__(self, x, t, cond=None):
        return (-0.9 * torch.cos(t.double() / 1000)).float().view(-1, 1, 1, 1) * x


@pytest.mark.parametrize("sampler", [EULER, SamplerConfig("dpmsolver++", 10, order=1),
                                     SamplerConfig("flow-euler", 10, shift=3.0)], ids=lambda s: s.key)
def test_tcec_propagation_with_the_exact_jacobian_matches_the_simulated_error(sampler: SamplerConfig) -> None:
    """δ_{n+1} = (A_n + B_n J_n) δ_n + B_n e_n with each kind's (A, B), against the quantized-vs-FP trajectories."""
    from tadq.corrections.tcec.propagation import predict_recursive

    scheduler = _scheduler(sampler)
    if sampler.is_flow:
        fp = LinearVelocity()
        slope = fp.slope
    else:
        fp = AnalyticDenoiser(scheduler)
        slope = lambda t: float(fp.coefficient[t])  # noqa: E731  ε = a_t x
    pair = collect_trajectory_pair(fit_context(fp, InjectedError(fp), scheduler, sampler), num_samples=16, seed=3,
                                   mode="quantized")
    steps = list(pair.steps)
    slopes = [slope(step.t) for step in steps]
    errors = pair.eps_q.double() - pair.eps_fp.double()
    measured = pair.states.double() - pair.fp_states.double()
    predicted = predict_recursive(errors, steps, lambda n, delta: slopes[n] * delta)
    # Each float32 update of x̂ and of x rounds at most 8 operations, each by u × its result; measured in the next
    # state's units every intermediate is at most max(1, |A|) (|x| + |ε|) (euler's σ-space s/c' = A x and
    # σε/c' ≤ A ε), and later steps multiply that rounding by |A + B a| ≤ growth.
    growth = max(1.0, *(abs(s.coef_x + s.coef_eps * a) for s, a in zip(steps, slopes, strict=True)))
    widest = max(1.0, *(abs(s.coef_x) for s in steps))
    magnitude = float(pair.states.abs().max()) + float(pair.eps_q.abs().max())
    bound = len(steps) * 2 * 8 * 2.0**-24 * widest * magnitude * growth ** len(steps)
    assert float((predicted - measured).abs().max()) <= bound
    assert float(measured[-1].abs().max()) > 100 * bound  # not vacuous


def test_paired_final_error_walks_dpmsolver_2m_with_each_tracks_previous_prediction() -> None:
    """The sequential walk (used to score stacks) carries x̂_0 per track (without it a 2M step raises): with no
    error both tracks coincide, with an injected one they do not."""
    sampler = SamplerConfig("dpmsolver++", 10)
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    assert paired_final_error(fit_context(fp, fp, scheduler, sampler), (), num_samples=4, seed=3) == 0.0
    assert paired_final_error(fit_context(fp, InjectedError(fp), scheduler, sampler), (), num_samples=4, seed=3) > 0


def test_ptqd_variance_calibration_acts_on_euler_ancestral_noise() -> None:
    """Euler ancestral injects σ_up z, so VSC has sampler noise to absorb the residual quantization variance into:
    σ' = √(σ² − B² σ̃²) < σ at the noisy steps, and the corrected run differs from CNC/BC alone."""
    sampler = SamplerConfig("euler-ancestral", 10)
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    pair = collect_trajectory_pair(fit_context(fp, InjectedError(fp, noise_std=0.2), scheduler, sampler),
                                   num_samples=64, seed=1)
    with_vsc, without_vsc = PTQDCorrection(PTQDConfig()), PTQDCorrection(PTQDConfig(variance=False))
    with_vsc.fit(pair)
    without_vsc.fit(pair)
    assert "VSC active" in vsc_report(with_vsc)
    plan = SamplingPlan.build(scheduler, sampler)
    first = plan.steps[0]
    lowered = with_vsc.noise_std(torch.tensor(first.std_dev_t), first)
    lowered = getattr(lowered, "noise", lowered)  # NoiseStd (noise-only form): euler ancestral has no direction term
    assert 0 < float(lowered) < first.std_dev_t and with_vsc.vsc_active(first)
    options = {"num_samples": 4, "seed": 5, "sample_shape": SAMPLE_SHAPE, "progress": False}
    a = sample(InjectedError(fp, seed=9), plan, hooks=[with_vsc], **options).images
    b = sample(InjectedError(fp, seed=9), plan, hooks=[without_vsc], **options).images
    assert not torch.equal(a, b)
