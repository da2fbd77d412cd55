"""Chunk layout and round-robin assignment: every sample in exactly one chunk, every chunk on exactly one rank."""

from __future__ import annotations

import pytest

from tadq.distributed import ChunkRange, assign_chunks, chunk_ranges


@pytest.mark.parametrize(("num_samples", "chunk_size"), [(1, 1), (10, 2), (10, 3), (7, 100), (50_000, 512)])
def test_chunks_tile_the_indices_in_order(num_samples: int, chunk_size: int) -> None:
    chunks = chunk_ranges(num_samples, chunk_size)
    assert [i for chunk in chunks for i in chunk.indices] == list(range(num_samples))
    assert all(chunk.size == chunk_size for chunk in chunks[:-1]) and 1 <= chunks[-1].size <= chunk_size


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_assignment_is_a_partition_and_round_robin(world_size: int) -> None:
    chunks = chunk_ranges(23, 2)
    shards = [assign_chunks(chunks, rank, world_size) for rank in range(world_size)]
    assert sorted(c for shard in shards for c in shard) == list(chunks)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0][0] == chunks[0] and (world_size == 1 or shards[1][0] == chunks[1])


def test_assignment_of_leftovers_after_a_resume_spreads_over_ranks() -> None:
    leftovers = [ChunkRange(4, 6), ChunkRange(10, 12), ChunkRange(12, 14)]
    assert assign_chunks(leftovers, 0, 2) == (ChunkRange(4, 6), ChunkRange(12, 14))
    assert assign_chunks(leftovers, 1, 2) == (ChunkRange(10, 12),)
    assert assign_chunks(leftovers, 3, 4) == ()


def test_filename_round_trip_and_foreign_names() -> None:
    chunk = ChunkRange(128, 256)
    assert chunk.filename == "0000128-0000256.safetensors"
    assert ChunkRange.from_filename(chunk.filename) == chunk
    for name in (".0000128-0000256.safetensors.abc.tmp", "samples.safetensors", "0000005-0000005.safetensors",
                 "12-x.safetensors", "0000128-0000256.pt"):
        assert ChunkRange.from_filename(name) is None


@pytest.mark.parametrize(("call", "message"), [
    (lambda: chunk_ranges(0, 4), "num_samples"),
    (lambda: chunk_ranges(10, 0), "chunk_size"),
    (lambda: chunk_ranges(10, 2.0), "chunk_size"),
    (lambda: assign_chunks([], 2, 2), "rank"),
    (lambda: assign_chunks([], 0, 0), "world_size"),
    (lambda: ChunkRange(5, 5), "stop"),
    (lambda: ChunkRange(-1, 5), "start"),
])
def test_bad_input_raises(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
