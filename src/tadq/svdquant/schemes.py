"""The schemes of tadq's SVDQuant recipe at a bit-width preset (docs/methods/svdquant.md).

The W4A4 ablation chose the defaults: a rank-4 floating-point branch split off the smoothed weight, the input
smoothed per channel (strength searched per layer by ``SVDQuantMethod``), activations quantized dynamically per
group of 8 channels, no rotation, weights per output channel as in the preset. ``rank=0`` keeps only smoothing and
the per-group activations (the ``smoothquant`` base of ``tadq recipe``).

Both ``tadq run``'s SVDQuant rows (``tadq.experiments.rows.recipes``) and ``tadq recipe``'s SVDQuant bases
(``tadq.search.space``) build their schemes here, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses

from tadq.quant.qscheme import QScheme, preset

__all__ = ["SVDQUANT_RANK", "SVDQUANT_GROUP", "svdquant_schemes"]

SVDQUANT_RANK = 4
"""Rank of the floating-point branch (capped per layer at half of min(out, K): ``tadq.quant.lowrank``)."""
SVDQUANT_GROUP = 8
"""Channels per dynamic activation group."""


def svdquant_schemes(preset_name: str, rank: int = SVDQUANT_RANK, group_size: int = SVDQUANT_GROUP
                     ) -> tuple[QScheme, QScheme]:
    """(weights, activations) at ``preset_name``'s bits: the preset's weight scheme with a rank-``rank`` branch
    (0: none), its activation scheme quantized per group of ``group_size`` channels (dynamic) after smoothing.

    A weight-only preset (activations off) keeps its activations off, smoothing still on (it acts on the weights).
    """
    weights, activations = preset(preset_name)
    if activations.fp8:
        raise ValueError(f"SVDQuant quantizes activations dynamically per group of channels, which has no fp8 form "
                         f"here; {preset_name}'s {activations.format} activations are static per tensor: use an "
                         "integer preset (W4A8, W8A8) for SVDQuant")
    weights = dataclasses.replace(weights, lowrank_rank=rank)
    if activations.enabled:
        activations = dataclasses.replace(activations, granularity="per_group", group_size=group_size)
    return weights, dataclasses.replace(activations, smoothing=True)
