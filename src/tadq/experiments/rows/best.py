"""The ``best`` row of ``tadq run``: at each preset, the row measured best on the shipped digits model (README and
docs/results/digits.md).

``tadq run --methods naive,best`` is the headline job (``make run``): the naive-PTQ baseline against the best recipe
of every preset. ``best`` is not a method of its own: it delegates to the measured row, so its cell, label and
settings are that row's (a ``best`` cell is reused by a run of the named row in the same folder, and vice versa).

    W8A8         tfmq-model+tac TFMQ-DM with model-wide finite-set calibration + TAC (on the default GPTQ base,
                                paired against Q-Diffusion + TAC from the same noise: digits +2.12 ± 0.58 dB at 256
                                samples, photos +1.82 ± 0.62 dB at 64; docs/results/digits.md "More on the headline")
    W4A8         tac            Q-Diffusion + TAC (digits 45.10 vs Q-Diffusion's 42.93 dB; TFMQ-DM + TAC is level
                                with it there, −0.18 ± 0.58 dB, and costs more)
    W4A4         svdquant+tac   SVDQuant + TAC (31.6 dB vs 21.0 for the best Q-Diffusion-based W4A4 row)
    W8A8-WSYM    tfmq-model+tac W8A8's row on the symmetric-weight grid (paired against Q-Diffusion + TAC: digits
                                +2.99 ± 0.57 dB, DiT +2.08 ± 0.38, 256 samples each; docs/backends.md "Symmetric 8-bit
                                weights")

Other presets have no measured best and are refused before any work (``RunConfig`` checks it).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tadq.experiments.rows.base import BaseModels, Variant, register_method, row_for
from tadq.experiments.rows.recipes import default_run_recipe
from tadq.recipe import Recipe

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["BEST", "BEST_ROWS", "best_recipes", "best_row", "resolve_row"]

BEST = "best"
# preset → the row measured best there on the shipped digits model (docs/results/digits.md "Results on the shipped
# model" and "W4A4 that holds", README "Benchmarks")
BEST_ROWS: dict[str, str] = {"W8A8": "tfmq-model+tac", "W4A8": "tac", "W4A4": "svdquant+tac",
                             "W8A8-WSYM": "tfmq-model+tac"}  # W8A8's row on the symmetric grid (docs/backends.md)


def best_recipes() -> dict[str, Recipe]:
    """File name → recipe of the ``best`` row at each preset under ``tadq run``'s defaults today (GPTQ base, first
    and last layers in float, DDIM 50): ``recipes/best-<preset>.json``, so ``tadq quantize MODEL --recipe`` builds
    the headline's best rows (``make run``)."""
    recipes = {}
    for preset_name, row in BEST_ROWS.items():
        recipe = dataclasses.replace(default_run_recipe(row, preset_name), name=f"best-{preset_name}")
        recipes[f"{recipe.name}.json"] = recipe
    return recipes


def best_row(preset_name: str) -> str:
    """The row ``best`` stands for at ``preset_name``; ``ValueError`` for a preset without a measured best."""
    key = preset_name.upper()
    if key not in BEST_ROWS:
        raise ValueError(f"row {BEST!r} has no measured best recipe at {preset_name}; it is defined at "
                         f"{', '.join(BEST_ROWS)} (name the rows to compare there with --methods)")
    return BEST_ROWS[key]


def resolve_row(method: str, preset_name: str) -> str:
    """The row actually built for (``method``, ``preset_name``): ``best`` resolved, every other row unchanged."""
    return best_row(preset_name) if method == BEST else method


@register_method(BEST, "best recipe")
def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
    return row_for(best_row(preset_name), bases, config, preset_name)
