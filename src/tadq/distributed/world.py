"""Who am I in the job: rank discovery, process-group setup and teardown, and the few collectives tadq needs.

Plain ``torch.distributed`` rather than accelerate: under ``torchrun`` on a CPU-only machine accelerate's
``PartialState()`` silently stays single-process (docs/architecture.md), while a gloo group splits the work. The
same code runs with nccl on GPUs; the backend follows the device (gloo for CPU, nccl for CUDA). Outside ``torchrun``
nothing is initialised and every collective degrades to the single-process answer, so library code never branches
on "am I distributed".
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

__all__ = ["DeviceChoice", "World", "distributed_world", "launched_by_torchrun", "resolve_device"]

logger = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda"]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cpu", "cuda")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = datetime.timedelta(hours=2)
"""Collective timeout. Ranks wait at the barrier while slower ranks finish their last chunks (or, on a resume, while
the ranks that drew the few missing chunks sample them), so the 10-30 min defaults of torch are too short."""

_RERAISED: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (FileNotFoundError, NotImplementedError, TypeError, ValueError, OSError)
}


def launched_by_torchrun() -> bool:
    """True when the environment variables ``torchrun`` (or any ``env://`` launcher) sets are all present."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def resolve_device(choice: DeviceChoice, local_rank: int) -> torch.device:
    """The device this process samples on: ``cuda:LOCAL_RANK`` when CUDA is wanted and present, else the CPU.

    Args:
        choice: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"`` (raises when CUDA is missing).
        local_rank: This process's index on its node; one GPU per process.
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device; use --device cpu (gloo) or a CUDA build")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU (this node has {count}); start at most {count} "
                         "processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


@dataclass(frozen=True)
class World:
    """This process's place in the job, with collectives that are no-ops in a single process.

    Args:
        rank: Global rank, 0 .. world_size - 1.
        world_size: Number of processes in the job.
        local_rank: Rank on this node (selects the GPU).
        device: Where this process samples.
        distributed: Whether a process group is in use (False: one process, no collectives).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 plans, writes the manifest, assembles and reports."""
        return self.rank == 0

    @classmethod
    def current(cls, device: DeviceChoice = "auto") -> World:
        """Describe the already-initialised default group, or a single process when there is none.

        Raises under a multi-process ``torchrun`` job whose group was never joined: every rank would otherwise do the
        whole job, the silent failure accelerate's ``PartialState()`` has on CPU (docs/architecture.md#many-processes).
        """
        if dist.is_available() and dist.is_initialized():
            local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(torch.cuda.device_count(), 1)))
            return cls(dist.get_rank(), dist.get_world_size(), local_rank, resolve_device(device, local_rank), True)
        if launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("started by torchrun with WORLD_SIZE > 1 but no process group is initialised; call "
                               "this inside `with tadq.distributed.distributed_world() as world:` and pass `world`")
        return cls(device=resolve_device(device, 0))

    def barrier(self) -> None:
        """Wait for every rank (nccl needs the device so it does not guess one)."""
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._collective_device())
        return box[0]

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` as a list indexed by rank on ``dst``; ``None`` on the other ranks."""
        if not self.distributed:
            return [obj]
        received: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, received, dst=dst)
        return received

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on rank 0 only and return its result on every rank; its error is raised on every rank.

        Without this, an error on rank 0 (a stale ``out_dir``, a missing file) would leave the other ranks waiting
        at their next collective until the timeout.
        """
        if not self.distributed:
            return work()
        outcome: tuple[str, Any] | None = None
        if self.is_main:
            try:
                outcome = ("ok", work())
            except Exception as error:
                self.broadcast(("error", ([c.__name__ for c in type(error).__mro__], str(error))))
                raise
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            names, message = outcome[1]
            kind = next((_RERAISED[name] for name in names if name in _RERAISED), RuntimeError)
            raise kind(f"(from rank 0) {message}")
        return outcome[1]

    def _collective_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


@contextlib.contextmanager
def distributed_world(device: DeviceChoice = "auto", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Iterator[World]:
    """Join the ``torchrun`` job if there is one (gloo on CPU, nccl on CUDA) and leave it on exit.

    A group initialised by the caller is used as is and left alone; without ``torchrun`` variables (plain
    ``python`` / ``tadq``) the process runs alone and nothing is initialised.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (see ``resolve_device``).
        timeout: Collective timeout (see ``DEFAULT_TIMEOUT``).
    """
    if dist.is_available() and dist.is_initialized():
        yield World.current(device)
        return
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        yield World(local_rank=local_rank, device=resolve_device(device, local_rank))
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    target = resolve_device(device, local_rank)
    backend = "nccl" if target.type == "cuda" else "gloo"
    if target.type == "cuda":
        torch.cuda.set_device(target)
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout,
                            device_id=target if target.type == "cuda" else None)
    world = World(dist.get_rank(), dist.get_world_size(), local_rank, target, True)
    logger.debug("rank %d of %d joined the %s group on %s", world.rank, world.world_size, backend, target)
    try:
        yield world
    finally:
        dist.destroy_process_group()
