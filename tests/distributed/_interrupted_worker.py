"""A 2-rank gloo job whose rank 1 dies hard (``os._exit``, no cleanup) right after saving its first chunk.

Used by ``test_multiprocess.py`` to simulate a crash or a preemption in the middle of a sharded run. The ranks are
forked from the test process (``torch.multiprocessing`` with ``start_method="fork"``), so they skip the ~5 s import
of torch and diffusers that a torchrun launch pays, and are given the same environment variables torchrun sets.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tadq.cli.sample import load_denoiser
from tadq.distributed import ChunkRange, distributed_world, sample_sharded
from tadq.sampling import SamplerConfig

EXIT_CODE = 17


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank(rank: int, port: int, model_dir: Path, out_dir: Path, settings: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_world("cpu") as world:
        denoiser, scheduler, label = load_denoiser(model_dir)

        def die_after_first(chunk: ChunkRange) -> None:
            if world.rank == 1:
                os._exit(EXIT_CODE)  # like SIGKILL: no barrier, no manifest update, no process-group teardown

        sample_sharded(denoiser, scheduler, SamplerConfig("ddim", num_steps=settings["steps"]),
                       num_samples=settings["num_samples"], seed=settings["seed"], out_dir=out_dir,
                       batch_size=settings["batch_size"], record_trajectory=True, world=world, label=label,
                       progress=False, on_chunk_written=die_after_first)


def run_interrupted(model_dir: Path, out_dir: Path, settings: dict) -> BaseException | None:
    """Run the job until rank 1 dies; returns the error ``torch.multiprocessing`` raised (None if none did)."""
    try:
        mp.start_processes(_rank, args=(_free_port(), model_dir, out_dir, settings), nprocs=2,
                           start_method="fork")
    except mp.ProcessExitedException as error:
        return error
    return None
