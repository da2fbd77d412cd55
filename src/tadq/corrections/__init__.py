"""Timestep-aware corrections on one stackable interface (architecture.md §5, methods.md §7).

Importing this package registers the built-in corrections (one sub-package per method).
"""

from tadq.corrections.base import (
    Correction,
    CorrectionConfig,
    HookedDenoiser,
    PairRequest,
    TableKey,
    TrajectoryPair,
    collect_trajectory_pair,
)
from tadq.corrections.ptqd import PTQDConfig, PTQDCorrection  # registers PTQD
from tadq.corrections.stack import CorrectionStack, fit_stack

__all__ = [
    "Correction", "CorrectionConfig", "CorrectionStack", "HookedDenoiser", "PTQDConfig", "PTQDCorrection",
    "PairRequest", "TableKey", "TrajectoryPair", "collect_trajectory_pair", "fit_stack",
]
