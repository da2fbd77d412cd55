"""Per-step tables of shape (S, C) or (S, C, H, W) act only on batches of that shape: a stack fitted on one model
and attached to a model with other channels or another resolution is refused by name at its first hook."""

from __future__ import annotations

import pytest
from tests.corrections.analytic import AnalyticDenoiser, InjectedError, analytic_scheduler, fit_context

from tadq.corrections import CorrectionStack, TACConfig, TCECConfig, fit_stack
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan, sample

SAMPLER = SamplerConfig("ddim", 4)
FITTED = (1, 8, 8)
OTHERS = {"channels": (3, 8, 8), "resolution": (1, 4, 4)}


def _fitted_stack(config) -> CorrectionStack:
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([correction_for(config)])
    fit_stack(stack, fit_context(fp, InjectedError(fp, bias=(0.05,)), scheduler, SAMPLER, shape=FITTED))
    return stack


CONFIGS = {"tac-channel": TACConfig(num_samples=4, ibc_resolution="channel"), "tac-full": TACConfig(num_samples=4),
           "tcec-channel": TCECConfig(num_samples=4, select=False, resolution="channel"),
           "tcec-full": TCECConfig(num_samples=4, select=False)}
# per-channel rows do not depend on the resolution: only the full-resolution ones are refused at another one
CASES = [(name, "channels") for name in CONFIGS] + [(name, "resolution") for name in CONFIGS if "full" in name]


@pytest.mark.parametrize(("name", "other"), CASES, ids=[f"{name}-{other}" for name, other in CASES])
def test_tables_fitted_on_one_sample_shape_are_refused_on_another(name, other):
    """A one-channel row was broadcast over every channel of a three-channel batch without a word; a
    full-resolution row failed inside torch with a size mismatch."""
    stack = _fitted_stack(CONFIGS[name])
    scheduler = analytic_scheduler()
    plan = SamplingPlan.build(scheduler, SAMPLER)
    fp = AnalyticDenoiser(scheduler)
    sample(fp, plan, num_samples=2, seed=5, sample_shape=FITTED, hooks=tuple(stack), progress=False)  # its own
    with pytest.raises(ValueError, match="fitted on a model with other samples"):
        sample(fp, plan, num_samples=2, seed=5, sample_shape=OTHERS[other], hooks=tuple(stack), progress=False)
