"""Device and compute-dtype arguments of every public entry and command: resolved once, refused by name when this
torch cannot provide them (never replaced by a default)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["DTYPES", "check_weights_loaded", "resolve_device", "resolve_dtype", "place_model"]

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
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA device "
                             "(torch.cuda.is_available() is False); install a CUDA build of torch or use cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return resolved
    if resolved.type == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) has no MPS backend here")
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {list(DTYPES)}")
    return DTYPES[dtype]


def place_model(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``model`` itself when its parameters are on ``device`` in ``dtype``, else a moved copy (the caller's model
    is never changed)."""
    parameters = list(model.parameters())
    if all(p.device == device and p.dtype == dtype for p in parameters):
        return model
    return copy.deepcopy(model).to(device=device, dtype=dtype)
