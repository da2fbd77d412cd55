"""The rows of ``tadq run`` as data: row name → ``Recipe`` (the same objects ``recipes/*.json`` ship).

A row's recipe holds everything its model is: the method (naive, Q-Diffusion, TFMQ-DM variant), the preset, the
run's calibration and reconstruction settings, the deployment sampler and the correction stack. ``base_recipe``
names the network a row shares with other rows (kept on disk by ``BaseModels``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from tadq.config import DEFAULT_FP_LAYERS, CalibrationConfig, ReconstructionConfig, fp_layer_roles
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe
from tadq.recipe_presets import correction_configs
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.svdquant.schemes import SVDQUANT_GROUP, SVDQUANT_RANK, svdquant_schemes
from tadq.tfmq import TFMQConfig, TFMQMethod

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["CORRECTION_ROWS", "TFMQ_ROWS", "SVDQUANT_ROWS", "SVDQUANT_VARIANT_ROWS", "SVDQUANT_TFMQ", "SVDQUANT_RANK",
           "SVDQUANT_GROUP", "RECIPE_ROWS", "README_TABLES_RECONSTRUCTION", "recipes_for_row", "base_recipe",
           "shipped_recipes", "default_run_recipe", "recipe_stem", "svdquant_schemes", "tfmq_config"]

# row → correction names on the Q-Diffusion base, in application order
CORRECTION_ROWS: dict[str, tuple[str, ...]] = {
    "ptqd": ("ptqd",), "ptqd-select": ("ptqd-select",), "ptqd-select-log": ("ptqd-select-log",),
    "ibc": ("ibc",), "ner": ("ner",), "tac": ("tac",), "tac-select": ("tac-select",),
    "tcec": ("tcec",), "tac+tcec": ("tac", "tcec"),
}
# TFMQ rows: row → (weights it starts from, TFMQConfig changes, corrections on top); tiar and qdiffusion+ are ablations
NO_TIAR: dict[str, Any] = {"tiar": False, "freeze_time_projections": False}  # what Q-Diffusion weights were built with
TFMQ_ROWS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "tfmq": ("tfmq", {}, ()),
    "tfmq-model": ("tfmq", {"fsc": "model"}, ()),
    "tfmq-cache": ("tfmq", {"maintenance": "cache_fp"}, ()),
    "tfmq-select": ("tfmq", {"maintenance": "select"}, ()),
    "tfmq-tiar": ("tfmq", {"fsc": "off"}, ()),
    "qdiffusion+fsc": ("qdiffusion", {}, ()),
    "qdiffusion+fsc-model": ("qdiffusion", {"fsc": "model"}, ()),
    "qdiffusion+cache": ("qdiffusion", {"fsc": "off", "maintenance": "cache_fp"}, ()),
    "tfmq+ptqd": ("tfmq", {}, ("ptqd",)),
    "tfmq+tac": ("tfmq", {}, ("tac",)),
    "tfmq-model+tac": ("tfmq", {"fsc": "model"}, ("tac",)),
    "tfmq+tac+tcec": ("tfmq", {}, ("tac", "tcec")),
}
# SVDQuant rows: row → corrections fitted on the SVDQuant base (every row of a preset shares that one network)
SVDQUANT_ROWS: dict[str, tuple[str, ...]] = {
    "svdquant": (), "svdquant+tac": ("tac",), "svdquant+tcec": ("tcec",), "svdquant+ptqd": ("ptqd",),
}
# Variants of the SVDQuant base: row → (Hadamard rotation of the activations, TFMQ-DM's FP temporal-feature cache,
# corrections fitted on top). Every row of a (preset, rotation) shares one SVDQuant network; the cache is built on it
# in seconds (docs/methods/svdquant.md#corrections-and-tfmq-dm-on-the-rotated-base)
SVDQUANT_VARIANT_ROWS: dict[str, tuple[bool, bool, tuple[str, ...]]] = {
    "svdquant-rot": (True, False, ()), "svdquant-rot+tac": (True, False, ("tac",)),
    "svdquant-rot+tcec": (True, False, ("tcec",)), "svdquant-rot+ptqd": (True, False, ("ptqd",)),
    "svdquant+tfmq": (False, True, ()), "svdquant+tfmq+tac": (False, True, ("tac",)),
    "svdquant-rot+tfmq": (True, True, ()), "svdquant-rot+tfmq+tac": (True, True, ("tac",)),
}
# the W4A4 ablation's best setting (rank-4 branch, dynamic per-group activations of 8 channels, smoothing searched
# per layer, no rotation; weights per output channel): SVDQUANT_RANK, SVDQUANT_GROUP and svdquant_schemes live in
# tadq.svdquant.schemes (tadq recipe's SVDQuant bases build theirs there too) and are re-exported here
SVDQUANT_TFMQ = TFMQConfig(tiar=False, freeze_time_projections=False, fsc="off", maintenance="cache_fp")
"""TFMQ-DM on an SVDQuant base: what carries over is the exact FP temporal-feature cache (its activations are
dynamic, so FSC has no static range to tabulate; TIAR and freezing act on block reconstruction, which SVDQuant does
not run)."""
RECIPE_ROWS: tuple[str, ...] = ("naive", "qdiffusion", *CORRECTION_ROWS, *TFMQ_ROWS, *SVDQUANT_ROWS,
                                 *SVDQUANT_VARIANT_ROWS)


def recipe_stem(row: str) -> str:
    """The recipe name of a row: correction rows name their base (``qdiffusion+tac``), other rows themselves."""
    return f"qdiffusion+{row}" if row in CORRECTION_ROWS else row


def tfmq_config(calibration: CalibrationConfig) -> TFMQConfig:
    """The ``tfmq`` row's settings: defaults; model-wide FSC reads the run's calibration trajectories (same count,
    seed and inputs per step as the base calibration, but every step of the grid)."""
    return TFMQConfig(num_samples=calibration.num_trajectories, seed=calibration.seed,
                      fsc_samples_per_step=calibration.samples_per_step)


def _recipe(name: str, preset_name: str, calibration: CalibrationConfig, reconstruction: ReconstructionConfig,
            sampler: SamplerConfig, guidance_scale: float = 1.0, keep_fp_roles: tuple[str, ...] = ()) -> Recipe:
    fields: dict[str, Any] = {"calibration": calibration, "deployments": (Deployment(sampler, guidance_scale),),
                              "name": f"{recipe_stem(name)}-{preset_name.upper()}", "keep_fp_roles": keep_fp_roles}
    if name == "naive":
        return Recipe.from_preset(preset_name, method=NaiveMethod(), **fields)
    qdiffusion = {"split_shortcut": True, "quantize_attention": True, **fields}
    if name == "qdiffusion":
        return Recipe.from_preset(preset_name, method=QDiffusionMethod(reconstruction), **qdiffusion)
    if name in CORRECTION_ROWS:
        corrections = correction_configs(CORRECTION_ROWS[name], calibration.seed)
        return Recipe.from_preset(preset_name, method=QDiffusionMethod(reconstruction), corrections=corrections,
                                  **qdiffusion)
    if name in SVDQUANT_ROWS:
        weights, activations = svdquant_schemes(preset_name)
        return Recipe.from_preset(preset_name, method=SVDQuantMethod(seed=calibration.seed), weights=weights,
                                  activations=activations,
                                  corrections=correction_configs(SVDQUANT_ROWS[name], calibration.seed), **fields)
    if name in SVDQUANT_VARIANT_ROWS:
        rotated, cached, corrections = SVDQUANT_VARIANT_ROWS[name]
        weights, activations = svdquant_schemes(preset_name)
        if rotated:
            activations = dataclasses.replace(activations, rotation="hadamard")
        method: Any = SVDQuantMethod(seed=calibration.seed)
        if cached:
            method = TFMQMethod(base="svdquant", tfmq=SVDQUANT_TFMQ, svdquant=method)
        return Recipe.from_preset(preset_name, method=method, weights=weights, activations=activations,
                                  corrections=correction_configs(corrections, calibration.seed), **fields)
    if name in TFMQ_ROWS:
        weights, changes, corrections = TFMQ_ROWS[name]
        settings = dataclasses.replace(tfmq_config(calibration), **(NO_TIAR if weights == "qdiffusion" else {}),
                                       **changes)
        return Recipe.from_preset(preset_name, method=TFMQMethod(reconstruction=reconstruction, tfmq=settings),
                                  corrections=correction_configs(corrections, calibration.seed), **qdiffusion)
    raise ValueError(f"row {name!r} has no recipe; rows with recipes: {list(RECIPE_ROWS)}")


def recipes_for_row(name: str, preset_name: str, config: RunConfig) -> Recipe:
    """The recipe of row ``name`` at ``preset_name`` under the run's calibration, reconstruction and sampler."""
    guidance = 1.0 if config.guidance_scale is None else config.guidance_scale
    return _recipe(name, preset_name, config.calibration, config.reconstruction, config.sampler, guidance,
                   fp_layer_roles(config.fp_layers))


