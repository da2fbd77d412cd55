"""Tensors + JSON in one safetensors file, checksummed: the only format tadq uses for state it reads back.

Checkpoints, run cells and sample tensors used to be pickles (loaded with torch's unrestricted unpickler), so a
crafted file ran code when loaded. A safetensors file holds raw tensor bytes and a JSON header; nothing in it is
executed.
``save_checked`` adds the caller's JSON metadata and a SHA-256 over the tensors (names, dtypes, shapes, bytes), so
flipped bytes are detected too, and one over the metadata (files written before it was recorded are read on the
tensors' alone); ``load_checked`` turns every kind of damage into a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tadq.names import finite_float
from tadq.utils import _atomic, unique_keys

__all__ = ["DamagedFileError", "NewerVersionError", "save_checked", "save_safetensors", "load_checked",
           "tensors_digest", "read_json_file", "unique_keys", "require_finite", "nonfinite_count", "finite_float",
           "split_tensors", "join_tensors",
           "WeightFiles", "find_weight_files", "check_safetensors_file", "require_stored_parameters",
           "DIFFUSERS_WEIGHTS", "TRANSFORMERS_WEIGHTS", "diffusers_loading_options"]

META_KEY, DIGEST_KEY = "tadq", "tadq_sha256"
MAX_JSON_BYTES = 256 << 20  # configs, recipes, quantization maps: a few MiB for the largest models


class DamagedFileError(ValueError):
    """A file tadq wrote (or was told to read) is truncated, altered or of another kind."""


class NewerVersionError(ValueError):
    """A config, artefact or manifest written in a format newer than this tadq reads: upgrading tadq, not saving
    again, is the fix (``tadq verify`` exits with its own code for it)."""


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
    header = json.dumps({"meta": meta, "meta_sha256": _meta_digest(meta), "sha256": tensors_digest(plain)},
                        sort_keys=True)
    _atomic(Path(path), lambda tmp: save_file(plain, tmp, metadata={META_KEY: header}))


def save_safetensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` through a temp file of this process and a rename: a write that fails (a full disk)
    or is killed never leaves a half file under ``path``, nor one another process's write can rename away; a disk
    error is an ``OSError`` naming ``path``. For plain files other programs read (no checksum: ``save_checked``)."""
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _meta_digest(meta: Any) -> str:
    """SHA-256 of the metadata's sorted JSON: the same before saving and after loading (JSON round-trips floats
    exactly), so a changed byte inside it is found; the tensors' digest alone let a flipped digit through, e.g. a
    training checkpoint's step 2 read as 3, and the resumed run silently skipped a step."""
    # through one JSON round trip first: what load_checked hashes is the metadata as read back (int keys become
    # strings and then sort as strings, tuples become lists)
    return hashlib.sha256(json.dumps(json.loads(json.dumps(meta)), sort_keys=True).encode()).hexdigest()


def load_checked(path: str | Path, what: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) from a file written by ``save_checked``; ``what`` names the file's role in errors.

    Raises:
        FileNotFoundError: no file at ``path``.
        DamagedFileError: not a safetensors file (e.g. an old pickle), truncated, or its tensors or metadata fail
            their checksums.
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
        # a changed byte in a field name must not pass as an older file without the metadata digest
        if not set(payload) <= {"meta", "meta_sha256", "sha256"}:
            raise KeyError(sorted(payload))
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(f"{what} {path} has unreadable tadq metadata; delete it") from error
    if tensors_digest(tensors) != expected:
        raise DamagedFileError(f"{what} {path} fails its checksum (bytes changed after it was written); delete it")
    if "meta_sha256" in payload and payload["meta_sha256"] != _meta_digest(meta):
        raise DamagedFileError(f"{what} {path} fails its metadata checksum (bytes changed after it was written); "
                               "delete it")
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


