"""TAC-Diffusion (Yao et al., ECCV 2024): per-step input bias correction and noise estimation reconstruction."""

from tadq.corrections.tac.config import TACConfig
from tadq.corrections.tac.correction import TACCorrection, tac_tables

__all__ = ["TACConfig", "TACCorrection", "tac_tables"]
