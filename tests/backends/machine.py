"""What this machine's int8 CPU kernels can run, as skip markers shared by the backend tests.

Without VNNI/AMX the oneDNN kernels are exact only for weight codes within ±64 (``int8_cpu_weight_bound``): 4-bit
weights run there and are tested; tests of 8-bit weights are skipped with the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

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


@functools.cache
def cpu_int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` on this CPU sums int8 products exactly. It runs oneDNN's s8·s8 GEMM, which
    without VNNI/AMX saturates pairs of products to 16 bits like the conv kernels (measured with oneDNN capped at
    AVX2 and at AVX-512 without VNNI: full-range codes off by 10⁶). The int8-cuda backend only runs on CUDA; the
    CPU stands in for it in the tests of its arithmetic."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 64), generator=generator, dtype=torch.int8)
    b = torch.randint(-128, 128, (64, 32), generator=generator, dtype=torch.int8)
    a[0], b[:, 0] = 127, 127  # the worst case: every pair of products at its largest
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def exact_int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``'s contract (int8 × int8 → int32) computed exactly, in int64."""
    return (a.long() @ b.long()).to(torch.int32)

