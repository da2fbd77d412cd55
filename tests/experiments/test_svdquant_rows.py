"""The SVDQuant rows of ``tadq run``: one SVDQuant base per preset, TAC / TCEC / PTQD fitted on that very network."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tadq
import tadq.experiments.rows.base as rows_base
from tadq import api
from tadq.config import CalibrationConfig
from tadq.corrections.attach import fit_corrections
from tadq.experiments.rows.recipes import SVDQUANT_ROWS, SVDQUANT_VARIANT_ROWS, base_recipe, recipes_for_row
from tadq.experiments.rows.svdquant import LABELS
from tadq.experiments.run import RunConfig, run_main_job
from tadq.quant.transformed import TransformedQuantLayer
from tadq.recipe_presets import correction_configs
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.tfmq import TFMQConfig, TFMQCorrection, TFMQMethod
from tadq.tfmq.pipeline import temporal_features_per_step
from tadq.tfmq.tib import TemporalInformationBlock

SAMPLER = SamplerConfig(kind="ddim", num_steps=6)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=3, samples_per_step=8, seed=0,
                          batch_size=8)


def _config(model_dir, out, **kw) -> RunConfig:
    fields = dict(model=str(model_dir), presets=("W4A4",), methods=tuple(SVDQUANT_ROWS), num_samples=4,
                  sampler=SAMPLER, eval_seed=1, calibration=CALIB, batch_size=8, out_dir=str(out),
                  cache_dir=str(out / "cache"), grid_samples=4)
    return RunConfig(**{**fields, **kw})


def test_svdquant_row_recipe_is_the_ablations_best_setting(tmp_path):
    config = _config(tmp_path, tmp_path / "r")
    recipe = recipes_for_row("svdquant", "W4A4", config)
    assert isinstance(recipe.method, SVDQuantMethod) and not recipe.corrections
    assert (recipe.weights.bits, recipe.weights.granularity, recipe.weights.lowrank_rank) == (4, "per_channel", 4)
    activations = recipe.activations
    assert (activations.bits, activations.granularity, activations.group_size) == (4, "per_group", 8)
    assert activations.smoothing and activations.rotation == "none"
    assert recipe.name == "svdquant-W4A4" and recipe.label == "W4A4"
    for row, names in SVDQUANT_ROWS.items():  # every correction row sits on exactly this base
        stacked = recipes_for_row(row, "W4A4", config)
        assert stacked.base() == recipe.base()
        assert stacked.corrections == correction_configs(names, CALIB.seed)
    assert recipes_for_row("svdquant", "W8A8", config).activations.bits == 8  # the preset's bits


@pytest.mark.slow  # ≈ 18 s; the SVDQuant row tests below keep its path in the default suite
def test_svdquant_rows_run_on_one_base_network(tmp_path, tiny_model_dir, monkeypatch):
    built = []
    real_quantize = rows_base.quantize
    monkeypatch.setattr(rows_base, "quantize", lambda *a, **k: built.append(1) or real_quantize(*a, **k))
    results = run_main_job(_config(tiny_model_dir, tmp_path / "run"))
    rows = {row["method"]: row for row in results["rows"]}
    assert {"SVDQuant", "SVDQuant + TAC", "SVDQuant + TCEC", "SVDQuant + PTQD"} <= set(rows)
    errors = {rows[m]["final_mse"] for m in rows if m != "FP"}
    assert len(errors) == len(SVDQUANT_ROWS) and all(e > 0 for e in errors)  # every correction changes the output
    assert built == [1]  # the base is quantized once; the correction rows load it
    models = sorted(p.name for p in (tmp_path / "run" / "models").iterdir() if p.is_dir())
    assert len(models) == 1 and models[0].startswith("svdquant-W4A4-")
    extras = results["extras"]
    cost = extras["SVDQuant W4A4"]["svdquant_cost"]
    assert cost["branch_macs"] > 0 and cost["bitops"] > cost["bitops_quantized_gemms"]
    assert set(extras["SVDQuant + TAC W4A4"]["correction_tables"]) == {"0:TAC"}
    assert set(extras["SVDQuant + TCEC W4A4"]["correction_tables"]) == {"0:TCEC"}
    assert "ptqd_tables" in extras["SVDQuant + PTQD W4A4"]


@pytest.mark.parametrize("row", ["svdquant+tac", pytest.param("svdquant+tcec", marks=pytest.mark.slow),  # 42 s
                                 "svdquant+ptqd"])
def test_corrections_on_the_svdquant_base_change_it_and_reload_bit_identically(tmp_path, tiny_model_dir, tiny_unet,
                                                                              ddpm_scheduler, row):
    config = _config(tiny_model_dir, tmp_path / "r")
    recipe = recipes_for_row(row, "W4A4", config)
    recipe = dataclasses.replace(recipe, method=SVDQuantMethod(alpha_grid=(0.3, 0.6), search_samples=8),
                                 corrections=tuple(dataclasses.replace(c, num_samples=8) for c in recipe.corrections))
    base = api.quantize(tiny_unet, ddpm_scheduler, recipe.base(), progress=False)
    assert any(m.rank for m in base.model.modules() if isinstance(m, TransformedQuantLayer))
    corrected = api.quantize(tiny_unet, ddpm_scheduler, recipe, base=base, progress=False)
    assert corrected.model is base.model and len(corrected.corrections) == 1  # fitted on the very same network
    again = fit_corrections(base, tiny_unet, ddpm_scheduler, SAMPLER, recipe.corrections, batch_size=8)
    first = api.sample(corrected, ddpm_scheduler, SAMPLER, num_samples=3, seed=5, progress=False).images
    assert torch.equal(first, api.sample(again, ddpm_scheduler, SAMPLER, num_samples=3, seed=5,
                                         progress=False).images)  # the fit is deterministic
    plain = api.sample(base, ddpm_scheduler, SAMPLER, num_samples=3, seed=5, progress=False).images
    assert not torch.equal(first, plain)  # the correction changes what the base samples
    corrected.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.recipe == corrected.recipe and len(loaded.corrections) == 1
    assert torch.equal(api.sample(loaded, ddpm_scheduler, SAMPLER, num_samples=3, seed=5, progress=False).images,
                       first)


VARIANT_ROWS = ("svdquant", "svdquant+tfmq", "svdquant+tfmq+tac", "svdquant-rot", "svdquant-rot+tac",
                "svdquant-rot+tfmq")


def test_variant_row_recipes_rotate_or_cache_on_a_plain_svdquant_base(tmp_path):
    config = _config(tmp_path, tmp_path / "r", methods=VARIANT_ROWS)
    for row in VARIANT_ROWS[1:]:
        recipe = recipes_for_row(row, "W4A4", config)
        rotated, cached, corrections = SVDQUANT_VARIANT_ROWS[row]
        assert (recipe.activations.rotation == "hadamard") == rotated
        assert isinstance(recipe.method, TFMQMethod) == cached
        assert recipe.corrections == correction_configs(corrections, CALIB.seed)
        base = base_recipe(recipe, row)
        assert isinstance(base.method, SVDQuantMethod) and not base.corrections


@pytest.mark.slow  # ≈ 25 s; the rows' recipes are checked in the default suite (above)
def test_variant_rows_rotate_or_cache_on_their_own_shared_bases(tmp_path, tiny_model_dir):
    rows = VARIANT_ROWS
    results = run_main_job(_config(tiny_model_dir, tmp_path / "run", methods=rows))
    by_name = {row["method"]: row for row in results["rows"]}
    errors = [by_name[LABELS[row]]["final_mse"] for row in rows]
    assert len(set(errors)) == len(rows)  # rotation, the cache and TAC each change what is sampled
    models = sorted(p.name for p in (tmp_path / "run" / "models").iterdir() if p.is_dir())
    assert len(models) == 2  # one plain and one rotated SVDQuant network; the cache and TAC are fitted on them
    report = results["extras"]["SVDQuant + TFMQ-DM cache W4A4"]["tfmq"]
    assert report["cache_bytes"] > 0 and all(v["choice"] == "cache" for v in report["disturbance"].values())


@pytest.mark.parametrize("fsc", ["off", "tib"])
def test_tfmq_cache_on_svdquant_serves_exact_fp_temporal_features(tiny_unet, ddpm_scheduler, tmp_path, fsc):
    config = _config(tmp_path, tmp_path / "r")
    recipe = recipes_for_row("svdquant+tfmq", "W4A4", config)
    recipe = dataclasses.replace(recipe, method=dataclasses.replace(
        recipe.method, svdquant=SVDQuantMethod(alpha_grid=(0.3,), search_samples=8),
        tfmq=dataclasses.replace(recipe.method.tfmq, fsc=fsc)))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, recipe, progress=False)
    (cache,) = qmodel.corrections
    # every activation is dynamic (per group): TIB-only FSC finds no static range to make per-step
    assert isinstance(cache, TFMQCorrection) and not cache.fsc_quantizers
    fp_features = temporal_features_per_step(TemporalInformationBlock(tiny_unet, qmodel.adapter),
                                             cache.grid_timesteps)
    served = temporal_features_per_step(TemporalInformationBlock(qmodel.model, qmodel.adapter),
                                        cache.grid_timesteps, cache)
    assert fp_features.keys() == served.keys() and len(served) > 0
    for layer, reference in fp_features.items():
        assert torch.equal(served[layer], reference), layer  # the table holds the FP values themselves
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    first = api.sample(qmodel, ddpm_scheduler, SAMPLER, num_samples=3, seed=5, progress=False).images
    assert torch.equal(api.sample(loaded, ddpm_scheduler, SAMPLER, num_samples=3, seed=5, progress=False).images,
                       first)


def test_tfmq_on_svdquant_refuses_tiar():
    with pytest.raises(ValueError, match="tiar=False"):
        TFMQMethod(base="svdquant", tfmq=TFMQConfig())


@pytest.mark.parametrize("rows", [("svdquant",), ("tfmq",)])
def test_rows_without_an_fp8_form_are_refused_when_the_run_is_configured(tmp_path, rows):
    """SVDQuant's dynamic per-group activations and TFMQ's per-step integer steps (FSC) have no fp8 form: a run
    asking for them at an FP8 preset is refused naming why, before the FP model is loaded."""
    with pytest.raises(ValueError, match="fp8"):
        _config(tmp_path, tmp_path / "r", presets=("W4A8-FP8",), methods=rows)
    assert _config(tmp_path, tmp_path / "r", presets=("W4A8-FP8",), methods=("naive", "qdiffusion")).presets == (
        "W4A8-FP8",)
