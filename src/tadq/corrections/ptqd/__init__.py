"""PTQD (He et al., NeurIPS 2023): correlated-noise, bias and variance-schedule corrections (docs/methods/ptqd.md).

``experiment`` (``fit_ptqd``), ``mixed_precision`` and ``plots`` are imported explicitly: they depend on
``tadq.denoiser``, which imports this package.
"""

from tadq.corrections.ptqd.config import PTQDConfig
from tadq.corrections.ptqd.correction import PTQDCorrection, ptqd_tables, vsc_report

__all__ = ["PTQDConfig", "PTQDCorrection", "ptqd_tables", "vsc_report"]
