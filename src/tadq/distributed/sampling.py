"""``sample_sharded``: sample N images with any number of processes, resumably, with bit-identical results.

Each chunk of consecutive indices is sampled with tadq's loop on one rank and saved atomically; because a sample's
noise depends only on (seed, index) and a chunk is always batched the same way, the files do not depend on which
rank wrote them or on how many ranks there were. A killed or preempted job is restarted with the same command: rank 0
checks the chunks on disk (and their run key) and only the missing ones are sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadq.api import check_conditions
from tadq.corrections.base import HookedDenoiser
from tadq.distributed.key import (
    conditioning_key,
    key_differences,
    model_fingerprint,
    run_key,
    scheduler_fingerprint,
)
from tadq.distributed.shards import CHUNK_SUFFIX, ChunkRange, assign_chunks, chunk_ranges
from tadq.distributed.store import (
    CHUNK_DIR,
    METRICS_NAME,
    SAMPLES_NAME,
    ShardedRun,
    StaleRunError,
    check_manifest,
    pending_chunks,
    read_manifest,
    remove_partial_files,
    save_chunk,
    write_manifest,
)
from tadq.distributed.world import World
from tadq.progress import progress_bar
from tadq.registry import adapter_for
from tadq.safefiles import save_checked
from tadq.sampling import Conditioning, ConditionSource, SamplerConfig, SamplingPlan, check_seed
from tadq.sampling import sample as sample_loop
from tadq.utils import eval_mode

__all__ = ["ShardedSamplingReport", "sample_sharded"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardedSamplingReport:
    """What ``sample_sharded`` did on this rank, and the finished run.

    Args:
        run: The complete run on disk (read images or states from it by index range).
        computed: Chunks this rank sampled in this call.
        reused: Chunks that were already on disk with the right key (the same on every rank).
    """

    run: ShardedRun
    computed: tuple[ChunkRange, ...]
    reused: tuple[ChunkRange, ...]


@dataclass(frozen=True)
class _ChunkJob:
    """Sample and save one chunk; built identically on every rank, so no chunk depends on who runs it."""

    denoiser: Callable
    plan: SamplingPlan
    conditions: ConditionSource | None
    hooks: tuple
    key: dict[str, Any]
    out_dir: Path
    device: torch.device
    dtype: torch.dtype | None = None

    def run(self, chunk: ChunkRange) -> None:
        key = self.key
        result = sample_loop(self.denoiser, self.plan, indices=chunk.indices, seed=key["seed"],
                             sample_shape=tuple(key["sample_shape"]), batch_size=key["batch_size"], hooks=self.hooks,
                             conditions=self.conditions, record_trajectory=key["record_trajectory"], progress=False,
                             device=self.device, dtype=self.dtype)
        states = result.trajectory.states if result.trajectory is not None else None
        save_chunk(self.out_dir, chunk, key, result.images, states)


def _bind(denoiser: nn.Module) -> tuple[Callable, tuple[int, int, int], tuple]:
    """(callable, sample shape, hooks) exactly as ``tadq.sample`` resolves them, corrections first."""
    if isinstance(denoiser, HookedDenoiser):
        return denoiser, tuple(denoiser.sample_shape), tuple(denoiser.correction_hooks())
    adapter = adapter_for(denoiser)

    def call(x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        return adapter.predict_eps(denoiser, x, t, cond)

    return call, tuple(adapter.sample_shape(denoiser)), ()


def _check_arguments(num_samples: int, seed: int, batch_size: int, chunk_size: int) -> None:
    for name, value, low in (("num_samples", num_samples, 1), ("seed", seed, 0), ("batch_size", batch_size, 1),
                             ("chunk_size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _plan(world: World, out_dir: Path, chunks: tuple[ChunkRange, ...], key: dict[str, Any],
          threads: int) -> tuple[list[ChunkRange], int]:
    """(chunks still to sample, the torch thread count the run's chunks are made with: ``threads``, or the one the
    manifest records when every chunk is already there and nothing is sampled now)."""
    keys, counts = world.gather(key), world.gather(threads)

    def plan() -> tuple[list[ChunkRange], int]:
        for rank, other in enumerate(keys or []):
            if differences := key_differences(key, other):
                raise ValueError(f"rank {rank} loaded another model or scheduler than rank 0 ({differences[0]}); "
                                 "every node must read the same model files")
        cpu = key["device_type"] == "cpu"
        if cpu and len(set(counts or [threads])) > 1:
            raise ValueError(f"the ranks run with different torch thread counts ({counts}); on the CPU the count "
                             "changes the last bits of a sample, so give every rank the same one")
        check_manifest(out_dir, key)
        recorded = ((read_manifest(out_dir) or {}).get("settings") or {}).get("threads")
        remove_partial_files(out_dir)
        pending = pending_chunks(out_dir, chunks, key)
        if not (cpu and isinstance(recorded, int) and recorded != threads and len(pending) < len(chunks)):
            return pending, threads
        if pending:  # --threads is not in the run key (README): the record is checked here instead
            raise StaleRunError(f"{out_dir}'s {len(chunks) - len(pending)} finished chunk(s) were sampled with "
                                f"{recorded} torch threads, this run has {threads}: on the CPU the thread count "
                                "changes how float sums are split, and so the last bits of a sample, and the run "
                                f"would mix the two. Resume with {recorded} threads (torch.set_num_threads; "
                                f"--threads {recorded} on the command line), or sample into a new folder")
        return pending, recorded  # nothing is sampled now: the record stays that of the chunks

    return world.on_main(plan)


def _global_done(out_dir: Path, chunks: tuple[ChunkRange, ...]) -> int:
    names = {path.name for path in (out_dir / CHUNK_DIR).glob(f"*{CHUNK_SUFFIX}")}
    return sum(chunk.filename in names for chunk in chunks)


def _finish(world: World, out_dir: Path, key: dict[str, Any], num_samples: int, settings: dict[str, Any],
            assemble: bool) -> ShardedRun:
    """After every rank is done: rank 0 marks the manifest complete and (optionally) writes ``samples.safetensors``."""
    world.barrier()

    def finish() -> None:
        run = ShardedRun.open(out_dir)  # raises if a chunk is missing (e.g. out_dir is not shared between nodes)
        write_manifest(out_dir, key, num_samples, complete=True, settings=settings)
        if assemble:
            images = run.read()
            save_checked({"images": images, "indices": torch.arange(num_samples)},
                         {"seed": key["seed"], "sampler": key["sampler"], "model": settings["model_label"],
                          "key": key},
                         out_dir / SAMPLES_NAME)

    world.on_main(finish)
    return ShardedRun.open(out_dir)


def sample_sharded(
    denoiser: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int, out_dir: str | Path,
    batch_size: int = 128, chunk_size: int | None = None, record_trajectory: bool = False, world: World | None = None,
    label: str | None = None, assemble: bool = True, progress: bool = True,
    on_chunk_written: Callable[[ChunkRange], None] | None = None,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
) -> ShardedSamplingReport:
    """Sample indices 0 .. num_samples - 1 split over the ranks of ``world``, into ``out_dir``; resumable.

    Call it on every rank (under ``torchrun``, inside ``distributed_world()``). Outputs: ``out_dir/manifest.json``
    (run key and settings), ``out_dir/chunks/{start:07d}-{stop:07d}.safetensors`` (images (n, C, H, W),
    states (S+1, n, C, H, W) with ``record_trajectory``), and with ``assemble`` ``out_dir/samples.safetensors``
    (all images, the layout of ``tadq sample --tensor-out``). The model is moved to ``world.device``.

    Args:
        denoiser: A FP diffusers model or a ``QuantizedDenoiser`` (its corrections are applied, as in ``tadq.sample``).
        scheduler: Its training scheduler.
        sampler: The deployment sampler.
        num_samples: Number N of samples; a rerun with a larger N reuses every chunk that keeps its range.
        seed: Noise seed (sample i's noise depends only on the seed and i).
        out_dir: Run folder, shared by all ranks.
        batch_size: Samples per denoiser call inside a chunk (capped at ``chunk_size``; part of the run key).
        chunk_size: Samples per chunk file, the unit of work and of resume (default: ``batch_size``).
        record_trajectory: Also store every state x_T .. x_0 (for per-step MSE against a reference run).
        world: This process's ``World`` (default: ``World.current()``, a single process outside a group).
        label: Model name for the manifest and ``samples.safetensors``.
        assemble: Rank 0 writes ``samples.safetensors`` with all images once every chunk exists.
        progress: tqdm bar of finished chunks (all ranks) on rank 0.
        on_chunk_written: Called with each chunk this rank has saved (progress reporting, tests of resume).
        conditions: Per-sample conditions (a function of (seed, index) or an explicit list, so every rank gives
            each sample the same ones); ``None`` for an unconditional model.
        guidance_scale: Classifier-free guidance scale (1.0: none).
    """
    chunk_size = batch_size if chunk_size is None else chunk_size
    _check_arguments(num_samples, seed, batch_size, chunk_size)
    check_seed("seed", seed)  # every check before the manifest is written: a failed first try must not lock the folder
    check_conditions(getattr(denoiser, "model", denoiser) if isinstance(denoiser, HookedDenoiser) else denoiser,
                     conditions, guidance_scale, "sample_sharded")
    world = world or World.current()
    out_dir = Path(out_dir)
    call, shape, hooks = _bind(denoiser)
    with eval_mode(denoiser):  # the model as it samples: a resume from a model left in training mode was refused
        fingerprint = model_fingerprint(denoiser)  # (its modules' training flags); eval-mode keys are unchanged
    key = run_key(fingerprint, scheduler_fingerprint(scheduler), sampler, seed=seed,
                  sample_shape=shape, batch_size=min(batch_size, chunk_size), chunk_size=chunk_size,
                  record_trajectory=record_trajectory, device_type=world.device.type)
    plan = SamplingPlan.build(scheduler, sampler, guidance_scale)
    if (conditioning := conditioning_key(conditions, plan.guidance_scale)) is not None:
        key["conditioning"] = conditioning
    chunks = chunk_ranges(num_samples, chunk_size)
    pending, threads = _plan(world, out_dir, chunks, key, torch.get_num_threads())
    settings = {"model_label": label or type(denoiser).__name__, "sampler_key": sampler.key,
                "world_size": world.world_size, "device": str(world.device), "threads": threads}
    if world.is_main:
        # the assembled file and the metrics of an earlier run (another N) would sit beside a manifest of this one
        # until _finish (and the metrics after it); an interrupted run left them describing samples it is not made of
        for name in (SAMPLES_NAME, METRICS_NAME):
            (out_dir / name).unlink(missing_ok=True)
        write_manifest(out_dir, key, num_samples, complete=False, settings=settings)
    mine = assign_chunks(pending, world.rank, world.world_size)
    logger.info("%d of %d chunks to sample (%d on this rank of %d); %d reused from %s", len(pending), len(chunks),
                len(mine), world.world_size, len(chunks) - len(pending), out_dir)
    denoiser.to(world.device)
    parameter = next(denoiser.parameters(), None)
    job = _ChunkJob(call, plan, conditions, hooks, key, out_dir, world.device,
                    None if parameter is None else parameter.dtype)  # states in the model's dtype, as tadq.sample
    with eval_mode(denoiser), progress_bar(total=len(chunks), initial=len(chunks) - len(pending), unit="chunk",
                                           desc=f"sampling ({world.world_size} ranks)",
                                           disable=not (progress and world.is_main)) as bar:
        for chunk in mine:  # in eval mode: dropout left on made a sample depend on more than (seed, index)
            job.run(chunk)
            if on_chunk_written is not None:
                on_chunk_written(chunk)
            if not bar.disable:
                bar.update(_global_done(out_dir, chunks) - bar.n)
    run = _finish(world, out_dir, key, num_samples, settings, assemble)
    still_pending = set(pending)
    reused = tuple(chunk for chunk in chunks if chunk not in still_pending)
    return ShardedSamplingReport(run=run, computed=mine, reused=reused)
