"""``FPTrajectoryCache``: the FP trajectories a sequential fit walks, kept between fits that walk the same ones.

A sequential fit (TAC, TCEC; ``tadq.corrections.sequential``) walks the FP trajectory beside the quantized one. The
FP side depends on nothing the fit changes — the FP network, the plan, the noise seed, the number of trajectories,
the batching and the conditions — so every preset and every correction of a run that fits on the same calibration
noise recomputes the very same FP states and predictions (a third of a TAC fit's network calls). The cache keeps
them, keyed by all of those, and drops everything when the FP network's parameters or buffers change (their
contents are checked at every read and write; ``network_fingerprint``). Values are
the tensors the walk computed, so a fit with the cache gives the same tables, bit for bit, as one without.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadq.sampling import SamplingPlan

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


_INTEGER_VIEWS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements widened to int64 at a time: bounded scratch memory on the largest layers


def _device_checksum(flat: Tensor) -> Tensor:
    """(sum, position-weighted sum) of a 1-D tensor's bit patterns as int64, computed where the tensor lives (no
    copy of a GPU model's weights to the host at every check).

    Integer sums wrap modulo 2⁶⁴ whatever the reduction order, so the result is exact and repeatable; the weighted
    sum also changes when values only move (a permutation of channels)."""
    integer = _INTEGER_VIEWS.get(flat.element_size())
    ints = flat.view(integer) if integer is not None else flat.view(torch.uint8)
    if ints.device.type != "cuda":  # integer reductions are not on every backend (mps): those go through the host
        ints = ints.cpu()
    total = torch.zeros(2, dtype=torch.int64, device=ints.device)
    for start in range(0, ints.numel(), _CHUNK):
        part = ints[start:start + _CHUNK].to(torch.int64)
        position = torch.arange(start + 1, start + 1 + part.numel(), dtype=torch.int64, device=part.device)
        total += torch.stack([part.sum(), (part * position).sum()])
    return total


def network_fingerprint(model: nn.Module) -> tuple:
    """What the network computes with: every parameter's and buffer's name, dtype, device, shape and contents.

    Contents, not storage addresses and version counters: ``param.data.copy_(...)`` (diffusers' ``EMAModel.copy_to``)
    writes new values without moving the version counter, and ``param.data = new`` twice can land on the first
    storage's address again; the trajectories of the old weights were reused in both cases. Equal values give equal
    fingerprints, so a copy of the same weights keeps the entries (they are still right). A CPU tensor is hashed
    (SHA-256 over its bytes, no copy), a GPU tensor checksummed on the GPU.
    """
    entries: list[tuple] = []
    pending: list[tuple[int, Tensor]] = []
    with torch.no_grad():
        for name, tensor in (*model.named_parameters(), *model.named_buffers()):
            flat = tensor.detach().reshape(-1).contiguous()
            entries.append((name, tensor.dtype, str(tensor.device), tuple(tensor.shape)))
            if flat.device.type == "cpu":
                entries[-1] += (hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest(),)
            else:
                pending.append((len(entries) - 1, _device_checksum(flat)))
        if pending:  # one transfer for all of them (a model on one device), not one synchronisation per tensor
            sums = torch.stack([value.to(pending[0][1].device) for _, value in pending]).tolist()
            for (index, _), checksum in zip(pending, sums, strict=True):
                entries[index] += tuple(checksum)
    return tuple(entries)


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


def trajectory_key(plan: str | SamplingPlan, num_steps: int, guidance_scale: float, seed: int, num_samples: int,
                   batch_size: int, sample_shape: tuple[int, ...], device: str | torch.device, dtype: torch.dtype,
                   conditions: object) -> tuple:
    """Everything an FP walk's values depend on besides the network (``conditions`` by identity: the caller keeps
    the object alive while the entry lives).

    ``plan`` is best the ``SamplingPlan`` itself: its steps hold every coefficient, the clipping range and the
    prediction type, so walks under another training schedule (betas, timestep spacing) or ``clip_sample`` are
    other entries. Its ``key`` (a string, ``"ddim-50-eta0.0"``) names only the grid, not those."""
    if isinstance(plan, SamplingPlan):
        plan_part: Hashable = (plan.key, plan.steps, plan.init_noise_sigma)
    else:
        plan_part = plan
    return (plan_part, num_steps, float(guidance_scale), seed, num_samples, batch_size, tuple(sample_shape),
            str(torch.device(device)), str(dtype), id(conditions) if conditions is not None else None)
