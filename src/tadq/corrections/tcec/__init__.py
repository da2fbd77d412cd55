"""TCEC (Liu et al.): closed-form error propagation through the sampler and its per-step compensation."""

from tadq.corrections.tcec.config import TCECConfig
from tadq.corrections.tcec.correction import TCECCorrection, tcec_tables

__all__ = ["TCECConfig", "TCECCorrection", "tcec_tables"]
