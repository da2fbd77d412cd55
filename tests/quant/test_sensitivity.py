"""Sensitivity-based mixed precision: per-layer sensitivities, the choice under a bit-operations budget, and the
raised layers."""

from __future__ import annotations

import pytest
import torch

from tadq import api
from tadq.config import CalibrationConfig
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.quant import QScheme
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.svdquant.sensitivity import (
    apply_mixed_precision,
    choose_high_precision,
    layer_bits,
    layer_sensitivities,
    network_macs,
    plan_bitops,
)

SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.fixture
def svdquant_model(tiny_unet, ddpm_scheduler):
    recipe = Recipe(method=SVDQuantMethod(alpha_grid=(0.5,), search_samples=8),
                    weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=2),
                    activations=QScheme(bits=4, granularity="per_group", group_size=4, smoothing=True),
                    calibration=CALIB, deployments=(Deployment(SAMPLER),))
    return api.quantize(tiny_unet, ddpm_scheduler, recipe, progress=False)


def test_mixed_precision_respects_its_budget_and_raises_the_chosen_layers(svdquant_model, ddpm_scheduler):
    qmodel = svdquant_model
    sensitivities = layer_sensitivities(qmodel, ddpm_scheduler, SAMPLER, num_samples=2, seed=3, batch_size=2)
    assert len(sensitivities) == len(layer_bits(qmodel)) > 2
    assert all(s.error >= 0 and s.macs > 0 for s in sensitivities)
    assert [s.error for s in sensitivities] == sorted((s.error for s in sensitivities), reverse=True)
    assert sensitivities[0].error > 0  # quantizing a single layer moves the final image
    base = bit_operations(qmodel)
    with pytest.raises(ValueError, match="below the base"):
        choose_high_precision(qmodel, sensitivities, base - 1)
    empty = choose_high_precision(qmodel, sensitivities, base)
    assert empty.high_layers == () and empty.bitops == empty.base_bitops == base
    every = choose_high_precision(qmodel, sensitivities, 10**18)
    assert len(every.high_layers) == sum(s.error > 0 for s in sensitivities)
    for fraction in (0.1, 0.3, 0.6):
        budget = int(base + fraction * (every.all_high_bitops - base))
        plan = choose_high_precision(qmodel, sensitivities, budget)
        assert base <= plan.bitops <= budget and plan.high_layers
        assert plan.bitops == plan_bitops(network_macs(qmodel), layer_bits(qmodel), plan.high_layers)
    before = {s.name: s for s in sensitivities}
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 800])
    plain = qmodel(x, t)
    apply_mixed_precision(qmodel, plan)
    bits = layer_bits(qmodel)
    assert all(bits[name] == (8, 8) for name in plan.high_layers)
    assert all(bits[name] == (4, 4) for name in before if name not in plan.high_layers)
    assert plan_bitops(network_macs(qmodel), bits) == plan.bitops  # the network now costs what the plan says
    assert not torch.equal(qmodel(x, t), plain)
    assert qmodel.mixed_precision["high_layers"] == list(plan.high_layers)