def read_json_file(path: str | Path, what: str = "file", *, strict_keys: bool = False) -> Any:
    """``json.load`` whose errors name the file and the line, as one ``ValueError``.

    Only a regular file of at most ``MAX_JSON_BYTES`` is read: a config that is a link to ``/dev/zero`` or a FIFO
    would otherwise be read forever (or block), filling the memory before any error. ``strict_keys``: an object
    naming a key twice is refused (``unique_keys``) instead of keeping the last value (files a user writes).
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{what} {path} is a link to {path.readlink()}, which does not exist (a hub-cache blob that "
                         "was deleted, or a download that did not finish); download the model again")
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {path} is not a regular file (a folder, device or pipe); replace it with the file")
    if path.is_file() and path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} has {path.stat().st_size} bytes, more than any JSON file tadq reads "
                         f"({MAX_JSON_BYTES >> 20} MiB); it is not the file it should be")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {path} is not UTF-8 text (damaged?): {error.reason}") from error
    if not text.strip():
        raise ValueError(f"{what} {path} is empty ({len(text.encode())} bytes; an interrupted download or copy?); "
                         "restore the file")
    try:
        return json.loads(text, object_pairs_hook=unique_keys if strict_keys else None)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON (line {error.lineno}, column {error.colno}: "
                         f"{error.msg}); fix or replace the file") from error
    except ValueError as error:  # unique_keys
        raise ValueError(f"{what} {path}: {error}") from error


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


# -- weights of a diffusers / transformers model folder, as save_pretrained writes them ------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"  # the stem of a diffusers model's weight files
TRANSFORMERS_WEIGHTS = "model"  # ... and of a transformers model's (text encoders)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_VARIANT = r"([A-Za-z0-9_]+)"  # "fp16", "bf16", "ema"...; a shard's "-00001-of-00002" is not one


class WeightFiles(NamedTuple):
    """The safetensors files ``from_pretrained`` reads for a model folder, and the variant to pass it (``None``:
    the plain files; ``"fp16"`` for a folder that holds ``diffusion_pytorch_model.fp16.safetensors`` only)."""

    files: tuple[Path, ...]
    variant: str | None


def _weight_sets(folder: Path, stem: str) -> dict[str | None, list[Path]]:
    """variant (``None``: plain) → the single file or the shard index present for it."""
    found: dict[str | None, list[Path]] = {}
    single = re.compile(rf"{re.escape(stem)}(?:\.{_VARIANT})?\.safetensors")
    index = re.compile(rf"{re.escape(stem)}\.safetensors\.index(?:\.{_VARIANT})?\.json")
    for entry in sorted(folder.iterdir()):
        match = single.fullmatch(entry.name) or index.fullmatch(entry.name)
        if match:
            found.setdefault(match.group(1), []).append(entry)
    return found


def find_weight_files(folder: str | Path, stems: Sequence[str] = (DIFFUSERS_WEIGHTS,), *,
                      prefer: str | None = None) -> WeightFiles:
    """The safetensors weights of a model folder, each checked whole (``check_safetensors_file``) before any is
    loaded: one file, or the shards a ``*.safetensors.index.json`` lists (``save_pretrained(max_shard_size=)``),
    plain or of one variant only (``save_pretrained(variant="fp16")``, which ``from_pretrained`` finds only when
    told the variant). Plain files are preferred to a variant, as ``from_pretrained`` does without one; ``prefer``
    names the variant a pipeline loads, which ``from_pretrained`` takes where present.

    Raises:
        ValueError: no safetensors weights under ``stems`` (a pickle is named: tadq never unpickles), several
            variants and no plain files (which one is meant cannot be guessed), or an index listing a path outside
            the folder or no shard.
        DamagedFileError: a weight file is empty, truncated, a dangling link, or not safetensors.
    """
    folder = Path(folder)
    sets: dict[str | None, list[Path]] = {}
    for stem in stems:
        for variant, entries in _weight_sets(folder, stem).items():
            sets.setdefault(variant, []).extend(_read_by_from_pretrained(entries, stem))
    variant: str | None = None
    if prefer is not None and prefer in sets:
        variant = prefer
    elif None not in sets:
        if not sets:
            raise ValueError(_no_weights_message(folder, stems))
        if len(sets) > 1:
            names = sorted(entry.name for entries in sets.values() for entry in entries)
            raise ValueError(f"{folder} holds weights of several variants ({', '.join(names)}) and no plain "
                             f"{stems[0]}.safetensors: which one is meant cannot be guessed; keep one variant")
        (variant,) = sets
    files: list[Path] = []
    for entry in sets[variant]:
        files.extend(_index_shards(entry) if entry.name.endswith(".json") else [entry])
    for file in files:
        check_safetensors_file(file)
    return WeightFiles(tuple(files), variant)


def _read_by_from_pretrained(entries: list[Path], stem: str) -> list[Path]:
    """Of a single weight file and a shard index of one stem and variant, the one ``from_pretrained`` reads:
    diffusers the shards, transformers the single file. Checking both let a parameter missing from the shards
    pass, since the unread single file held it, and diffusers then filled it with random values."""
    index = [entry for entry in entries if entry.name.endswith(".json")]
    single = [entry for entry in entries if not entry.name.endswith(".json")]
    if not (index and single):
        return entries
    return index if stem == DIFFUSERS_WEIGHTS else single


def _no_weights_message(folder: Path, stems: Sequence[str]) -> str:
    expected = " or ".join(f"{stem}.safetensors" for stem in stems)
    names = sorted(entry.name for entry in folder.iterdir() if entry.name != "config.json") if folder.is_dir() else []
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES) or ".bin.index" in name]
    message = (f"{folder} holds no safetensors weights ({expected}, or a sharded *.safetensors.index.json); found "
               f"{names or 'no weight file'}")
    if pickles:
        kind = "is a pickle, which runs" if len(pickles) == 1 else "are pickles, which run"
        message += (f": {', '.join(pickles[:3])} {kind} code when loaded, and tadq reads safetensors only, never a "
                    "pickle. Re-save the model with save_pretrained(..., safe_serialization=True)")
    return message


def _index_shards(index_file: Path) -> list[Path]:
    """The shard files a ``*.safetensors.index.json`` names, each a plain file name inside its folder."""
    index = read_json_file(index_file, "weights index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(name, str) for name in weight_map.values()):
        raise DamagedFileError(f"{index_file} is damaged: no weight_map object of tensor → shard file names")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise DamagedFileError(f"{index_file} lists the shard {name!r}, which is not a file name inside "
                                   f"{index_file.parent}; it is not a save_pretrained index")
        shard = index_file.parent / name
        if not shard.is_file() and not shard.is_symlink():
            raise DamagedFileError(f"{shard} is missing: {index_file.name} lists it as one of {len(names)} shards "
                                   "(an interrupted download or copy?)")
    return [index_file.parent / name for name in names]


# bits per element of the safetensors dtypes (a dtype not listed here is left to safetensors to judge)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(header: Any) -> None:
    """Raise ``ValueError`` saying how a safetensors header contradicts itself: a tensor whose dtype and shape
    take another number of bytes than its offsets span, offsets that overlap or leave a gap, a key named twice
    (``unique_keys``), metadata that is not strings. safetensors refuses such a file too, but diffusers reports
    that only as "Unable to load weights from checkpoint file", after the other files were read."""
    if not isinstance(header, dict):
        raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(value, str) for value in metadata.values())):
        raise ValueError("its __metadata__ is not an object of strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(shape, list)
                and all(_integer(size) and size >= 0 for size in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(_integer(offset) for offset in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name!r} is not described by a dtype, a shape of sizes >= 0 and two data "
                             f"offsets (got {str(entry)[:120]})")
        bits = _DTYPE_BITS.get(entry["dtype"])
        span = offsets[1] - offsets[0]
        if bits is not None and math.prod(shape) * bits != span * 8:
            raise ValueError(f"tensor {name!r} is {entry['dtype']} {shape}, {math.prod(shape) * bits / 8:g} bytes, "
                             f"but its offsets span {span} bytes")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise ValueError(f"tensor {name!r} starts at data byte {start}, not {end}: tensors overlap or leave a gap")
        end = stop


def check_safetensors_file(file: str | Path) -> None:
    """Raise ``DamagedFileError`` unless ``file`` is a whole safetensors file: its header readable and consistent
    (``_check_header``), and the file as long as the header's offsets say. Reads the header only, so it is cheap
    on gigabytes; it catches what an interrupted download leaves (an empty or truncated file, a hub-cache link to
    a blob that is gone) and a header edited by hand or by a broken converter."""
    file = Path(file)
    if file.is_symlink() and not file.exists():
        raise DamagedFileError(f"{file} is a link to {file.readlink()}, which does not exist (a hub-cache blob that "
                               "was deleted, or a download that did not finish); download the model again")
    if not file.is_file():
        raise DamagedFileError(f"{file} is not a regular file (a folder, device or pipe)")
    size = file.stat().st_size
    if size == 0:
        raise DamagedFileError(f"{file} is damaged: an empty file (0 bytes); download or save it again")
    try:
        with open(file, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_length <= 0 or 8 + header_length > size:
                raise ValueError(f"header length {header_length} does not fit a {size}-byte file")
            header = json.loads(handle.read(header_length), object_pairs_hook=unique_keys)
        _check_header(header)
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{file} is damaged: not a safetensors file ({error})") from error
    expected = 8 + header_length + max(ends, default=0)
    if expected != size:
        raise DamagedFileError(f"{file} is damaged: {size} bytes, its header describes {expected} (truncated or "
                               "replaced); download or save it again")


def _integer_dtype(kind: str) -> bool:
    """Whether a safetensors dtype name is an integer or boolean one (I8..I64, U8..U64, BOOL; not BF16 or F8_*)."""
    return kind == "BOOL" or re.fullmatch(r"[IU]\d+", kind) is not None


def _accelerate_installed() -> bool:
    return importlib.util.find_spec("accelerate") is not None


# diffusers' note that a config key its class's __init__ does not take "will be ignored"; tadq reads one such key
# (a Flux transformer's registered latent side, adapters/mmdit.py), so for it the note only misleads
_FLUX_SAMPLE_SIZE_NOTE = re.compile(r"^The config attributes \{'sample_size': [^,{}]+\} were passed to "
                                    r"FluxTransformer2DModel, but are not expected and will be ignored")


class _FluxSampleSizeNoteFilter(logging.Filter):
    """Drops that note for a Flux config whose only extra key is ``sample_size``; any other key still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _FLUX_SAMPLE_SIZE_NOTE.match(record.getMessage()) is None


