"""Rows of ``tadq run``: ``register_method`` plus every built-in method (importing this package registers them)."""

from tadq.experiments.rows import (
    best,  # noqa: F401  (registers best: each preset's measured best row, resolved when a row is built)
    builtin,  # noqa: F401  (registers naive, qdiffusion, ptqd)
    peers,  # noqa: F401  (registers quanto, modelopt-*, torchao-*; the tools are imported lazily)
    sampler_corrections,  # noqa: F401  (registers ibc, ner, tac, tcec, tac+tcec)
    svdquant,  # noqa: F401  (registers svdquant and svdquant+tac / +tcec / +ptqd on its base)
    tfmq,  # noqa: F401  (registers the TFMQ-DM rows: tfmq, tfmq-cache, tfmq+ptqd, ablations)
)
from tadq.experiments.rows.base import (
    BaseModels,
    MethodBuilder,
    Variant,
    method_label,
    method_names,
    register_method,
    row_for,
)
from tadq.experiments.rows.best import BEST_ROWS, best_row, resolve_row
from tadq.experiments.rows.builtin import method_config
from tadq.experiments.rows.peers import missing_peer
from tadq.experiments.rows.recipes import recipes_for_row, shipped_recipes

__all__ = ["BEST_ROWS", "BaseModels", "MethodBuilder", "Variant", "best_row", "method_config", "method_label",
    "method_names", "missing_peer", "recipes_for_row", "register_method", "resolve_row", "row_for", "shipped_recipes"]
