"""SVDQuant on tadq: smoothing, a low-rank floating-point branch and a quantized residual (docs/methods/svdquant.md).

``SVDQuantMethod`` is registered as a ``Recipe.method`` by ``tadq.methods``; the layers and their pieces live in
``tadq.quant`` (``transformed``, ``smoothing``, ``lowrank``, ``rotation``, ``granularity``).
"""

from tadq.svdquant.method import LayerFit, SVDQuantMethod, apply_svdquant, transformed_layers

__all__ = ["SVDQuantMethod", "LayerFit", "apply_svdquant", "transformed_layers"]
