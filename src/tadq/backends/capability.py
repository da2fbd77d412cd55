"""What this machine can run: CPU int8 instruction sets, torch's quantized engines, CUDA.

Checked before any conversion so an unavailable backend is refused with the reason, never replaced by the
float simulation.
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["cpu_flags", "cpu_summary", "has_onednn", "int8_compiled_missing", "int8_cpu_missing",
           "int8_cpu_weight_bound", "int8_cuda_missing", "onednn_isa_cap", "unit_scale_int8_conv",
           "unit_scale_int8_linear", "weight_bound_reason"]

INT8_CPU_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # u8·s8 dot-product instructions oneDNN uses
FULL_INT8_RANGE = 128  # |B| ≤ 128 covers every signed int8 weight code
PAIR_SATURATION_BOUND = 64  # 2·255·64 = 32640 ≤ 32767: two u8·s8 products fit a saturating int16 lane
ONEDNN_ISA_WITHOUT_DOT_PRODUCTS = ("SSE41", "AVX", "AVX2", "AVX512_CORE")  # oneDNN's names below any VNNI ISA


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text(encoding="utf-8").splitlines():
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
        "int8_exact_weight_codes": _bound_summary(),
        "onednn_max_isa": onednn_isa_cap(),
        "threads": torch.get_num_threads(),
    }


def _bound_summary() -> str:
    if not has_onednn():
        return "no oneDNN"
    bound = int8_cpu_weight_bound()
    return "full int8 range" if bound >= FULL_INT8_RANGE else f"within ±{bound}" if bound else "none"


def quantized_engines() -> list[str]:
    """torch's quantized CPU engines (x86, onednn, fbgemm, qnnpack) in this build."""
    return list(torch.backends.quantized.supported_engines)


def _torch_cpu_probe(name: str) -> bool | None:
    probe = getattr(torch.cpu, name, None)
    return bool(probe()) if callable(probe) else None


def has_onednn() -> bool:
    """Whether this torch build has oneDNN and its quantized engine (the int8 CPU kernels)."""
    return (torch.backends.mkldnn.is_available() and "onednn" in quantized_engines()
            and hasattr(torch.ops.onednn, "qconv_prepack"))


def onednn_isa_cap() -> str | None:
    """The instruction set oneDNN is capped at by the user (``ONEDNN_MAX_CPU_ISA``, or its older name
    ``DNNL_MAX_CPU_ISA``), or ``None``: a cap below VNNI makes a VNNI/AMX CPU's int8 kernels saturate like an
    AVX2 CPU's, which the refusal must say rather than blame the CPU."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:  # oneDNN reads the first one set: ONEDNN_MAX_CPU_ISA=ALL overrides any DNNL_MAX_CPU_ISA
            return None if value in ("ALL", "DEFAULT") else value
    return None


def _cpu_has_dot_products() -> bool:
    """Whether the CPU itself has int8 dot-product instructions, whatever oneDNN is capped at."""
    return bool(_torch_cpu_probe("_is_vnni_supported") or _torch_cpu_probe("_is_amx_tile_supported")
                or cpu_flags() & set(INT8_CPU_FLAGS))


def _has_dot_product_instructions() -> bool:
    if onednn_isa_cap() in ONEDNN_ISA_WITHOUT_DOT_PRODUCTS:
        return False
    return _cpu_has_dot_products()


def _no_dot_products_clause() -> str:
    """The cap is named only where it is what hides the instructions: on a CPU without them, lifting it would not
    help, so the CPU is named (as without the variable)."""
    cap = onednn_isa_cap()
    if cap in ONEDNN_ISA_WITHOUT_DOT_PRODUCTS and _cpu_has_dot_products():
        return f"oneDNN is capped at {cap} (ONEDNN_MAX_CPU_ISA), below its int8 dot-product instructions, so "
    return f"this CPU has no int8 dot-product instructions ({', '.join(INT8_CPU_FLAGS)}), so "


def unit_scale_int8_conv(weights: torch.Tensor, padding: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The oneDNN conv the ``int8`` backend calls, on prepacked int8 ``weights`` with unit scales and zero points 0
    (stride 1): uint8 codes → the int32 sum as float32, exactly when the kernel is exact."""
    ones, zeros = torch.ones(weights.shape[0]), torch.zeros(weights.shape[0], dtype=torch.int64)
    geometry = ([1, 1], [padding, padding], [1, 1])
    packed = torch.ops.onednn.qconv_prepack(weights, ones, 1.0, 0, *geometry, 1, None)
    return lambda codes: torch.ops.onednn.qconv2d_pointwise.default(codes, 1.0, 0, packed, ones, zeros, None,
                                                                     *geometry, 1, 1.0, 0, torch.float32, "none",
                                                                     [], "")


