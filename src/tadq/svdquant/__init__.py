"""SVDQuant on tadq: smoothing, a low-rank floating-point branch and a quantized residual (docs/methods/svdquant.md).

``SVDQuantMethod`` is registered as a ``Recipe.method`` by ``tadq.methods``; the layers and their pieces live in
``tadq.quant`` (``transformed``, ``smoothing``, ``lowrank``, ``rotation``, ``granularity``); ``svdquant_schemes``
gives the recipe's schemes at a preset (shared by ``tadq run``'s rows and ``tadq recipe``'s bases).
"""

from tadq.svdquant.method import LayerFit, SVDQuantMethod, apply_svdquant, transformed_layers
from tadq.svdquant.schemes import SVDQUANT_GROUP, SVDQUANT_RANK, svdquant_schemes

__all__ = ["SVDQuantMethod", "LayerFit", "apply_svdquant", "transformed_layers", "SVDQUANT_RANK", "SVDQUANT_GROUP",
           "svdquant_schemes"]
