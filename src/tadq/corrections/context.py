"""``FitContext``: what every correction fit walks — the two networks, the plan, the sample shape, the bit label,
the per-sample conditions and how the work is batched — in one record instead of a dozen parameters."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from tadq.corrections.fp_cache import FPTrajectoryCache
from tadq.sampling import ConditionSource, Denoiser, SamplingPlan, WalkBatch, Walker

__all__ = ["FitContext", "bits_of", "shape_of", "single_placement"]


def single_placement(model: object) -> tuple[torch.device | None, torch.dtype | None]:
    """(device, dtype) of a module's floating parameters, each ``None`` unless they all share one (a callable, a
    model split over devices or dtypes: the caller keeps its default there)."""
    floating = [p for p in model.parameters() if p.is_floating_point()] if isinstance(model, nn.Module) else []
    devices, dtypes = {p.device for p in floating}, {p.dtype for p in floating}
    return (next(iter(devices)) if len(devices) == 1 else None), (next(iter(dtypes)) if len(dtypes) == 1 else None)


def bits_of(q_denoiser: Denoiser, bits: str | None) -> str:
    """``bits``, or the quantized denoiser's ``config.label``; ``ValueError`` when neither says."""
    if bits is not None:
        return bits
    label = getattr(getattr(q_denoiser, "config", None), "label", None)
    if not isinstance(label, str):
        raise ValueError("cannot tell the quantized model's bit label; pass bits='W4A8' (or similar) explicitly")
    return label


def shape_of(q_denoiser: Denoiser, sample_shape: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``sample_shape``, or the quantized denoiser's own; ``ValueError`` when neither says."""
    if sample_shape is not None:
        return tuple(sample_shape)  # type: ignore[return-value]
    shape = getattr(q_denoiser, "sample_shape", None)
    if shape is None:
        raise ValueError("cannot tell the sample shape; pass sample_shape=(C, H, W) explicitly")
    return tuple(shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class FitContext:
    """The fixed inputs of a correction fit.

    Args:
        fp_denoiser: ``(x, t, cond) -> prediction`` of the FP model.
        q_denoiser: The quantized network *without* the corrections being fitted (those are passed as hooks).
        plan: The deployment plan (sampler and guidance scale); every fitted table is keyed by it.
        sample_shape: (C, H, W).
        bits: Bit label of the quantized model (tables are keyed by it).
        conditions: Per-sample conditions (``None``: unconditional model).
        batch_size: Samples per network call; does not change the result.
        device: Where the networks and states live.
        fp_trajectories: FP trajectories kept between fits on the same FP network (``fp_denoiser`` must be that
            cache's network); ``None``: every fit walks its own.
        progress: Show a tqdm bar over the steps of each walk (a fit takes minutes at the default sizes).
        dtype: Floating dtype of the states (the quantized network's, as ``tadq.sample`` walks them); ``None``
            keeps the noise's float32.
    """

    fp_denoiser: Denoiser
    q_denoiser: Denoiser
    plan: SamplingPlan
    sample_shape: tuple[int, int, int]
    bits: str
    conditions: ConditionSource | None = None
    batch_size: int = 128
    device: str | torch.device = "cpu"
    fp_trajectories: FPTrajectoryCache | None = None
    progress: bool = True
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.plan, SamplingPlan):
            raise TypeError(f"FitContext.plan must be a SamplingPlan, got {type(self.plan).__name__}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")

    @classmethod
    def of(cls, fp_denoiser: Denoiser, q_denoiser: Denoiser, plan: SamplingPlan, *,
           sample_shape: tuple[int, int, int] | None = None, bits: str | None = None,
           conditions: ConditionSource | None = None, batch_size: int = 128,
           device: str | torch.device | None = None, fp_trajectories: FPTrajectoryCache | None = None,
           progress: bool = True, dtype: torch.dtype | None = None) -> FitContext:
        """A context whose shape, bit label, device and dtype default to the quantized denoiser's own: the states
        the fit walks are placed as ``tadq.sample`` places them (a float64 or CUDA model was fed float32 CPU states
        and failed inside its first layer)."""
        own_device, own_dtype = single_placement(q_denoiser)
        if device is None:
            device = own_device if own_device is not None else "cpu"
        if dtype is None:
            dtype = own_dtype
        return cls(fp_denoiser, q_denoiser, plan, shape_of(q_denoiser, sample_shape), bits_of(q_denoiser, bits),
                   conditions, batch_size, device, fp_trajectories, progress, dtype)

    def walker(self) -> Walker:
        """The walker of this context's plan on its device."""
        return Walker(self.plan, self.device, self.dtype)

    def batches(self, seed: int, num_samples: int, batch_size: int | None = None) -> Iterator[WalkBatch]:
        """Samples 0..N-1 of ``seed`` in batches of ``batch_size`` (default: the context's)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        size = self.batch_size if batch_size is None else batch_size
        walker = self.walker()
        for start in range(0, num_samples, size):
            yield walker.batch(seed, range(start, min(start + size, num_samples)), self.sample_shape,
                               self.conditions)
