"""``fit_stack`` refuses inputs it cannot finish with before any network call."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from tests.corrections.analytic import analytic_scheduler, fit_context
from tests.corrections.test_tac_tcec import TimeOnly
from tests.corrections.test_tcec_samplers import Scaled

from tadq.corrections import CorrectionStack, PTQDConfig, TACConfig, fit_stack
from tadq.registry import correction_for
from tadq.sampling import Conditioning, ConditioningList, SamplerConfig

ROWS = 6


class Counting:
    """A denoiser that counts its calls."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, t, cond=None):
        self.calls += 1
        return self.denoiser(x, t)


@pytest.mark.parametrize("configs", [[PTQDConfig(num_samples=ROWS + 2)],
                                     [PTQDConfig(num_samples=ROWS, select=True, selection_samples=ROWS + 1)],
                                     [TACConfig(num_samples=ROWS), PTQDConfig(num_samples=ROWS + 2)]],
                         ids=["pair", "held-out", "second-member"])
def test_a_condition_list_shorter_than_the_fits_is_refused_before_any_network_call(configs):
    """A ``ConditioningList`` has one row per sample; a fit walking more samples failed with an IndexError at the
    first batch past its end, after the walks (and the earlier members' fits) before it had run."""
    fp = TimeOnly()
    fp_calls, q_calls = Counting(fp), Counting(Scaled(fp))
    conditions = ConditioningList(Conditioning(class_labels=torch.zeros(ROWS, dtype=torch.long)))
    ctx = fit_context(fp_calls, q_calls, analytic_scheduler(), SamplerConfig("ddim", 4), conditions=conditions,
                      batch_size=4)
    stack = CorrectionStack([correction_for(config) for config in configs])
    with pytest.raises(ValueError, match=f"condition list holds {ROWS} rows"):
        fit_stack(stack, ctx)
    assert fp_calls.calls == q_calls.calls == 0


def test_earlier_members_fitted_for_another_schedule_are_refused_before_any_network_call():
    """PTQD fitted with set_alpha_to_one=True differs from the new fit's schedule at the last step only: the stack
    was refused there, after the walks of every earlier step."""
    sampler = SamplerConfig("ddim", 4)
    fitted_with, fitting_with = (DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=value)
                                 for value in (True, False))
    fp = TimeOnly()
    stack = CorrectionStack([correction_for(PTQDConfig(num_samples=4))])
    fit_stack(stack, fit_context(fp, Scaled(fp), fitted_with, sampler))
    stack.append(correction_for(TACConfig(num_samples=4)))
    fp_calls, q_calls = Counting(fp), Counting(Scaled(fp))
    with pytest.raises(ValueError, match="PTQDCorrection was fitted on another training schedule: at step 3"):
        fit_stack(stack, fit_context(fp_calls, q_calls, fitting_with, sampler), start=1)
    assert fp_calls.calls == q_calls.calls == 0
