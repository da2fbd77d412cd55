"""Rows of the sampler-level corrections on the Q-Diffusion base: TAC's IBC and NER alone and together, TCEC, and
TAC + TCEC (docs/methods/composition.md), each fitted with calibration noise for the deployment sampler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import config_to_dict
from tadq.corrections.tac import TACCorrection, tac_tables
from tadq.corrections.tcec import TCECCorrection, tcec_tables
from tadq.experiments.rows.base import BaseModels, Variant, register_method
from tadq.experiments.rows.builtin import recipe_row
from tadq.experiments.rows.recipes import recipes_for_row

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["LABELS", "correction_tables"]

LABELS: dict[str, str] = {
    "ibc": "Q-Diffusion + TAC IBC", "ner": "Q-Diffusion + TAC NER", "tac": "Q-Diffusion + TAC",
    "tac-select": "Q-Diffusion + TAC (NER held-out switch)",
    "tcec": "Q-Diffusion + TCEC", "tac+tcec": "Q-Diffusion + TAC + TCEC",
}


def correction_tables(denoiser: nn.Module) -> dict[str, Any]:
    """The fitted tables of every TAC/TCEC member (JSON-ready), keyed ``"<position>:<class>"``."""
    tables: dict[str, Any] = {}
    for position, member in enumerate(getattr(denoiser, "corrections", ())):
        if isinstance(member, TACCorrection):
            tables[f"{position}:TAC"] = tac_tables(member)
        elif isinstance(member, TCECCorrection):
            tables[f"{position}:TCEC"] = {**tcec_tables(member),
                                           "selection": getattr(member, "selection_records", None)}
    return tables


def _register(name: str) -> None:
    @register_method(name, LABELS[name])
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        recipe = recipes_for_row(name, preset_name, config)  # corrections fitted with calibration noise
        settings = {"quant": config_to_dict(recipe.quant_config()), "method": name,
                    "corrections": [config_to_dict(c) for c in recipe.corrections]}
        return recipe_row(name, bases, config, preset_name, settings,
                          lambda denoiser: {"correction_tables": correction_tables(denoiser)})


for _name in LABELS:
    _register(_name)
