"""Rows of the sampler-level corrections on the Q-Diffusion base: TAC's IBC and NER alone and together, TCEC, and
TAC + TCEC (docs/methods/composition.md), each fitted with calibration noise for the deployment sampler."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import config_to_dict
from tadq.corrections import CorrectionConfig, TACConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.corrections.tac import TACCorrection, tac_tables
from tadq.corrections.tcec import TCECCorrection, tcec_tables
from tadq.experiments.rows.base import BaseModels, Variant, method_label, register_method
from tadq.experiments.rows.builtin import method_config

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["correction_tables", "stacked_row"]

STACKS: dict[str, tuple[str, Callable[[int], list[CorrectionConfig]]]] = {
    "ibc": ("Q-Diffusion + TAC IBC", lambda seed: [TACConfig(ner=False, seed=seed)]),
    "ner": ("Q-Diffusion + TAC NER", lambda seed: [TACConfig(ibc=False, seed=seed)]),
    "tac": ("Q-Diffusion + TAC", lambda seed: [TACConfig(seed=seed)]),
    "tcec": ("Q-Diffusion + TCEC", lambda seed: [TCECConfig(seed=seed)]),
    "tac+tcec": ("Q-Diffusion + TAC + TCEC", lambda seed: [TACConfig(seed=seed), TCECConfig(seed=seed)]),
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


def stacked_row(name: str, label: str, base: Callable[[], nn.Module], base_settings: dict[str, Any], bits: str,
                configs: Sequence[CorrectionConfig], bases: BaseModels, config: RunConfig) -> Variant:
    """A row of ``configs`` fitted on the model ``base()`` returns; the fit time is kept with the cell."""
    timing: dict[str, float] = {}

    def build() -> nn.Module:
        qmodel = base()
        t0 = time.perf_counter()
        fitted = fit_corrections(qmodel, bases.model, bases.scheduler, config.sampler, configs)
        timing["correction_fit_s"] = time.perf_counter() - t0
        return fitted

    def describe(denoiser: nn.Module) -> dict[str, Any]:
        return {"correction_tables": correction_tables(denoiser), **timing}

    settings = {**base_settings, "method": name, "corrections": [config_to_dict(c) for c in configs]}
    return Variant(label, bits, build, settings, describe)


def _register(name: str) -> None:
    label, make = STACKS[name]

    @register_method(name, label)
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        base_config = method_config("qdiffusion", preset_name, config)
        configs = make(config.calibration.seed)  # calibration noise, disjoint from the evaluation seed
        return stacked_row(name, method_label(name), lambda: bases.get(base_config),
                           {"quant": config_to_dict(base_config)}, base_config.label, configs, bases, config)


for _name in STACKS:
    _register(_name)

