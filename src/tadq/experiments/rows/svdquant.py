"""Rows of ``tadq run`` on the SVDQuant base (docs/methods/svdquant.md#corrections-on-the-svdquant-base).

``svdquant`` is SVDQuant at the preset's bits with the W4A4 ablation's best setting (rank-4 floating-point branch,
smoothing searched per layer, dynamic per-group activations of 8 channels; ``recipes.svdquant_schemes``). The
correction rows fit TAC, TCEC or PTQD, with calibration noise for the deployment sampler, on that very network:
``BaseModels`` builds it once per preset and keeps it on disk, and every row loads it from there.

    svdquant        the base               svdquant+tcec   TCEC fitted on it
    svdquant+tac    TAC (IBC + NER) on it  svdquant+ptqd   PTQD on it

Variants (``recipes.SVDQUANT_VARIANT_ROWS``): ``svdquant-rot…`` rotate the activations (block Hadamard, folded into
the weights) before the same fit, with the same correction rows on top; ``…+tfmq`` serve TFMQ-DM's exact FP
temporal features from a per-step table (``recipes.SVDQUANT_TFMQ``), optionally with TAC fitted on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import config_to_dict
from tadq.corrections.ptqd.correction import ptqd_tables, vsc_report
from tadq.experiments.rows.base import BaseModels, Variant, register_method
from tadq.experiments.rows.builtin import recipe_row
from tadq.experiments.rows.recipes import SVDQUANT_ROWS, SVDQUANT_VARIANT_ROWS, recipes_for_row
from tadq.experiments.rows.sampler_corrections import correction_tables
from tadq.svdquant.cost import cost_summary

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["LABELS", "svdquant_extras"]

LABELS: dict[str, str] = {
    "svdquant": "SVDQuant", "svdquant+tac": "SVDQuant + TAC", "svdquant+tcec": "SVDQuant + TCEC",
    "svdquant+ptqd": "SVDQuant + PTQD",
    "svdquant-rot": "SVDQuant, rotated", "svdquant-rot+tac": "SVDQuant, rotated + TAC",
    "svdquant-rot+tcec": "SVDQuant, rotated + TCEC", "svdquant-rot+ptqd": "SVDQuant, rotated + PTQD",
    "svdquant+tfmq": "SVDQuant + TFMQ-DM cache", "svdquant+tfmq+tac": "SVDQuant + TFMQ-DM cache + TAC",
    "svdquant-rot+tfmq": "SVDQuant, rotated + TFMQ-DM cache",
    "svdquant-rot+tfmq+tac": "SVDQuant, rotated + TFMQ-DM cache + TAC",
}


def svdquant_extras(denoiser: nn.Module, steps: int) -> dict[str, Any]:
    """The base's cost per sample over ``steps`` forwards (bit-operations with the branch, kernel classes) and, when
    this run built it (not loaded from disk), the per-layer α / rank choices and the fitting time."""
    extras: dict[str, Any] = {"svdquant_cost": cost_summary(denoiser, steps)}
    report = getattr(denoiser, "svdquant_report", None)
    if report:
        extras["svdquant_fit"] = report
    return extras


def _row(name: str) -> None:
    corrections = SVDQUANT_ROWS[name] if name in SVDQUANT_ROWS else SVDQUANT_VARIANT_ROWS[name][2]

    @register_method(name, LABELS[name])
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        recipe = recipes_for_row(name, preset_name, config)
        settings: dict[str, Any] = {"method": name, "quant": config_to_dict(recipe.quant_config()),
                                    "svdquant": config_to_dict(getattr(recipe.method, "svdquant", recipe.method)),
                                    "corrections": [config_to_dict(c) for c in recipe.corrections]}
        tfmq = getattr(recipe.method, "tfmq", None)
        if tfmq is not None:
            settings["tfmq"] = config_to_dict(tfmq)
        steps = config.sampler.num_steps

        def describe(denoiser: nn.Module) -> dict[str, Any]:
            extras = svdquant_extras(denoiser, steps)
            if tfmq is not None:  # the cache is the stack's first member: its report (disturbance, bytes)
                extras["tfmq"] = denoiser.corrections[0].report
            if corrections == ("ptqd",):
                member = denoiser.corrections[-1]
                extras |= {"ptqd_tables": ptqd_tables(member), "ptqd_vsc": vsc_report(member)}
            elif corrections:
                extras["correction_tables"] = correction_tables(denoiser)
            return extras

        return recipe_row(name, bases, config, preset_name, settings, describe, cache_dir=config.cache_dir)


for _name in (*SVDQUANT_ROWS, *SVDQUANT_VARIANT_ROWS):
    _row(_name)
