"""Calibration: timestep-aware data and the explicit activation-range phase."""

from tadq.calibration.data import (
    CalibrationSet,
    calibration_key,
    collect_calibration_set,
    kept_steps,
    model_fingerprint,
)
from tadq.calibration.observers import Calibrate, RangeObserver, activation_quantizers

__all__ = [
    "CalibrationSet", "collect_calibration_set", "calibration_key", "kept_steps", "Calibrate", "RangeObserver",
    "activation_quantizers", "model_fingerprint",
]
