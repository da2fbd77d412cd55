"""Sampling and metrics sharded over ``torchrun`` processes: gloo on CPU, nccl on GPUs, resumable, rank-independent.

Typical use, on every rank::

    with distributed_world() as world:
        report = sample_sharded(model, scheduler, SamplerConfig("ddim"), num_samples=50_000, seed=1000,
                                out_dir="runs/w4a8-50k", batch_size=500, world=world)
        metrics = sharded_metrics(report.run, reference=ShardedRun.open("runs/fp-50k"), world=world)

See ``README.md`` in this folder for the commands.
"""

from tadq.distributed.key import model_fingerprint, run_key
from tadq.distributed.metrics import ChunkStatistics, ShardedMetrics, chunk_statistics, sharded_metrics
from tadq.distributed.sampling import ShardedSamplingReport, sample_sharded
from tadq.distributed.shards import ChunkRange, assign_chunks, chunk_ranges
from tadq.distributed.store import ShardedRun, StaleRunError
from tadq.distributed.world import World, distributed_world, launched_by_torchrun, resolve_device

__all__ = [
    "ChunkRange",
    "ChunkStatistics",
    "ShardedMetrics",
    "ShardedRun",
    "ShardedSamplingReport",
    "StaleRunError",
    "World",
    "assign_chunks",
    "chunk_ranges",
    "chunk_statistics",
    "distributed_world",
    "launched_by_torchrun",
    "model_fingerprint",
    "resolve_device",
    "run_key",
    "sample_sharded",
    "sharded_metrics",
]
