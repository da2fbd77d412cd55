"""What this machine can run: CPU int8 instruction sets, torch's quantized engines, CUDA.

Checked before any conversion so an unavailable backend is refused with the reason, never replaced by the
float simulation.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

__all__ = ["cpu_flags", "cpu_summary", "int8_compiled_missing", "int8_cpu_missing", "int8_cuda_missing"]

INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # u8·s8 dot-product instructions oneDNN uses


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_summary() -> dict[str, object]:
    """The capability line printed beside every speed table."""
    flags = cpu_flags()
    return {
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "int8_flags": sorted(f for f in flags if f in INT8_CPU_FLAGS or f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "quantized_engines": quantized_engines(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "vnni": _torch_cpu_probe("_is_vnni_supported"),
        "amx": _torch_cpu_probe("_is_amx_tile_supported"),
        "threads": torch.get_num_threads(),
    }


def quantized_engines() -> list[str]:
    """torch's quantized CPU engines (x86, onednn, fbgemm, qnnpack) in this build."""
    return list(torch.backends.quantized.supported_engines)


def _torch_cpu_probe(name: str) -> bool | None:
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if callable(probe) else None


def int8_cpu_missing() -> str | None:
    """Why the oneDNN int8 CPU backend cannot run here, or ``None`` when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if "onednn" not in quantized_engines() or not hasattr(torch.ops.onednn, "qconv_prepack"):
        return f"this torch build has no oneDNN quantized engine (engines: {quantized_engines()})"
    has_vnni = _torch_cpu_probe("_is_vnni_supported") or _torch_cpu_probe("_is_amx_tile_supported") \
        or bool(cpu_flags() & set(INT8_CPU_FLAGS))
    if not has_vnni:
        return (f"the CPU has no int8 dot-product instructions ({', '.join(INT8_CPU_FLAGS)}); without them int8 "
                f"kernels are not faster than float (torch reports CPU capability "
                f"{torch.backends.cpu.get_cpu_capability()})")
    return None


def int8_compiled_missing() -> str | None:
    """Why the compiled int8 CPU backend cannot run here: the ``int8`` reasons, or no C++ compiler for Inductor."""
    reason = int8_cpu_missing()
    if reason is not None:
        return reason
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - any failure to find one means Inductor cannot build its kernels
        return f"torch.compile (Inductor) finds no C++ compiler to build its CPU kernels ({error})"
    if shutil.which(compiler) is None:
        return f"torch.compile (Inductor) needs the C++ compiler {compiler!r}, which is not on PATH"
    return None


def int8_cuda_missing() -> str | None:
    """Why the CUDA int8 backend cannot run here, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "CUDA is not available (no GPU, or a CPU-only torch build)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (7, 5):
        return f"the GPU (compute capability {major}.{minor}) has no int8 tensor-core GEMM used by torch._int_mm"
    return None
