"""PTQD's variance calibration (VSC) per sampler kind: it acts only where the sampler injects noise.

On a deterministic sampler (DDIM η = 0, euler, dpmsolver++, flow-euler) σ_t = 0 at every step, so there is no noise
to absorb the residual quantization variance into. PTQD then fits CNC and BC as usual, leaves σ_t at 0 (VSC is a
no-op there, which the main job's DDIM η = 0 rows rely on) and says so in its report; a ``noise_std`` hook that
tried to give an ODE step noise is refused by the step itself. On DDPM, DDIM η > 0 and euler ancestral VSC lowers
σ_t.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tests.corrections.analytic import AnalyticDenoiser, InjectedError, analytic_scheduler, fit_context

from tadq.corrections import PTQDConfig, PTQDCorrection, collect_trajectory_pair
from tadq.corrections.ptqd import ptqd_tables, vsc_report
from tadq.sampling import SamplerConfig, sampler_step

torch.set_num_threads(1)

DETERMINISTIC = [SamplerConfig("ddim", 10, eta=0.0), SamplerConfig("euler", 10), SamplerConfig("dpmsolver++", 10),
                 SamplerConfig("flow-euler", 10, shift=3.0)]
STOCHASTIC = [SamplerConfig("ddpm", 10), SamplerConfig("ddim", 10, eta=1.0), SamplerConfig("euler-ancestral", 10)]


class LinearVelocity:
    """v = −0.9 x: a stand-in flow model."""

    def __call__(self, x, t, cond=None):
        return -0.9 * x


def _fit(sampler: SamplerConfig) -> tuple[PTQDCorrection, object]:
    if sampler.is_flow:
        scheduler, fp = FlowMatchEulerDiscreteScheduler(shift=3.0), LinearVelocity()
        quantized = lambda x, t, cond=None: 1.1 * fp(x, t) + 0.05  # noqa: E731
    else:
        scheduler = analytic_scheduler()
        fp = AnalyticDenoiser(scheduler)
        quantized = InjectedError(fp, noise_std=0.2)
    pair = collect_trajectory_pair(fit_context(fp, quantized, scheduler, sampler), num_samples=16, seed=1)
    correction = PTQDCorrection(PTQDConfig(num_samples=16))
    correction.fit(pair)
    return correction, pair


@pytest.mark.parametrize("sampler", DETERMINISTIC, ids=lambda s: s.key)
def test_vsc_stays_off_on_a_deterministic_sampler_and_the_report_says_why(sampler):
    correction, pair = _fit(sampler)
    zero = torch.tensor(0.0)
    for step in pair.steps:
        assert step.std_dev_t == 0.0 and not correction.vsc_active(step)
        assert torch.equal(correction.noise_std(zero, step), zero)  # σ stays 0: nothing is absorbed
    report = vsc_report(correction)
    assert "VSC inactive" in report and sampler.key in report and "deterministic sampler" in report


@pytest.mark.parametrize("sampler", DETERMINISTIC[1:], ids=lambda s: s.key)
def test_an_ode_step_refuses_noise_from_a_noise_std_hook(sampler):
    """Where VSC would have to add noise to a step that has none, the step refuses by name (DDIM η = 0 would
    simply become stochastic, so it is not in this list)."""
    _, pair = _fit(sampler)
    step = pair.steps[1]
    x = torch.zeros(1, 2, 8, 8)
    previous = torch.zeros_like(x) if step.order == 2 else None
    with pytest.raises(ValueError, match=r"deterministic \(no noise term\).*PTQD's variance calibration"):
        sampler_step(x, x, step, noise=torch.ones_like(x), std=0.1, previous=previous)


@pytest.mark.parametrize("sampler", STOCHASTIC, ids=lambda s: s.key)
def test_vsc_lowers_sigma_where_the_sampler_injects_noise(sampler):
    correction, pair = _fit(sampler)
    noisy = [step for step in pair.steps if step.std_dev_t > 0]
    assert noisy
    for step in noisy:
        lowered = correction.noise_std(torch.tensor(step.std_dev_t, dtype=torch.float32), step)
        lowered = getattr(lowered, "noise", lowered)  # the noise-only form returns a NoiseStd
        assert correction.vsc_active(step) and float(lowered) < step.std_dev_t
    assert "VSC active" in vsc_report(correction)


@pytest.mark.parametrize("sampler", [SamplerConfig("flow-euler", 10, shift=3.0), SamplerConfig("euler", 10)],
                         ids=lambda s: s.key)
def test_reported_timesteps_are_the_ones_the_sampler_fed(sampler):
    """flow-euler feeds fractional t (σ·1000 in float32): the int64 table truncated 960.13 to 960 in the report."""
    correction, pair = _fit(sampler)
    fed = [step.t for step in pair.steps]
    assert ptqd_tables(correction)["t"] == fed
    assert correction.timesteps.tolist() == [float(t) for t in fed]
