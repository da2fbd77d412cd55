"""The on-disk layout of a sharded run: ``manifest.json``, ``chunks/{start:07d}-{stop:07d}.safetensors``,
``samples.safetensors`` (tensors plus JSON metadata with a checksum: nothing read back is unpickled).

Every chunk is written atomically (temp file, then rename), so a file that exists is complete and a killed run
resumes from the chunks on disk. Every chunk carries the run key it was made with, and nothing is reused without
comparing it: chunks of another configuration raise ``StaleRunError`` and are never mixed into the output.
All ranks must see the same ``out_dir`` (a shared filesystem when the job spans nodes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tadq.distributed.key import key_differences
from tadq.distributed.shards import CHUNK_SUFFIX, ChunkRange, chunk_ranges
from tadq.safefiles import load_checked, read_json_file, save_checked
from tadq.utils import atomic_write_json, remove_stale_temp_files

__all__ = [
    "CHUNK_DIR", "MANIFEST_FORMAT", "MANIFEST_NAME", "METRICS_NAME", "SAMPLES_NAME", "ShardedRun", "StaleRunError",
    "check_manifest", "chunk_path", "load_chunk", "pending_chunks", "read_manifest", "remove_partial_files",
    "save_chunk", "write_manifest",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tadq-sharded-samples"
CHUNK_DIR = "chunks"
SAMPLES_NAME = "samples.safetensors"
METRICS_NAME = "metrics.json"  # written by ``tadq sample-sharded`` once a run is measured


class StaleRunError(ValueError):
    """``out_dir`` holds a manifest or chunks made with another configuration (model, seed, sampler, batching)."""


def _stale(where: str, differences: list[str]) -> StaleRunError:
    listed = "; ".join(differences[:6])
    return StaleRunError(f"{where} was made with another configuration ({listed}). Use a new --out-dir, or delete "
                         "that folder to start over; tadq never mixes samples of two configurations.")


def chunk_path(out_dir: str | Path, chunk: ChunkRange) -> Path:
    return Path(out_dir) / CHUNK_DIR / chunk.filename


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of ``out_dir``, or ``None`` when there is none yet."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest = read_json_file(path, "sharded-sampling manifest")  # names the file when it is not JSON
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise StaleRunError(f"{path} is not a tadq sharded-sampling manifest (format {found!r})")
    fields = {"key": dict, "num_samples": int, "complete": bool}
    wrong = [name for name, kind in fields.items() if not isinstance(manifest.get(name), kind)]
    if not wrong:
        wrong = [f"key.{name}" for name in _damaged_key_fields(manifest["key"])]
    if wrong:  # a hand-edited manifest: named, not a bare KeyError from deep inside
        raise StaleRunError(f"{path} is damaged: its {wrong} field(s) are missing or of the wrong type; delete it "
                            "(the chunks are checked against the run's key on their own) or the whole run folder")
    return manifest


def _damaged_key_fields(key: Mapping[str, Any]) -> list[str]:
    """The run-key fields (every key since the first holds them) that are missing or of the wrong type: a manifest
    opened as a finished run (``--reference-dir``) is indexed by them, and an edited one crashed with a bare
    KeyError, or was refused by its own chunks only after the whole new run had been sampled."""
    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    checks = {
        "model_fingerprint": lambda v: isinstance(v, str), "scheduler_fingerprint": lambda v: isinstance(v, str),
        "sampler": lambda v: isinstance(v, dict) and integer(v.get("num_steps")), "seed": integer,
        "sample_shape": lambda v: isinstance(v, list) and bool(v) and all(integer(d) and d > 0 for d in v),
        "batch_size": integer, "chunk_size": integer, "record_trajectory": lambda v: isinstance(v, bool),
        "device_type": lambda v: isinstance(v, str),
    }
    return [name for name, check in checks.items() if not check(key.get(name))]


def check_manifest(out_dir: str | Path, key: Mapping[str, Any]) -> None:
    """Raise ``StaleRunError`` when ``out_dir`` already belongs to a run with another key."""
    manifest = read_manifest(out_dir)
    if manifest is not None and (differences := key_differences(key, manifest["key"])):
        raise _stale(f"{Path(out_dir) / MANIFEST_NAME}", differences)


def write_manifest(out_dir: str | Path, key: Mapping[str, Any], num_samples: int, complete: bool,
                   settings: Mapping[str, Any]) -> None:
    """Record the run's key and settings (rank 0 only); ``complete`` turns true once every chunk exists."""
    from tadq.utils import library_versions

    manifest = {"format": MANIFEST_FORMAT, "version": 1, "key": dict(key), "num_samples": int(num_samples),
                "complete": bool(complete), "settings": dict(settings), "versions": library_versions()}
    atomic_write_json(manifest, Path(out_dir) / MANIFEST_NAME)


