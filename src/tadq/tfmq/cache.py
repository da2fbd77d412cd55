"""Cache-based maintenance and disturbance-aware selection (journal extension, docs/methods/tfmq.md#cache, [RECON]).

The temporal features f_{t,i} depend only on (t, y), and t comes from the finite sampler grid, so each one can be
precomputed per deployment timestep and served from a table instead of being recomputed through the quantized
TIB. Two storage formats:

    fp          the exact FP feature, float32                                   (S, [K,] C_i)
    quantized   FP feature quantized with one (Δ, z) per (step, block):          codes (S, [K,] C_i) at ``bits``
                ĉ = Δ_{s,i}·(clamp(round(f/Δ_{s,i}) + z_{s,i}, 0, 2^b − 1) − z_{s,i})

Selection measures, per feature i and over the whole finite set, the disturbance of each strategy against FP:
``D_cos = mean(1 − cos(f̂, f))`` and ``D_L2 = mean(‖f̂ − f‖ / ‖f‖)``, and serves the feature from the strategy
with the smaller value of the configured metric.

In this fake-quant simulation a cached feature replaces the projection's output through a forward hook, so the
projection still runs and its result is discarded; the numbers are those of a deployment that skips it.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from tadq.quant.fake_quant import scale_and_zero_point
from tadq.tfmq.fsc import StepState

__all__ = ["CachedFeature", "LabelCapture", "quantize_cache", "dequantize_cache", "disturbance", "disturbance_rows",
           "cache_bytes"]


class CachedFeature:
    """Forward hook on a time projection: return the cached feature of the current step instead of its output.

    Args:
        values: the feature per step, (S, C) or (S, K, C) for a class-conditional model.
        state: the shared step index (and, class-conditionally, the labels of the current call).
    """

    def __init__(self, values: Tensor, state: StepState) -> None:
        self.values = values
        self.state = state
        self._placed: tuple[torch.device, int, Tensor] | None = None  # (device, values' version, values there)

    def values_on(self, device: torch.device) -> Tensor:
        """``values`` on ``device``: copied once per device (again after an in-place change of the table). The
        network moved after ``prepare`` (``tadq.quantize(..., device="cuda")``, ``.to``) left the table behind, and
        a row crossed from the CPU at every call, with the class labels going the other way."""
        if self.values.device == device:
            return self.values
        version = _version(self.values)
        placed = self._placed
        if placed is None or placed[0] != device or placed[1] != version or version < 0:
            placed = self._placed = (device, version, self.values.to(device))
        return placed[2]

    def __call__(self, _module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        # inside a compile trace the table is a graph constant: the row is moved in the graph, as before
        values = self.values if torch.compiler.is_compiling() else self.values_on(output.device)
        row = self.state.select(values)  # (C,) or (K, C)
        if row.dim() == 2:
            if self.state.labels is None:
                raise RuntimeError("this cache is per class label, but the call gave no class_labels")
            row = row[self.state.labels.to(row.device).long()]  # (B, C)
        else:
            row = row.expand(output.shape[0], -1)  # (B, C)
        return row.to(dtype=output.dtype, device=output.device)


def _version(tensor: Tensor) -> int:
    """The in-place change counter of ``tensor``; -1 for an inference tensor, which keeps none (copied each call)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class LabelCapture:
    """Forward pre-hook on the network: remember the class labels of each call for per-label caches.

    The labels are found by name in the call bound to the network's ``forward`` signature: their position differs
    between families (third in ``UNet2DModel`` and the DiT, fourth in ``UNet2DConditionModel``, after the text).
    """

    def __init__(self, state: StepState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("class_labels")
        if labels is None and args:
            try:
                labels = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get("class_labels")
            except TypeError:  # arguments forward itself refuses: it raises next
                labels = None
        self.state.labels = None if labels is None else labels.detach()


def _per_step_view(features: Tensor) -> Tensor:
    """(S, [K,] C) → (S, [K·]C): the values one (Δ, z) covers."""
    return features.reshape(features.shape[0], -1)


def quantize_cache(features: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8, same shape), Δ (S,) and z (S,) of one feature quantized per step with a min-max range."""
    flat = _per_step_view(features).float()
    scale, zero_point = scale_and_zero_point(flat.min(dim=1).values, flat.max(dim=1).values, bits, symmetric=False)
    codes = torch.clamp(torch.round(flat / scale[:, None]) + zero_point[:, None], 0, 2**bits - 1)
    return codes.to(torch.uint8).reshape(features.shape), scale, zero_point


def dequantize_cache(codes: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Δ·(codes − z) in the shape of ``codes``, (S, [K,] C)."""
    flat = _per_step_view(codes).float()
    return ((flat - zero_point[:, None]) * scale[:, None]).reshape(codes.shape)


def disturbance(estimate: Tensor, reference: Tensor) -> dict[str, float]:
    """Mean 1 − cos and mean relative L2 of ``estimate`` against ``reference`` over the items of dim 0.

    Args:
        estimate: features (N, C) served by one strategy.
        reference: FP features (N, C).
    """
    cosine, relative = disturbance_rows(estimate, reference)
    return {"cosine_distance": float(cosine.mean()), "relative_l2": float(relative.mean())}


def disturbance_rows(estimate: Tensor, reference: Tensor) -> tuple[Tensor, Tensor]:
    """1 − cos and relative L2 of each row (N,), float64: ``disturbance``'s terms, which a caller holding the
    features a few rows at a time concatenates before taking the means (the same numbers)."""
    estimate, reference = estimate.double(), reference.double()
    cosine = torch.nn.functional.cosine_similarity(estimate, reference, dim=1, eps=1e-12)
    relative = (estimate - reference).norm(dim=1) / reference.norm(dim=1).clamp_min(1e-12)
    return 1 - cosine, relative


def cache_bytes(num_values: int, bits: int | None, num_tables: int) -> int:
    """Bytes of a cache of ``num_values`` entries: float32, or ``bits``-bit codes packed plus (Δ, z) float32 pairs."""
    if bits is None:
        return 4 * num_values
    return math.ceil(num_values * bits / 8) + 8 * num_tables