def base_recipe(recipe: Recipe, name: str) -> Recipe:
    """The recipe of the network row ``name`` is built on (what ``BaseModels`` keeps on disk and shares)."""
    if isinstance(recipe.method, TFMQMethod) and recipe.method.base == "svdquant":
        return dataclasses.replace(recipe.base(), method=recipe.method.svdquant)
    if name in TFMQ_ROWS:
        weights = TFMQ_ROWS[name][0]
        if weights == "qdiffusion":
            return dataclasses.replace(recipe.base(), method=QDiffusionMethod(recipe.method.reconstruction))
        return dataclasses.replace(recipe.base(),
                                   method=dataclasses.replace(recipe.method, tfmq=tfmq_config(recipe.calibration)))
    return recipe.base()


# (rows, presets, η) of every table docs/results/digits.md reports (main table, TFMQ table, stochastic-sampler table)
README_TABLES: tuple[tuple[tuple[str, ...], tuple[str, ...], float], ...] = (
    (("naive", "qdiffusion", "ptqd"), ("W8A8", "W4A8", "W4A4"), 0.0),
    (("tac", "tcec", "ibc", "ner", "tac+tcec"), ("W4A8", "W4A4"), 0.0),
    (("tfmq", "tfmq-model", "tfmq-cache", "tfmq-select", "tfmq+ptqd"), ("W4A8",), 0.0),
    (("naive", "qdiffusion", "ptqd"), ("W4A8", "W4A4"), 1.0),
)


