"""``FPTrajectoryCache``: the FP trajectories a sequential fit walks, kept between fits that walk the same ones.

A sequential fit (TAC, TCEC; ``tadq.corrections.sequential``) walks the FP trajectory beside the quantized one. The
FP side depends on nothing the fit changes — the FP network, the plan, the noise seed, the number of trajectories,
the batching and the conditions — so every preset and every correction of a run that fits on the same calibration
noise recomputes the very same FP states and predictions (a third of a TAC fit's network calls). The cache keeps
them, keyed by all of those, and drops everything when the FP network's parameters change in place. Values are
the tensors the walk computed, so a fit with the cache gives the same tables, bit for bit, as one without.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["FPTrajectory", "FPTrajectoryCache", "network_fingerprint", "trajectory_key"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FPTrajectory:
    """One walked FP trajectory of N samples.

    Attributes:
        states: x_i at each step's input, then the final state (S + 1 tensors of (N, C, H, W)).
        predictions: ε_θ(x_i) at each step (S tensors).
        anchors: Objects the key names by identity (the conditions), kept alive so that identity cannot be reused.
    """

    states: tuple[Tensor, ...]
    predictions: tuple[Tensor, ...]
    anchors: tuple[object, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.states, *self.predictions))


def network_fingerprint(model: nn.Module) -> tuple:
    """What changes when a parameter or buffer is replaced or modified in place (its storage and version counter)."""
    return tuple((name, t.data_ptr(), t._version, t.dtype, str(t.device))
                 for name, t in (*model.named_parameters(), *model.named_buffers()))


class FPTrajectoryCache:
    """FP trajectories of one FP network, least recently used dropped first beyond ``max_bytes``.

    Hand the same cache to every ``fit_corrections`` / ``tadq.quantize`` call of a run on one FP model: the first
    fit on a calibration noise walks and stores its FP trajectory, the later ones read it.

    Args:
        model: The FP network whose trajectories are kept; a fit on another network does not use this cache.
        max_bytes: Memory the kept trajectories may take (a trajectory larger than this is never kept).
    """

    def __init__(self, model: nn.Module, max_bytes: int = 1 << 30) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"FPTrajectoryCache keeps an nn.Module's trajectories, got {type(model).__name__}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.model, self.max_bytes = model, max_bytes
        self._entries: OrderedDict[Hashable, FPTrajectory] = OrderedDict()
        self._fingerprint = network_fingerprint(model)
        self.hits = self.misses = 0

    def _check_network(self) -> None:
        fingerprint = network_fingerprint(self.model)
        if fingerprint != self._fingerprint:
            if self._entries:
                logger.info("FP network changed since its trajectories were cached: dropping %d", len(self._entries))
            self._entries.clear()
            self._fingerprint = fingerprint

    def get(self, key: Hashable) -> FPTrajectory | None:
        """The trajectory stored under ``key``, or ``None``."""
        self._check_network()
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, trajectory: FPTrajectory) -> None:
        """Keep ``trajectory`` under ``key`` when it fits in ``max_bytes`` (older entries dropped to make room)."""
        self._check_network()
        size = trajectory.nbytes
        if size > self.max_bytes:
            logger.debug("FP trajectory of %d bytes exceeds the cache's %d: not kept", size, self.max_bytes)
            return
        self._entries.pop(key, None)
        while self._entries and self.nbytes + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = trajectory

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


def trajectory_key(plan_key: str, num_steps: int, guidance_scale: float, seed: int, num_samples: int,
                   batch_size: int, sample_shape: tuple[int, ...], device: str | torch.device, dtype: torch.dtype,
                   conditions: object) -> tuple:
    """Everything an FP walk's values depend on besides the network (``conditions`` by identity: the caller keeps
    the object alive while the entry lives)."""
    return (plan_key, num_steps, float(guidance_scale), seed, num_samples, batch_size, tuple(sample_shape),
            str(torch.device(device)), str(dtype), id(conditions) if conditions is not None else None)
