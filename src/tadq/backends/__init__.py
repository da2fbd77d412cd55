"""Execution backends: run a calibrated tadq model as a float simulation (``fake``) or with integer kernels.

``to_backend(qmodel, "int8")`` converts every quantized conv/linear to a oneDNN int8 kernel using the quantizer's
exact scales and zero points; ``tadq.load(path, backend="int8")`` does the same while loading. See
docs/backends.md for the kernel choice, what stays in float, and measured speed.
"""

from tadq.backends.capability import cpu_summary, int8_compiled_missing, int8_cpu_missing, int8_cuda_missing
from tadq.backends.registry import (
    BACKENDS,
    Backend,
    BackendUnavailableError,
    IntegerDenoiser,
    check_activation_format,
    check_backend,
    check_config,
    check_layer_transforms,
    check_placement,
    check_weight_grid,
    held_weight_bytes,
    to_backend,
)

__all__ = [
    "BACKENDS", "Backend", "BackendUnavailableError", "IntegerDenoiser", "check_activation_format", "check_backend",
    "check_config", "check_layer_transforms", "check_placement", "check_weight_grid", "cpu_summary",
    "held_weight_bytes", "int8_compiled_missing", "int8_cpu_missing", "int8_cuda_missing", "to_backend",
]
