"""Chunks of consecutive sample indices and which rank samples which.

A chunk's content depends only on its index range (each sample's noise is a function of (seed, index), see
``tadq.sampling.noise``) and never on the rank or the number of ranks that produced it, so 1 and N workers write
the same files. Assignment only balances the work: round-robin over the chunks still to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CHUNK_SUFFIX", "ChunkRange", "assign_chunks", "chunk_ranges"]

CHUNK_SUFFIX = ".safetensors"  # tensors + JSON, never a pickle (tadq.safefiles)
_FILENAME = re.compile(r"^(\d+)-(\d+)\.safetensors$")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(frozen=True, order=True)
class ChunkRange:
    """Sample indices ``start .. stop - 1``; the unit that is sampled, saved and skipped on resume.

    Args:
        start: First sample index (inclusive), >= 0.
        stop: End of the range (exclusive), > start.
    """

    start: int
    stop: int

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise ValueError(f"ChunkRange.start must be a non-negative int, got {self.start!r}")
        if isinstance(self.stop, bool) or not isinstance(self.stop, int) or self.stop <= self.start:
            raise ValueError(f"ChunkRange.stop must be an int > start={self.start}, got {self.stop!r}")

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.stop))

    @property
    def filename(self) -> str:
        """``{start:07d}-{stop:07d}.safetensors``: sorts by index up to ten million samples, names its own range."""
        return f"{self.start:07d}-{self.stop:07d}{CHUNK_SUFFIX}"

    @classmethod
    def from_filename(cls, name: str) -> ChunkRange | None:
        """The range a chunk file name encodes, or ``None`` for any other file (temp files, notes)."""
        match = _FILENAME.match(name)
        if match is None:
            return None
        start, stop = int(match.group(1)), int(match.group(2))
        return cls(start, stop) if stop > start else None


def chunk_ranges(num_samples: int, chunk_size: int) -> tuple[ChunkRange, ...]:
    """Split samples ``0 .. num_samples - 1`` into consecutive chunks of ``chunk_size`` (the last may be shorter).

    The layout depends only on these two numbers, so every rank (and every resumed run) derives the same chunks.
    """
    _check_positive("num_samples", num_samples)
    _check_positive("chunk_size", chunk_size)
    starts = range(0, num_samples, chunk_size)
    return tuple(ChunkRange(start, min(start + chunk_size, num_samples)) for start in starts)


def assign_chunks(chunks: Sequence[ChunkRange], rank: int, world_size: int) -> tuple[ChunkRange, ...]:
    """The chunks rank ``rank`` samples: every ``world_size``-th one, starting at its rank.

    Round-robin rather than contiguous blocks so that, on a resume with a few chunks left, the leftovers still spread
    over all ranks. Every chunk goes to exactly one rank.

    Args:
        chunks: The chunks still to do, in the same order on every rank.
        rank: This process's rank, 0 .. world_size - 1.
        world_size: Number of processes.
    """
    _check_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size - 1}], got {rank!r}")
    return tuple(chunks[rank::world_size])