def unit_scale_int8_linear(weights: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """As ``unit_scale_int8_conv``, for the oneDNN linear: (rows, K) uint8 codes → (rows, N) sums."""
    ones, zeros = torch.ones(weights.shape[0]), torch.zeros(weights.shape[0], dtype=torch.int64)
    packed = torch.ops.onednn.qlinear_prepack(weights, None)
    return lambda rows: torch.ops.onednn.qlinear_pointwise.default(rows, 1.0, 0, packed, ones, zeros, None, 1.0, 0,
                                                                   torch.float32, "none", [], "")


def _kernel_is_exact(weight_code: int) -> bool:
    """Every activation code 255 against every weight code ``weight_code``: the largest |Σ| a kernel meets, through
    the oneDNN conv (3×3 and 1×1) and linear kernels the backend calls, compared with the exact integer sum."""
    activations = torch.full((1, 32, 3, 3), 255, dtype=torch.uint8)
    for kernel in (3, 1):
        got = unit_scale_int8_conv(torch.full((8, 32, kernel, kernel), weight_code, dtype=torch.int8), 0)(activations)
        if not torch.equal(got.double(), torch.full_like(got, 255.0 * weight_code * 32 * kernel * kernel).double()):
            return False
    got = unit_scale_int8_linear(torch.full((8, 96), weight_code, dtype=torch.int8))(
        torch.full((4, 96), 255, dtype=torch.uint8))
    return torch.equal(got.double(), torch.full_like(got, 255.0 * weight_code * 96).double())


@functools.cache
def int8_cpu_weight_bound() -> int:
    """The largest |weight code| this machine's oneDNN u8·s8 kernels sum exactly: 128, 64 or 0 (measured once).

    With int8 dot-product instructions (VNNI, AMX) every u8·s8 product goes straight into an int32 sum: exact for
    the whole int8 range. Without them (AVX2, AVX-512 without VNNI) oneDNN multiplies with ``vpmaddubsw``, which
    adds two u8·s8 products into a *saturating* 16-bit lane: measured on an AVX2-only AMD EPYC, full-range codes gave
    sums off by up to 9·10⁶, codes within ±64 (2·255·64 ≤ 32767) were exact and ±65 were not. So the bound is
    measured with the worst case through the kernels themselves rather than inferred from CPU flags; layers whose
    weight codes exceed it are refused at conversion (4-bit weights, ±15, run everywhere).
    """
    if not has_onednn() or _kernel_failure() is not None:
        return 0
    with torch.no_grad():
        if _kernel_is_exact(127) and _kernel_is_exact(-128):
            return FULL_INT8_RANGE
        if _kernel_is_exact(PAIR_SATURATION_BOUND) and _kernel_is_exact(-PAIR_SATURATION_BOUND):
            return PAIR_SATURATION_BOUND
    return 0


@functools.cache
def _kernel_failure() -> str | None:
    """The error of oneDNN's int8 kernels on a first small call, or ``None`` when they run: a build can list the
    engine and the ops on a CPU whose kernels are not implemented (e.g. another architecture), and the backend is
    then refused with that error instead of the probe raising out of a capability check."""
    try:
        with torch.no_grad():
            _kernel_is_exact(1)
    except (RuntimeError, NotImplementedError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"
    return None


def int8_cpu_missing() -> str | None:
    """Why the oneDNN int8 CPU backend cannot run here, or ``None`` when it can (for some weight codes at least:
    ``int8_cpu_weight_bound`` says which, and conversion refuses a layer beyond it)."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not has_onednn():
        return f"this torch build has no oneDNN quantized engine (engines: {quantized_engines()})"
    failure = _kernel_failure()
    if failure is not None:
        return f"this CPU's oneDNN int8 kernels do not run ({failure}; CPU capability " \
               f"{torch.backends.cpu.get_cpu_capability()})"
    if int8_cpu_weight_bound() == 0:
        return ("this CPU's oneDNN int8 kernels gave wrong sums even for weight codes within "
                f"±{PAIR_SATURATION_BOUND} (measured; CPU capability {torch.backends.cpu.get_cpu_capability()})")
    return None


def weight_bound_reason(bound: int) -> str:
    """Why weight codes beyond ``bound`` cannot run here: one sentence for a refusal."""
    instructions = "" if _has_dot_product_instructions() else _no_dot_products_clause()
    return (f"{instructions}oneDNN's u8·s8 kernels add products in pairs saturated to 16 bits and are exact only for "
            f"weight codes within ±{bound} (measured): ≤ 7-bit weight grids within that range (W4A8) run here; "
            "8-bit weights need a CPU with one of those instructions, or the 'fake' backend")


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
