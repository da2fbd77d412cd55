"""TFMQ-DM (Huang et al., CVPR 2024) and its journal extension *Temporal Feature Matters* (docs/methods/tfmq.md).

Importing this package registers ``TFMQConfig`` → ``TFMQCorrection`` with ``tadq.registry``. Entry points:
``quantize_tfmq`` (the whole method on tadq's base quantizer) and ``apply_tfmq`` (FSC and maintenance variants
of an already reconstructed TFMQ model). See ``README.md`` in this folder.
"""

from tadq.tfmq.config import TFMQConfig, tfmq_tag
from tadq.tfmq.correction import TFMQCorrection
from tadq.tfmq.method import TFMQMethod
from tadq.tfmq.pipeline import apply_tfmq, deployment_grid, quantize_tfmq, temporal_features_per_step
from tadq.tfmq.tib import TemporalFeature, TemporalInformationBlock, grid_inputs

__all__ = [
    "TFMQConfig", "TFMQCorrection", "TFMQMethod", "TemporalFeature", "TemporalInformationBlock", "apply_tfmq",
    "deployment_grid",
    "grid_inputs", "quantize_tfmq", "temporal_features_per_step", "tfmq_tag",
]
