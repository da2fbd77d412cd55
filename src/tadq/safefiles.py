"""Tensors + JSON in one safetensors file, checksummed: the only format tadq uses for state it reads back.

Checkpoints, run cells and sample tensors used to be pickles (loaded with torch's unrestricted unpickler), so a
crafted file ran code when loaded. A safetensors file holds raw tensor bytes and a JSON header; nothing in it is
executed.
``save_checked`` adds the caller's JSON metadata and a SHA-256 over the tensors (names, dtypes, shapes, bytes), so
flipped bytes are detected too; ``load_checked`` turns every kind of damage into a one-line ``ValueError`` naming
the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tadq.utils import _atomic

__all__ = ["DamagedFileError", "save_checked", "load_checked", "tensors_digest", "read_json_file",
           "require_finite", "nonfinite_count", "finite_float", "split_tensors", "join_tensors"]

META_KEY, DIGEST_KEY = "tadq", "tadq_sha256"
MAX_JSON_BYTES = 256 << 20  # configs, recipes, quantization maps: a few MiB for the largest models


class DamagedFileError(ValueError):
    """A file tadq wrote (or was told to read) is truncated, altered or of another kind."""


def tensors_digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order (independent of dict order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checked(tensors: dict[str, Tensor], meta: dict[str, Any], path: str | Path) -> None:
    """Atomically write ``tensors`` and JSON ``meta`` (sorted keys) with a checksum, byte-identical for equal input.

    Tensors are cloned, so views and tied parameters need no care from the caller.
    """
    plain = {name: value.detach().cpu().contiguous().clone() for name, value in tensors.items()}
    # one metadata key per value and sorted JSON: safetensors stores metadata in a hash map, so several keys would
    # come out in a different order in every process
    header = json.dumps({"meta": meta, "sha256": tensors_digest(plain)}, sort_keys=True)
    _atomic(Path(path), lambda tmp: save_file(plain, tmp, metadata={META_KEY: header}))


def load_checked(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) from a file written by ``save_checked``; ``what`` names the file's role in errors.

    Raises:
        FileNotFoundError: no file at ``path``.
        DamagedFileError: not a safetensors file (e.g. an old pickle), truncated, or its tensors fail the checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist" if not path.exists() else
                                f"{what} {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get(META_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for every kind of damage
        raise DamagedFileError(f"{what} {path} is damaged or not a tadq safetensors file "
                               f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); delete it") from error
    if header is None:
        raise DamagedFileError(f"{what} {path} has no tadq metadata (written by another program or an older tadq "
                               "that used pickle); delete it")
    try:
        payload = json.loads(header)
        meta, expected = payload["meta"], payload["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(f"{what} {path} has unreadable tadq metadata; delete it") from error
    if tensors_digest(tensors) != expected:
        raise DamagedFileError(f"{what} {path} fails its checksum (bytes changed after it was written); delete it")
    return tensors, meta


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """(JSON tree with ``{"__tensor__": name}`` placeholders, tensors by name) of nested dicts/lists/tensors.

    Lets states such as an optimizer's be saved with ``save_checked`` instead of pickled. Dicts are stored as
    key/value pairs, so int keys (an optimizer's parameter indices) come back as ints.
    """
    tensors: dict[str, Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, Tensor):
            tensors[path] = node
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[key, walk(value, f"{path}.{key}")] for key, value in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{path}.{index}") for index, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path or '<root>'} without pickle")

    return walk(tree, prefix), tensors


def join_tensors(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``split_tensors`` (dict keys that were ints come back as ints); ``DamagedFileError`` if a
    placeholder names a missing tensor."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict) and "__tensor__" in node:
            if node["__tensor__"] not in tensors:
                raise DamagedFileError(f"tensor {node['__tensor__']!r} is missing")
            return tensors[node["__tensor__"]]
        if isinstance(node, dict) and "__dict__" in node:
            return {key: walk(value) for key, value in node["__dict__"]}
        if isinstance(node, list):
            return [walk(value) for value in node]
        return node

    return walk(tree)


def read_json_file(path: str | Path, what: str = "file") -> Any:
    """``json.load`` whose errors name the file and the line, as one ``ValueError``.

    Only a regular file of at most ``MAX_JSON_BYTES`` is read: a config that is a link to ``/dev/zero`` or a FIFO
    would otherwise be read forever (or block), filling the memory before any error.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a folder, device or pipe); replace it with the file")
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} has {path.stat().st_size} bytes, more than any JSON file tadq reads "
                         f"({MAX_JSON_BYTES >> 20} MiB); it is not the file it should be")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (damaged?): {error.reason}") from error
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg}); fix or replace the file") from error


def require_finite(tensors: dict[str, Tensor] | Tensor, where: str) -> None:
    """Raise ``ValueError`` naming the first tensor holding NaN or Inf (cheap: one reduction per tensor)."""
    items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
    for name, tensor in items:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
            label = f"{where} {name}".strip()
            raise ValueError(f"{label} holds {kind} values; tadq cannot quantize or compare non-finite numbers")


def nonfinite_count(batch: Tensor) -> int:
    """How many items of a batch (N, ...) hold a NaN or Inf anywhere (metrics and scores refuse or flag them)."""
    return int((~torch.isfinite(batch.flatten(1)).all(dim=1)).sum())


def finite_float(value: Any) -> bool:
    """Whether ``value`` is a real, finite number (JSON loads may give anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
