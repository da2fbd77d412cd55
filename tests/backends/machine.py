"""What this machine's int8 CPU kernels can run, as skip markers shared by the backend tests.

Without VNNI/AMX the oneDNN kernels are exact only for weight codes within ±64 (``int8_cpu_weight_bound``): 4-bit
weights run there and are tested; tests of 8-bit weights are skipped with the reason.
"""

from __future__ import annotations

import pytest

from tadq.backends import capability


def _full_range_reason(reason: str | None) -> str | None:
    if reason is not None:
        return reason
    bound = capability.int8_cpu_weight_bound()
    return f"8-bit weights: {capability.weight_bound_reason(bound)}" if bound < capability.FULL_INT8_RANGE else None


def int8_reason(full_range: bool = False) -> str | None:
    """Why the int8 CPU backend cannot run the test here (``full_range``: a test with 8-bit weight codes)."""
    reason = capability.int8_cpu_missing()
    return _full_range_reason(reason) if full_range else reason


def compiled_reason(full_range: bool = False) -> str | None:
    """As ``int8_reason``, for the int8-compiled backend."""
    reason = capability.int8_compiled_missing()
    return _full_range_reason(reason) if full_range else reason


needs_int8_cpu = pytest.mark.skipif(int8_reason() is not None, reason=f"int8 CPU backend: {int8_reason()}")
needs_int8_w8 = pytest.mark.skipif(int8_reason(True) is not None, reason=f"int8 CPU backend: {int8_reason(True)}")
needs_compiled = pytest.mark.skipif(compiled_reason() is not None, reason=f"int8-compiled: {compiled_reason()}")
needs_compiled_w8 = pytest.mark.skipif(compiled_reason(True) is not None,
                                       reason=f"int8-compiled: {compiled_reason(True)}")