def save_chunk(out_dir: str | Path, chunk: ChunkRange, key: Mapping[str, Any], images: Tensor,
               states: Tensor | None = None) -> Path:
    """Write one chunk atomically: images (n, C, H, W), optional states (S+1, n, C, H, W), its key and range."""
    if images.shape[0] != chunk.size:
        raise ValueError(f"chunk {chunk.filename} needs {chunk.size} images, got {images.shape[0]}")
    tensors = {"images": images} if states is None else {"images": images, "states": states}
    path = chunk_path(out_dir, chunk)
    save_checked(tensors, {"key": dict(key), "start": chunk.start, "stop": chunk.stop}, path)
    return path


def _read_chunk_file(path: Path) -> dict[str, Any]:
    """{"key", "start", "stop", "images"[, "states"]} of a chunk file; ``DamagedFileError`` if it is damaged."""
    tensors, meta = load_checked(path, "chunk")
    return {**(meta if isinstance(meta, dict) else {}), **tensors}


def _check_payload(payload: Mapping[str, Any], chunk: ChunkRange, key: Mapping[str, Any], path: Path) -> None:
    if differences := key_differences(key, payload.get("key", {})):
        raise _stale(str(path), differences)
    shape = (chunk.size, *key["sample_shape"])
    images = payload.get("images")
    if (payload.get("start"), payload.get("stop")) != (chunk.start, chunk.stop) or not isinstance(images, Tensor) \
            or tuple(images.shape) != shape:
        raise StaleRunError(f"{path} does not hold samples {chunk.start}..{chunk.stop - 1} of shape {shape}; "
                            "delete it and run again")
    if key["record_trajectory"]:
        states = payload.get("states")
        steps = key["sampler"]["num_steps"] + 1
        if not isinstance(states, Tensor) or tuple(states.shape) != (steps, *shape):
            raise StaleRunError(f"{path} lacks the recorded trajectory ({steps} states); delete it and run again")


def load_chunk(out_dir: str | Path, chunk: ChunkRange, key: Mapping[str, Any]) -> dict[str, Any]:
    """Read and validate one chunk (key, range, shapes); raises ``StaleRunError`` on any mismatch."""
    path = chunk_path(out_dir, chunk)
    payload = _read_chunk_file(path)
    _check_payload(payload, chunk, key, path)
    return payload


def remove_partial_files(out_dir: str | Path) -> int:
    """Delete the temp files killed writers left in ``out_dir`` and ``chunks/``; returns how many. Only those whose
    writer is provably gone (``tadq.utils.stale_temp_file``): a second run into the same folder, or a rank of
    another node, may be writing its chunk right now, and deleting its temp file failed that run when it renamed
    it into place."""
    return remove_stale_temp_files(out_dir) + remove_stale_temp_files(Path(out_dir) / CHUNK_DIR)


