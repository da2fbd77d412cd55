"""Timestep-aware corrections on one stackable interface (docs/architecture.md, docs/methods/composition.md).

Importing this package registers the built-in corrections (one sub-package per method).
"""

from tadq.corrections.base import (
    Correction,
    CorrectionConfig,
    FitContext,
    HookedDenoiser,
    PairRequest,
    TableKey,
    TrajectoryPair,
    collect_trajectory_pair,
)
from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.corrections.ptqd import PTQDConfig, PTQDCorrection  # registers PTQD
from tadq.corrections.stack import CorrectionStack, fit_stack
from tadq.corrections.tac import TACConfig, TACCorrection  # registers TAC
from tadq.corrections.tcec import TCECConfig, TCECCorrection  # registers TCEC

__all__ = [
    "Correction", "CorrectionConfig", "CorrectionStack", "FPTrajectoryCache", "FitContext", "HookedDenoiser",
    "PTQDConfig", "PTQDCorrection", "PairRequest", "TACConfig", "TACCorrection", "TCECConfig", "TCECCorrection",
    "TableKey", "TrajectoryPair", "collect_trajectory_pair", "fit_stack",
]
