"""The base rows: naive PTQ, Q-Diffusion, and PTQD on the very same Q-Diffusion model, each built from its recipe
(``tadq.experiments.rows.recipes``)."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.api import quantize
from tadq.config import QuantConfig, config_to_dict
from tadq.corrections.ptqd.correction import ptqd_tables, vsc_report
from tadq.experiments.rows.base import BaseModels, Variant, method_label, register_method
from tadq.experiments.rows.recipes import base_recipe, recipes_for_row

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["method_config", "recipe_row"]


def method_config(method: str, preset_name: str, config: RunConfig) -> QuantConfig:
    """The base ``QuantConfig`` of one (method, preset) row (correction rows sit on the Q-Diffusion base)."""
    return recipes_for_row("naive" if method == "naive" else "qdiffusion", preset_name, config).quant_config()


def recipe_row(name: str, bases: BaseModels, config: RunConfig, preset_name: str, settings: dict[str, Any],
               describe=None, cache_dir: str | None = None) -> Variant:
    """The row of recipe ``name``: its base network from ``bases`` (built once, kept on disk), then
    ``tadq.quantize(model, scheduler, recipe, base=...)`` adds what the recipe puts on top (corrections, TFMQ's
    per-step tables); the time of that step is kept with the cell."""
    recipe = recipes_for_row(name, preset_name, config)
    base = base_recipe(recipe, name)
    timing: dict[str, float] = {}

    def build() -> nn.Module:
        qmodel = bases.get(base, cache_dir=cache_dir)
        if dataclasses.replace(recipe, name="") == base:
            qmodel.recipe = recipe
            return qmodel
        t0 = time.perf_counter()
        built = quantize(bases.model, bases.scheduler, recipe, base=qmodel, cache_dir=cache_dir,
                         conditions=bases.conditions, fp_trajectories=bases.fp_trajectories)
        if recipe.corrections:
            timing["correction_fit_s"] = time.perf_counter() - t0
        return built

    def describe_with_timing(denoiser: nn.Module) -> dict[str, Any]:
        return {**(describe(denoiser) if describe is not None else {}), **timing}

    extras = describe_with_timing if describe is not None or recipe.corrections else None
    return Variant(method_label(name), recipe.label, build, settings, extras)


def _base_row(method: str) -> None:
    @register_method(method, {"naive": "naive PTQ", "qdiffusion": "Q-Diffusion"}[method])
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        quant_config = method_config(method, preset_name, config)
        settings = {"method": method, "quant": config_to_dict(quant_config)}
        return recipe_row(method, bases, config, preset_name, settings)


_base_row("naive")
_base_row("qdiffusion")


def _ptqd_row(name: str, label: str) -> None:
    @register_method(name, label)
    def ptqd_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        """PTQD fitted for the deployment sampler on the Q-Diffusion base (calibration noise seed)."""
        recipe = recipes_for_row(name, preset_name, config)
        (ptqd_config,) = recipe.corrections

        def describe(denoiser: nn.Module) -> dict[str, Any]:
            correction = denoiser.corrections[-1]
            return {"ptqd_tables": ptqd_tables(correction), "ptqd_vsc": vsc_report(correction),
                    "ptqd_selection": getattr(correction, "selection_records", None)}

        settings = {"method": name, "quant": config_to_dict(recipe.quant_config()),
                    "ptqd": config_to_dict(ptqd_config)}
        return recipe_row(name, bases, config, preset_name, settings, describe)


_ptqd_row("ptqd", "Q-Diffusion + PTQD")
_ptqd_row("ptqd-select", "Q-Diffusion + PTQD (held-out guard)")
_ptqd_row("ptqd-select-log", "Q-Diffusion + PTQD (held-out guard, log MSE)")