def _quiet_flux_sample_size_note() -> None:
    target = logging.getLogger("diffusers.configuration_utils")
    if not any(isinstance(existing, _FluxSampleSizeNoteFilter) for existing in target.filters):
        target.addFilter(_FluxSampleSizeNoteFilter())


def diffusers_loading_options() -> dict[str, Any]:
    """``low_cpu_mem_usage`` for every diffusers ``from_pretrained`` tadq makes (FP model folders, pipelines, VAEs),
    one rule: with accelerate, diffusers' default (the model built on the meta device and handed the file's tensors,
    no second copy of the weights); without it, the plain loading diffusers falls back to, asked for so that it does
    not print its five-line "pip install accelerate" advice on every load. Either way each parameter holds the
    file's values, and a parameter the files lack is refused by ``require_stored_parameters``. Also quiets diffusers'
    "will be ignored" note for the ``sample_size`` tadq asks Flux users to register (and reads)."""
    _quiet_flux_sample_size_note()
    return {} if _accelerate_installed() else {"low_cpu_mem_usage": False}


def require_stored_parameters(model: torch.nn.Module, files: Sequence[Path], where: str) -> None:
    """Raise ``DamagedFileError`` when a parameter of ``model`` is in none of its weight ``files``: diffusers
    fills such a parameter with its random initialization and only logs a warning, so a file missing tensors (an
    incomplete conversion, an edited config) gave a partly random model that tadq then quantized. Buffers are not
    required (diffusers recomputes positional tables that some checkpoints leave out). Old attention key names are
    renamed first, as diffusers renames them while loading (google/ddpm-* checkpoints use them).

    A float parameter stored as integers or booleans is refused too: ``load_state_dict`` casts int64 values into a
    float32 weight without a word (tadq's own codes, or another program's quantized file, read as weights).

    So is a stored tensor the model has no place for: diffusers drops it with a warning, so a config that lost a
    key the weights need (PixArt without ``caption_channels``, a class-conditional UNet without
    ``num_class_embeds``) built another model, which ignored the caption projection or every label, and tadq
    quantized that. A tensor naming one of the model's buffers (a positional table an older version saved and the
    current one recomputes) and the class's own ``_keys_to_ignore_on_load_unexpected`` are not refused, as diffusers
    does not warn about them."""
    stored: dict[str, str] = {}  # name → safetensors dtype ("F32", "I64"...), from the headers
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update({name: handle.get_slice(name).get_dtype() for name in handle.keys()})
    rename = getattr(model, "_fix_state_dict_keys_on_load", None)  # diffusers' renaming of old attention keys
    if callable(rename):  # (query/key/value/proj_attn → to_q/to_k/to_v/to_out.0), as it does when loading
        stored = rename(stored) or stored
    aliases: dict[int, list[str]] = {}  # a tied parameter is stored once, under any one of its names
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(name in stored for name in names)]
    if missing:
        raise DamagedFileError(f"{where}: its weights lack {len(missing)} of the {type(model).__name__}'s parameters "
                               f"(e.g. {', '.join(missing[:3])}), which diffusers would fill with random values; "
                               "the weight files are incomplete or belong to another config.json")
    expected = set(model.state_dict()) | {name for name, _ in model.named_buffers(remove_duplicate=False)}
    ignored = [re.compile(pattern) for pattern in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    unexpected = sorted(name for name in stored
                        if name not in expected and not any(pattern.search(name) for pattern in ignored))
    if unexpected:
        count = f"{len(unexpected)} tensor" + ("s" if len(unexpected) > 1 else "")
        raise DamagedFileError(f"{where}: its weights hold {count} the {type(model).__name__} built from its "
                               f"config.json has no place for ({', '.join(unexpected[:3])}"
                               f"{', ...' if len(unexpected) > 3 else ''}), which diffusers would drop with a "
                               "warning, running another model than the weights'; the config.json is edited or "
                               "belongs to other weights: restore it")
    for name, parameter in model.named_parameters():
        kind = stored.get(name)
        if parameter.is_floating_point() and kind is not None and _integer_dtype(kind):
            raise DamagedFileError(f"{where}: its weights store the float parameter {name} as {kind} (integers or "
                                   "booleans), which loading would cast to floats without a word; these are not the "
                                   "model's float weights (a quantized or converted file?): restore them")