def pending_chunks(out_dir: str | Path, chunks: Iterable[ChunkRange], key: Mapping[str, Any]) -> list[ChunkRange]:
    """The chunks still to sample, after checking every chunk file already in ``out_dir``.

    A file of this run's layout with the right key is kept; one that cannot be read (it cannot be half-written, but
    a disk may fail) is redone with a warning; any chunk file with another key raises, whether or not its range
    belongs to this layout, so a deleted manifest cannot smuggle another run's samples in.
    """
    wanted = list(chunks)
    done: set[ChunkRange] = set()
    folder = Path(out_dir) / CHUNK_DIR
    for path in sorted(folder.glob(f"*{CHUNK_SUFFIX}")) if folder.is_dir() else []:
        chunk = ChunkRange.from_filename(path.name)
        if chunk is None:
            continue
        if path.name != chunk.filename:  # "0-2.safetensors" counted as chunk 0..1 done, which open() never finds
            raise StaleRunError(f"{path} is not a chunk file name tadq writes (that range is {chunk.filename}); "
                                "move it out of the chunks folder")
        try:
            payload = _read_chunk_file(path)
        except (OSError, ValueError) as error:  # any unreadable file is simply sampled again
            logger.warning("cannot read %s (%s); it will be sampled again", path, error)
            continue
        _check_payload(payload, chunk, key, path)
        done.add(chunk)
    return [chunk for chunk in wanted if chunk not in done]


@dataclass(frozen=True)
class ShardedRun:
    """A finished sharded run on disk: read any index range without loading the whole run.

    Args:
        out_dir: The run folder.
        key: Its run key (from the manifest).
        num_samples: Samples 0 .. num_samples - 1 are present.
        settings: The manifest's settings (model label, world size, ...).
    """

    out_dir: Path
    key: dict[str, Any]
    num_samples: int
    settings: dict[str, Any]

    @classmethod
    def open(cls, out_dir: str | Path) -> ShardedRun:
        """Open a run folder; raises when it has no manifest or misses chunks (the run is not finished)."""
        out_dir = Path(out_dir)
        manifest = read_manifest(out_dir)
        if manifest is None:
            raise FileNotFoundError(f"{out_dir} has no {MANIFEST_NAME}; it is not a `tadq sample-sharded` run folder")
        run = cls(out_dir, manifest["key"], int(manifest["num_samples"]), manifest.get("settings", {}))
        missing = [c for c in run.chunks if not chunk_path(out_dir, c).is_file()]
        if missing:
            raise FileNotFoundError(f"{out_dir} misses {len(missing)} of {len(run.chunks)} chunks (first: "
                                    f"{missing[0].filename}); rerun its sample-sharded command to finish it")
        return run

    @property
    def chunks(self) -> tuple[ChunkRange, ...]:
        return chunk_ranges(self.num_samples, self.key["chunk_size"])

    def load_chunk(self, chunk: ChunkRange) -> dict[str, Any]:
        return load_chunk(self.out_dir, chunk, self.key)

    def check_chunks(self, stop: int | None = None) -> None:
        """Read back every chunk holding samples 0 .. stop - 1 (checksum, key, range, shapes), raising
        ``StaleRunError`` naming the first bad one: a reference run's chunk that was damaged or replaced was only
        found by the metrics, after the whole new run had been sampled (and on a rank other than 0, with rank 0
        waiting for it)."""
        stop = self.num_samples if stop is None else stop
        for chunk in self.chunks:
            if chunk.start >= stop:
                break
            try:
                self.load_chunk(chunk)
            except (OSError, ValueError) as error:
                raise StaleRunError(f"the run {self.out_dir} has a chunk that cannot be used: {error} [to repair "
                                    "that run: delete the chunk and rerun the command that sampled it; only missing "
                                    "chunks are redone]") from error

    def read(self, start: int = 0, stop: int | None = None, *, states: bool = False) -> Tensor:
        """Images (stop - start, C, H, W), or with ``states=True`` trajectories (S+1, stop - start, C, H, W)."""
        stop = self.num_samples if stop is None else stop
        if not 0 <= start < stop <= self.num_samples:
            raise ValueError(f"range {start}..{stop} is outside this run's samples 0..{self.num_samples}")
        if states and not self.key["record_trajectory"]:
            raise ValueError(f"{self.out_dir} was sampled without --record-trajectory; it has no states")
        field, axis = ("states", 1) if states else ("images", 0)
        parts = []
        for chunk in self.chunks:
            if chunk.stop <= start or chunk.start >= stop:
                continue
            lo, hi = max(start, chunk.start) - chunk.start, min(stop, chunk.stop) - chunk.start
            parts.append(self.load_chunk(chunk)[field].narrow(axis, lo, hi - lo))
        return torch.cat(parts, dim=axis)
