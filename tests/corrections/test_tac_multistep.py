"""TAC on a multistep sampler (DPM-Solver++ 2M): IBC's add-back restores both inputs the update used."""

from __future__ import annotations

import torch
from tests.corrections.analytic import SAMPLE_SHAPE, AnalyticDenoiser, analytic_scheduler, fit_context

from tadq.corrections import CorrectionStack, TACConfig, fit_stack
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan
from tadq.sampling.loop import sample

SAMPLER = SamplerConfig(kind="dpmsolver++", num_steps=8)


class Shifted:
    """ε̂ = ε_FP + c: a state bias for IBC to measure."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def __call__(self, x, t, cond=None):
        return self.fp(x, t) + 0.05


class Constant:
    """ε independent of x: shifting the network's input cannot change its output."""

    def __call__(self, x, t, cond=None):
        return torch.full_like(x, 0.3)


def _fitted_ibc(apply: str):
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([correction_for(TACConfig(ibc=True, ner=False, ibc_apply=apply, num_samples=8))])
    fit_stack(stack, fit_context(fp, Shifted(fp), scheduler, SAMPLER))
    return stack, scheduler


def _final(hooks, scheduler):
    plan = SamplingPlan.build(scheduler, SAMPLER)
    return sample(Constant(), plan, num_samples=4, seed=3, sample_shape=SAMPLE_SHAPE, hooks=hooks,
                  progress=False, dtype=torch.float64).images


def test_input_mode_add_back_leaves_an_input_blind_trajectory_unchanged_on_2m():
    stack, scheduler = _fitted_ibc("input")
    correction = stack[0]
    assert any(step.order == 2 for step in SamplingPlan.build(scheduler, SAMPLER).steps)
    # Random, large biases: every second-order step's C_i b_{i-1} term matters.
    correction.input_bias = torch.randn(correction.input_bias.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=torch.float64)
    plain, corrected = _final([], scheduler), _final(list(stack), scheduler)
    # The step applies diffusers' float32 constants while the add-back uses the float64 coefficients of the linear
    # form: each of the ~3 products per step differs by ≤ 2^-24 relative, over 8 steps with |coefficients| ≤ ~2.
    # 64·2^-24 of the sample's scale bounds that; a missing C_i b_{i-1} moves the result by a third of its scale.
    bound = 64 * 2.0**-24 * float(plain.abs().max())
    assert float((corrected - plain).abs().max()) <= bound


def test_trajectory_mode_fits_and_moves_the_2m_trajectory():
    stack, scheduler = _fitted_ibc("trajectory")
    assert stack[0].input_bias.abs().sum() > 0  # the bias of the shifted network was measured on the 2M grid
    assert not torch.allclose(_final(list(stack), scheduler), _final([], scheduler))
