"""Sensitivity-based mixed precision: per-layer sensitivities, the choice under a bit-operations budget, and the
raised layers."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.quant import QScheme
from tadq.recipe import Deployment, Recipe
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.svdquant.sensitivity import (
    LayerSensitivity,
    MixedPrecisionPlan,
    apply_mixed_precision,
    choose_high_precision,
    layer_bits,
    layer_sensitivities,
    mixed_precision_config,
    network_macs,
    plan_bitops,
)

SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.fixture(scope="module")
def _svdquant_built():
    """Quantized once per module (≈ 3 s a build on a 2-core AVX2 CPU, and four tests take it)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    recipe = Recipe(method=SVDQuantMethod(alpha_grid=(0.5,), search_samples=8),
                    weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=2),
                    activations=QScheme(bits=4, granularity="per_group", group_size=4, smoothing=True),
                    calibration=CALIB, deployments=(Deployment(SAMPLER),))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    return api.quantize(build_tiny_unet(), scheduler, recipe, progress=False)


@pytest.fixture
def svdquant_model(_svdquant_built):
    """A copy of its own for each test: tests raise its layers in place."""
    return copy.deepcopy(_svdquant_built)


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
    assert qmodel.config.layer_bits == tuple((name, 8, 8) for name in plan.high_layers)
    assert qmodel.recipe.quant_config() == qmodel.config  # the recipe saved beside it says the same


def _plan(names: tuple[str, ...]) -> MixedPrecisionPlan:
    return MixedPrecisionPlan(names, 0, 0, 0, 0, ())


def test_a_raised_model_saves_its_choice_and_loads_bit_identically(svdquant_model, ddpm_scheduler, tmp_path):
    qmodel = svdquant_model
    names = tuple(layer_bits(qmodel))[2:4]
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 800])
    apply_mixed_precision(qmodel, _plan(names))
    assert qmodel.config.layer_bits == tuple((name, 8, 8) for name in names)
    assert all(qmodel.quantization_map()[name]["weights"].startswith("int8-") for name in names)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.config == qmodel.config and loaded.recipe == qmodel.recipe
    assert layer_bits(loaded) == layer_bits(qmodel)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), qmodel(x, t))


def test_raising_twice_keeps_the_first_choice_and_unknown_layers_raise(svdquant_model):
    qmodel = svdquant_model
    first, second = tuple(layer_bits(qmodel))[:2]
    apply_mixed_precision(qmodel, _plan((first,)))
    apply_mixed_precision(qmodel, _plan((second,)))
    assert qmodel.config.layer_bits == ((first, 8, 8), (second, 8, 8))
    config = qmodel.config
    with pytest.raises(ValueError, match="down_blocks.7.conv"):
        apply_mixed_precision(qmodel, _plan(("down_blocks.7.conv",)))
    assert qmodel.config == config  # refused before anything changed


def test_the_config_of_a_plan_rebuilds_the_raised_layers_from_scratch(svdquant_model, tiny_unet, ddpm_scheduler):
    """``mixed_precision_config`` quantizes the chosen layers at 8 bits from scratch (weight-only: activations off)."""
    names = tuple(layer_bits(svdquant_model))[:2]
    config = mixed_precision_config(svdquant_model.config, _plan(names))
    assert config.layer_bits == tuple((name, 8, 8) for name in names)
    rebuilt = api.quantize(tiny_unet, ddpm_scheduler, dataclasses.replace(svdquant_model.recipe,
                                                                          layer_bits=config.layer_bits),
                           progress=False)
    bits = layer_bits(rebuilt)
    assert all(bits[name] == (8, 8) for name in names) and sum(b == (4, 4) for b in bits.values()) > 2
    weight_only = QuantConfig.from_preset("W4A16")
    assert mixed_precision_config(weight_only, _plan(names)).layer_bits == tuple((n, 8, None) for n in names)


def test_split_shortcut_networks_are_refused_with_a_reason(tiny_unet, ddpm_scheduler):
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, split_shortcut=True)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    with pytest.raises(ValueError, match="split_shortcut"):
        apply_mixed_precision(qmodel, _plan(("conv_in",)))


def test_a_class_conditional_network_is_measured_with_its_conditions_and_guidance(tiny_unet, ddpm_scheduler):
    """``layer_sensitivities`` took ``guidance_scale`` but no conditions: a conditional network failed in its first
    forward ('this UNet2DModel is class-conditional: pass cond=...'), and guidance could never be measured."""
    from tadq.sampling.conditioning import RandomClassLabels

    model = build_tiny_unet(num_class_embeds=4)
    labels = RandomClassLabels(3, null_class=3)
    qmodel = api.quantize(model, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=CALIB),
                          conditions=labels, progress=False)
    layers = ["down_blocks.0.resnets.0.conv1", "conv_out"]
    with pytest.raises(ValueError, match="conditions="):  # before the reference run, naming the argument
        layer_sensitivities(qmodel, ddpm_scheduler, SAMPLER, num_samples=2, batch_size=2, layers=layers)
    plain, guided = (
        {s.name: s.error for s in layer_sensitivities(qmodel, ddpm_scheduler, SAMPLER, num_samples=2, batch_size=2,
                                                      layers=layers, conditions=labels, guidance_scale=scale)}
        for scale in (1.0, 3.0))
    assert set(plain) == set(guided) == set(layers)
    assert all(error > 0 for error in (*plain.values(), *guided.values()))
    assert plain != guided  # the guided runs call the null class too: other trajectories, other errors
    # the plan's costs count the conditional network's MACs (its forward needed labels there too)
    sensitivities = [LayerSensitivity(name, 0, error) for name, error in guided.items()]
    base = plan_bitops(network_macs(qmodel), layer_bits(qmodel))
    plan = choose_high_precision(qmodel, sensitivities, 2 * base)
    assert plan.base_bitops == base and base < plan.bitops <= 2 * base and plan.high_layers
