"""Device and compute-dtype arguments of every public entry and command: resolved once, refused by name when this
torch cannot provide them (never replaced by a default)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn

from tadq.names import check_dtype_name

__all__ = ["DTYPES", "check_weights_loaded", "float32_default", "model_placement", "resolve_device", "resolve_dtype",
           "place_model", "same_device", "table_device", "wide_dtype"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_weights_loaded(model: nn.Module, where: str) -> None:
    """Refuse a model whose weights are on the ``meta`` device (built under ``torch.device("meta")`` or with
    ``init_empty_weights`` and never loaded): it holds no values, and its first forward would fail deep in a
    sampler step rather than here."""
    empty = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if empty:
        raise ValueError(f"{where}: {len(empty)} weight(s) of this {type(model).__name__} are on the 'meta' device "
                         f"(e.g. {empty[0]}), i.e. not loaded; load its weights (from_pretrained, or to_empty() then "
                         "load_state_dict) before quantizing or sampling it")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a ``torch.device``; ``ValueError`` naming the device when this
    torch build or machine does not have it (``None`` → ``cpu``)."""
    if device is None:
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cpu":
        if resolved.index not in (None, 0):  # torch accepts "cpu:1" and runs on the one CPU device anyway
            raise ValueError(f"device {str(device)!r}: the CPU has no device index; use cpu")
        return torch.device("cpu")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA device "
                             "(torch.cuda.is_available() is False); install a CUDA build of torch or use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        # "cuda" is the current device: named by its index, as the tensors placed there report theirs (a model
        # already on cuda:0 compared unequal to "cuda" and was copied whole on every call)
        return resolved if resolved.index is not None else torch.device("cuda", torch.cuda.current_device())
    if resolved.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) has no MPS backend here")
        if resolved.index not in (None, 0):  # torch accepts "mps:1" and fails at the first tensor moved there
            raise ValueError(f"device {str(device)!r}: a Mac has one MPS device; use mps")
        return resolved
    raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or mps")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (a name or a ``torch.dtype``); ``None`` → float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {list(DTYPES)}")
        return dtype
    check_dtype_name(dtype)
    return DTYPES[dtype]


def wide_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of tadq's wide accumulations (Hessians, SVDs, least-squares solves, correction fits) for tensors
    on ``device``: float64, except on MPS, which has no float64 (every float64 tensor there raised), where it is
    float32. The one rule every such site follows, so CPU and CUDA numbers stay those of the float64 maths."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def table_device(device: torch.device | str) -> torch.device:
    """Where a float64 table (a correction's saved per-step tables) lives when its module moves to ``device``:
    there, or on the CPU where the device cannot hold float64 (``wide_dtype``); each step then moves the one row
    it uses, cast to the sample's dtype."""
    device = torch.device(device)
    return device if wide_dtype(device) == torch.float64 else torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one: an index-less ``cuda``/``mps`` is the current one of its type (tensors always
    report an index there), ``cpu:0`` is ``cpu``."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu" or a.index == b.index:
        return True
    if a.type == "cuda" and torch.cuda.is_available():
        current = torch.cuda.current_device()
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.type == "mps"  # one MPS device


def model_placement(model: nn.Module, where: str, *, device: bool = True, dtype: bool = True
                    ) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) of ``model``'s first floating parameter (``None`` without any), refused when the parameters
    disagree on the device (``device``: the caller follows the model's) or the dtype (``dtype``): a model split
    over devices or dtypes has no one place for the sampler's states, and which part ``device=None``/``dtype=None``
    should follow is not ours to guess."""
    floating = [p for p in model.parameters() if p.is_floating_point()]
    if not floating:
        return None
    devices = sorted({str(p.device) for p in floating})
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in floating})
    if device and len(devices) > 1:
        raise ValueError(f"{where}: the parameters of this {type(model).__name__} are on several devices "
                         f"({', '.join(devices)}); pass device= to run all of it on one")
    if dtype and len(dtypes) > 1:
        raise ValueError(f"{where}: the parameters of this {type(model).__name__} have several dtypes "
                         f"({', '.join(dtypes)}); pass dtype= to run all of it in one")
    return floating[0].device, floating[0].dtype


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when its parameters are on ``device`` and the floating ones in ``dtype`` (integer ones
    keep theirs under ``.to``, so they asked for a copy on every call), else a moved copy (the caller's model is
    never changed)."""
    parameters = list(model.parameters())
    if all(same_device(p.device, device) and (p.dtype == dtype or not p.is_floating_point()) for p in parameters):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)


@contextlib.contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype float32 inside the block, the caller's back after it. tadq's own tensors (noise,
    quantizer ranges, step coefficients, a rebuilt model's weights) are float32 by design; under a caller's
    ``torch.set_default_dtype(torch.float64)`` they were drawn or built in float64: other samples from the same
    seed, quantizers whose float64 ranges could not be saved, an artefact that would not load."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