# the reconstruction of those tables: AdaRound 1000 / 400 iterations, every layer quantized (the defaults when they
# were measured; the defaults now are GPTQ rounding with the first and last layers in float)
README_TABLES_RECONSTRUCTION = ReconstructionConfig(rounding="adaround", activation_iters=400)


def default_run_recipe(row: str, preset_name: str) -> Recipe:
    """``recipes_for_row`` under ``tadq run``'s defaults (DDIM 50, η 0, ``CalibrationConfig()``,
    ``ReconstructionConfig()``, no guidance, ``DEFAULT_FP_LAYERS``), without a ``RunConfig`` (whose module imports
    the rows); a test checks it equals the ``RunConfig()`` one."""
    sampler = SamplerConfig(kind="ddim", num_steps=50, eta=0.0)
    return _recipe(row, preset_name, CalibrationConfig(), ReconstructionConfig(), sampler, 1.0,
                   fp_layer_roles(DEFAULT_FP_LAYERS))


def shipped_recipes() -> dict[str, Recipe]:
    """File name → recipe of every row of ``README_TABLES``, with the setting those tables were measured with (DDIM
    50, 256 calibration trajectories, seed 0, ``README_TABLES_RECONSTRUCTION``, every layer quantized): what
    ``recipes/`` holds."""
    recipes: dict[str, Recipe] = {}
    for rows, presets, eta in README_TABLES:
        sampler = SamplerConfig(kind="ddim", num_steps=50, eta=eta)
        calibration = CalibrationConfig(sampler=sampler)
        for row in rows:
            for preset_name in presets:
                suffix = "" if eta == 0.0 else f"-eta{eta:g}"
                recipe = _recipe(row, preset_name, calibration, README_TABLES_RECONSTRUCTION, sampler)
                recipe = dataclasses.replace(recipe, name=recipe.name + suffix)
                recipes[f"{recipe.name}.json"] = recipe
    return recipes
