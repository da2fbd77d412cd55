"""Every field of today's Recipe, and of every config it can hold, survives JSON (save_recipe → load_recipe) exactly.

The recipes below set every field of every reachable config to a value other than its default; a test checks that
they do, so a field added later without a value here fails until it is added (and then round-trips too).
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from tadq.config import CalibrationConfig, ReconstructionConfig, config_to_dict
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.quant.qscheme import QScheme
from tadq.recipe import Deployment, QDiffusionMethod, Recipe, load_recipe, recipe_from_dict, save_recipe
from tadq.sampling import SamplerConfig
from tadq.svdquant.method import SVDQuantMethod
from tadq.tfmq import TFMQConfig, TFMQMethod

RECONSTRUCTION = ReconstructionConfig(
    weight_iters=7, activation_iters=3, batch_size=5, rounding_weight=0.02, beta_start=18.0, beta_end=3.0,
    warmup=0.1, weight_lr=0.02, activation_lr=0.0003, activation_p=2.0, loss_reduction="sum", seed=4,
    rounding="gptq_adaround", gptq_damp=0.02, gptq_target_damp=None, gptq_target_prior="zero",
    gptq_act_order=False, gptq_target="own_inputs",
    gptq_inputs=17)
WEIGHTS = QScheme(bits=4, symmetric=True, granularity="per_channel", range_method="percentile", percentile=99.5,
                  mse_p=2.0, mse_grid=40, group_size=32)
ACTIVATIONS = QScheme(bits=6, symmetric=True, granularity="per_group", range_method="minmax", percentile=99.0,
                      mse_p=3.0, mse_grid=20, group_size=16, rotation="hadamard")
STATIC = QScheme(bits=6, symmetric=True, range_method="percentile", percentile=99.0, mse_p=3.0, mse_grid=20,
                 group_size=16)  # block reconstruction takes calibrated per-tensor activations only
FP8 = QScheme(bits=8, symmetric=True, range_method="percentile", percentile=99.0, mse_p=3.0, mse_grid=20,
              group_size=16, format="fp8_e5m2")
# smoothing and the low-rank branch: fitted by the svdquant method only
SVD_WEIGHTS = dataclasses.replace(WEIGHTS, lowrank_rank=4)
SVD_ACTIVATIONS = dataclasses.replace(ACTIVATIONS, smoothing=True)
DPM = SamplerConfig(kind="dpmsolver++", num_steps=9, order=1)
CALIBRATION = CalibrationConfig(sampler=DPM, num_trajectories=6, num_steps_kept=3, samples_per_step=5, seed=11,
                                batch_size=7)
PTQD = PTQDConfig(trajectory="quantized", num_samples=9, seed=11, correlated=False, bias=False, variance=False,
                  clamp_negative_k=False, vsc_form="full_code")
PTQD_SELECT = PTQDConfig(select=True, selection_seed=12, selection_samples=8, selection_score="log_mse", seed=11)
TAC = TACConfig(trajectory="teacher_forced", num_samples=9, seed=11, ibc=False, ibc_apply="input",
                ibc_resolution="channel", ner_target="fp_trajectory", ner_resolution="full", relative_weight=0.25,
                mask_threshold=0.1, ridge=0.5, offset=True, select_ner=True, selection_seed=13, selection_samples=8)
TAC_IBC = TACConfig(ner=False, sequential=False, seed=11)  # ibc and ner cannot both be off
TCEC = TCECConfig(trajectory="teacher_forced", num_samples=9, seed=11, mix=0.5, damping=0.5, select=False, start=0.25,
                  mix_candidates=(0.75, 0.25), damping_candidates=(0.9,), start_candidates=(0.5, 0.1),
                  relative_weight=0.25, mask_threshold=0.1, target="next_state", sequential=False, selection_seed=14,
                  selection_samples=8, refit_candidates=True, error_model="on_target", resolution="channel",
                  offset=False, include_off=False, error_space="state")
TFMQ = TFMQConfig(num_samples=9, seed=11, tiar=False, tiar_iters=3, tiar_lr=0.01,
                  tiar_batch_size=4, freeze_time_projections=False, fsc="model", fsc_range="scheme",
                  fsc_samples_per_step=5, maintenance="cache_fp", cache_bits=6, select_metric="l2")
SVDQUANT = SVDQuantMethod(alpha_grid=(0.3, 0.6), search_samples=5, svd_niter=2, svd_oversample=3, seed=6)
COMMON = dict(keep_fp_roles=("input_conv",), exclude=("*.conv_out",),
              layer_bits=(("down_blocks.0.resnets.0.conv1", 8, 6), ("conv_in", 6, 8)),
              calibration=CALIBRATION, preset_name="W4A6", name="every-field")
# one recipe cannot hold everything (a correction stack needs one deployment, smoothing the svdquant base, a split
# shortcut and quantized attention static per-tensor activations, fp8 activations 8 bits): four of them
RECIPES = (
    Recipe(method=QDiffusionMethod(reconstruction=RECONSTRUCTION), weights=WEIGHTS, activations=STATIC,
           corrections=(PTQD, TAC, TCEC), split_shortcut=True, quantize_attention=True, softmax_bits=6,
           softmax_granularity="per_tensor", branch_ranges=True,
           deployments=(Deployment(DPM, guidance_scale=3.5, null_class=10, distilled_guidance=2.5),), **COMMON),
    Recipe(method=TFMQMethod(base="svdquant", reconstruction=RECONSTRUCTION, tfmq=TFMQ, svdquant=SVDQUANT),
           weights=SVD_WEIGHTS, activations=SVD_ACTIVATIONS,
           corrections=(PTQD_SELECT, TAC_IBC), deployments=(Deployment(DPM, guidance_scale=2.0),), **COMMON),
    Recipe(weights=WEIGHTS, activations=ACTIVATIONS,
           deployments=(Deployment(DPM),
                        Deployment(SamplerConfig(kind="ddim", num_steps=4, eta=0.5, clip_sample=True)),
                        Deployment(SamplerConfig(kind="flow-euler", num_steps=3, shift=3.0, flow_sigmas="uniform"))),
           **COMMON),
    Recipe(weights=WEIGHTS, activations=FP8, deployments=(Deployment(DPM),),
           **{**COMMON, "layer_bits": (("conv_in", 6, 8),)}),  # fp8 activations are 8 bits in every layer
)


def _changed(config: object, found: dict[str, set[str]]) -> None:
    """Record (type → fields) of every config reachable from ``config`` whose value differs from the default."""
    fields = found.setdefault(type(config).__name__, set())
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = object()  # a required field: any value counts as set
        if value != default:
            fields.add(field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                _changed(item, found)


# fields that accept one value only (nothing else to round-trip)
ONE_VALUE = {"TFMQConfig": {"trajectory"}}


def test_the_recipes_set_every_field_of_every_config_they_hold():
    found: dict[str, set[str]] = {}
    for recipe in RECIPES:
        _changed(recipe, found)
    left = {kind: sorted({f.name for f in dataclasses.fields(type(config))} - found[kind] - ONE_VALUE.get(kind, set()))
            for kind, config in _configs().items()}
    assert {kind: names for kind, names in left.items() if names} == {}


def _configs() -> dict[str, object]:
    seen: dict[str, object] = {}

    def walk(config: object) -> None:
        seen.setdefault(type(config).__name__, config)
        for field in dataclasses.fields(config):
            value = getattr(config, field.name)
            for item in value if isinstance(value, tuple) else (value,):
                if dataclasses.is_dataclass(item) and not isinstance(item, type):
                    walk(item)

    for recipe in RECIPES:
        walk(recipe)
    return seen


@pytest.mark.parametrize("recipe", RECIPES, ids=["corrections", "tfmq", "deployments", "fp8"])
def test_every_field_survives_save_and_load_exactly(recipe, tmp_path):
    save_recipe(recipe, tmp_path / "recipe.json")
    loaded = load_recipe(tmp_path / "recipe.json")
    assert loaded == recipe
    assert config_to_dict(loaded) == config_to_dict(recipe)  # the same JSON again: types kept (tuples, floats)
    assert recipe_from_dict(json.loads(json.dumps(config_to_dict(loaded)))) == recipe
