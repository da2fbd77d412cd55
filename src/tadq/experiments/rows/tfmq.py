"""Rows of ``tadq run`` for TFMQ-DM (docs/methods/tfmq.md), all on the Q-Diffusion row's ``QuantConfig``.

One TFMQ reconstruction (TIAR, then block reconstruction with the TIB frozen) is built per preset and kept on disk
by ``BaseModels`` under the tag of its ``TFMQConfig``; the FSC and maintenance variants are applied to a fresh load
of it (seconds), so every TFMQ row of a preset shares the very same weights:

    tfmq          TIAR + TIB-only FSC (the paper)            tfmq-cache    ... + exact FP temporal-feature cache
    tfmq-model    TIAR + model-wide FSC (the authors' code)  tfmq-select   ... + per-block TIB / quantized-cache choice
    tfmq+ptqd     PTQD fitted on top of ``tfmq``; tfmq+tac, tfmq-model+tac, tfmq+tac+tcec likewise

and ablations: ``tfmq-tiar`` (TIAR, no FSC), and FSC or the cache alone on the Q-Diffusion row's own weights
(``qdiffusion+fsc``, ``qdiffusion+fsc-model``, ``qdiffusion+cache``).

Quantize times of the variants include the base's recorded time; ``tfmq+ptqd`` reports the PTQD fit only, like the
Q-Diffusion + PTQD row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import config_to_dict
from tadq.corrections.ptqd.correction import ptqd_tables
from tadq.experiments.rows import recipes
from tadq.experiments.rows.base import BaseModels, Variant, register_method
from tadq.experiments.rows.builtin import recipe_row
from tadq.experiments.rows.recipes import TFMQ_ROWS, recipes_for_row
from tadq.experiments.rows.sampler_corrections import correction_tables
from tadq.tfmq import TFMQConfig

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["LABELS", "tfmq_config"]

LABELS: dict[str, str] = {
    "tfmq": "TFMQ-DM", "tfmq-model": "TFMQ-DM, model-wide FSC", "tfmq-cache": "TFMQ-DM + FP cache",
    "tfmq-select": "TFMQ-DM + selection", "tfmq-tiar": "TIAR only (no FSC)", "qdiffusion+fsc": "Q-Diffusion + TIB FSC",
    "qdiffusion+fsc-model": "Q-Diffusion + model-wide FSC", "qdiffusion+cache": "Q-Diffusion + FP cache",
    "tfmq+ptqd": "TFMQ-DM + PTQD", "tfmq+tac": "TFMQ-DM + TAC", "tfmq-model+tac": "TFMQ-DM, model-wide FSC + TAC",
    "tfmq+tac+tcec": "TFMQ-DM + TAC + TCEC",
}


def tfmq_config(config: RunConfig) -> TFMQConfig:
    """The ``tfmq`` row's settings for a run (``recipes.tfmq_config`` of its calibration)."""
    return recipes.tfmq_config(config.calibration)


def _describe(denoiser: nn.Module) -> dict[str, Any]:
    """The TFMQ report (TIAR losses, per-feature disturbance and choices, cache bytes) kept with the cell."""
    extras: dict[str, Any] = {"tfmq": denoiser.corrections[0].report}
    if len(denoiser.corrections) > 1:  # PTQD on top: its tables join the PTQD figure
        extras["ptqd_tables"] = ptqd_tables(denoiser.corrections[-1])
    return extras


def _row(name: str) -> None:
    corrections = TFMQ_ROWS[name][2]

    @register_method(name, LABELS[name])
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        recipe = recipes_for_row(name, preset_name, config)
        settings: dict[str, Any] = {"method": name, "quant": config_to_dict(recipe.quant_config()),
                                    "tfmq": config_to_dict(recipe.method.tfmq)}
        describe = _describe
        if corrections == ("ptqd",):
            settings["ptqd"] = config_to_dict(recipe.corrections[0])
        elif corrections:  # TAC/TCEC on top of TFMQ-DM (orthogonal, stack freely)
            settings["corrections"] = [config_to_dict(c) for c in recipe.corrections]
            describe = lambda denoiser: {"correction_tables": correction_tables(denoiser)}  # noqa: E731
        return recipe_row(name, bases, config, preset_name, settings, describe, cache_dir=config.cache_dir)


for _name in TFMQ_ROWS:
    _row(_name)
