"""Metrics of a sharded run, computed by all ranks and identical for any number of them.

Each rank turns its chunks into per-sample quantities (classifier features and labels, PSNR, SSIM, per-step MSE
against a reference run from the same noise); rank 0 gathers them, puts them back in chunk order and reduces once.
Floating-point all-reduce sums would add the partial sums in an order that depends on the number of ranks; gathering
per-sample values instead makes 1 and N workers give bit-identical metrics. The reductions follow
``tadq.evaluation.quality_metrics`` (images clamped to [-1, 1]; the final MSE on the raw final states).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tadq.distributed.key import conditioning_key, sampler_fields
from tadq.distributed.shards import ChunkRange, assign_chunks
from tadq.distributed.store import ShardedRun
from tadq.distributed.world import World
from tadq.evaluation import decoded_shape
from tadq.metrics import (
    DigitClassifier,
    digit_features,
    frechet_distance,
    gaussian_statistics,
    load_digit_classifier,
    predicted_labels,
    psnr_per_sample,
    ssim_per_sample,
)
from tadq.metrics.image import SSIM_MIN_SIDE
from tadq.sampling import SamplerConfig, check_guidance_scale

__all__ = ["ChunkStatistics", "ShardedMetrics", "check_metrics_fit", "check_reference", "check_reference_noise",
           "chunk_statistics", "sharded_metrics"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkStatistics:
    """Per-sample quantities of one chunk, everything the run-level metrics are reduced from.

    Args:
        chunk: The sample range.
        features: Digit-classifier features (n, D), float64.
        labels: Predicted digits (n,).
        reference_labels: Predicted digits of the reference samples (n,), or ``None`` without a reference.
        psnr: PSNR (n,) in dB against the reference sample from the same noise.
        ssim: SSIM (n,) against the reference sample; ``None`` for images smaller than its window.
        step_mse: Per-sample MSE against the reference (n, K), float64: K = S+1 states when both runs recorded
            their trajectories, else K = 1 (the final state only).
    """

    chunk: ChunkRange
    features: Tensor
    labels: Tensor
    reference_labels: Tensor | None = None
    psnr: Tensor | None = None
    ssim: Tensor | None = None
    step_mse: Tensor | None = None


@dataclass(frozen=True)
class ShardedMetrics:
    """One results-table row of a sharded run (paired metrics are ``None`` without a reference run).

    Args:
        num_samples: Samples measured.
        fd_digits: Fréchet distance to the real training digits on the digit classifier's features.
        fd_floor: Real-vs-real FD-digits (what a perfect generator scores), when the shipped classifier is used.
        agreement: Share of samples whose predicted digit matches the reference sample's.
        psnr: Mean PSNR (dB) against the reference samples.
        ssim: Mean SSIM against the reference samples; ``None`` for images smaller than its window (as
            ``tadq.evaluation.quality_metrics`` reports it).
        final_mse: MSE between the final states of the two runs.
        per_step_mse: MSE at every state x_T .. x_0 (S+1 values) when both runs recorded trajectories.
    """

    num_samples: int
    fd_digits: float
    fd_floor: float | None = None
    agreement: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    final_mse: float | None = None
    per_step_mse: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _per_sample_mse(states: Tensor, reference_states: Tensor) -> Tensor:
    """(K, n, C, H, W) pairs -> per-sample MSE (n, K) in float64."""
    difference = states.double() - reference_states.double()
    return difference.square().flatten(start_dim=2).mean(dim=2).T


def chunk_statistics(
    chunk: ChunkRange, images: Tensor, classifier: DigitClassifier, reference_images: Tensor | None = None,
    states: Tensor | None = None, reference_states: Tensor | None = None, progress: bool = True,
) -> ChunkStatistics:
    """Per-sample quantities of one chunk of images (n, C, H, W), optionally against the reference's.

    ``states`` / ``reference_states`` (S+1, n, C, H, W) give per-step MSE when both are present; otherwise only the
    final MSE is computed, from the unclamped images. ``progress=False`` hides a large chunk's feature bar.
    """
    clamped = images.clamp(-1, 1)
    features = digit_features(clamped, classifier, progress=progress)
    labels = predicted_labels(clamped, classifier)
    if reference_images is None:
        return ChunkStatistics(chunk, features, labels)
    reference = reference_images.clamp(-1, 1)
    # below SSIM's window: not measured, as in quality_metrics (it raised once the whole run had been sampled)
    ssim = ssim_per_sample(clamped, reference) if min(images.shape[-2:]) >= SSIM_MIN_SIDE else None
    if states is not None and reference_states is not None:
        step_mse = _per_sample_mse(states, reference_states)
    else:
        step_mse = _per_sample_mse(images[None], reference_images[None])
    return ChunkStatistics(chunk, features, labels, reference_labels=predicted_labels(reference, classifier),
                           psnr=psnr_per_sample(clamped, reference), ssim=ssim,
                           step_mse=step_mse)


def check_metrics_fit(sample_shape: tuple[int, ...] | list[int], real_given: bool = False) -> None:
    """Raise unless sharded metrics can measure samples of ``sample_shape`` (C, H, W), so ``sample-sharded`` refuses
    them before any chunk is sampled (a size without real digits was refused only after the whole run).

    Args:
        sample_shape: the model's (C, H, W).
        real_given: the caller passes its own real images (no real digits are loaded for the run's size).
    """
    from tadq.zoo.data import SUPPORTED_RESOLUTIONS

    if sample_shape[0] != 1:
        raise ValueError(f"FD-digits and agreement read grey (1-channel) digits, but the samples are "
                         f"{tuple(sample_shape)} (C, H, W); sample without metrics (--no-metrics)")
    if not real_given and sample_shape[-1] not in SUPPORTED_RESOLUTIONS:
        raise ValueError(f"FD-digits compares the samples with the real digits at their size, which exist at "
                         f"{SUPPORTED_RESOLUTIONS} pixels, but the samples are {tuple(sample_shape)} (C, H, W); "
                         "sample without metrics (--no-metrics)")


def check_reference_noise(reference: ShardedRun, *, seed: int, sampler: SamplerConfig,
                          sample_shape: tuple[int, ...], num_samples: int, conditions: Any = None,
                          guidance_scale: float = 1.0) -> None:
    """``check_reference``'s fields against the run about to be sampled, so a reference of other noise, labels or
    guidance is refused before any chunk (it was refused only once the whole run had been sampled; the labels and
    guidance were not compared here at all). ``conditions`` and ``guidance_scale`` as ``sample_sharded`` takes
    them (a ``ConditionSource`` or ``None``)."""
    planned = {"seed": int(seed), "sampler": sampler_fields(sampler), "sample_shape": [int(d) for d in sample_shape],
               "conditioning": conditioning_key(conditions, check_guidance_scale(guidance_scale))}
    planned = json.loads(json.dumps(planned))  # as the manifest reads back: tuples as lists
    for field, value in planned.items():
        if reference.key.get(field) != value:
            raise ValueError(f"paired metrics compare samples from the same noise, but the reference run "
                             f"{reference.out_dir} has {field}={reference.key.get(field)!r} and this run {value!r}; "
                             "sample the FP model with the same --seed/--sampler/--steps/--eta (and labels and "
                             "guidance)")
    if reference.num_samples < num_samples:
        raise ValueError(f"the reference run {reference.out_dir} has {reference.num_samples} samples, this run "
                         f"{num_samples}; sample the reference with at least as many")


def check_reference(run: ShardedRun, reference: ShardedRun) -> None:
    """Raise unless ``reference`` sampled the same noise (seed, sampler, shape) for at least ``run``'s indices."""
    for field in ("seed", "sampler", "sample_shape", "conditioning"):  # labels and guidance pair the samples too
        if run.key.get(field) != reference.key.get(field):
            raise ValueError(f"paired metrics compare samples from the same noise, but the reference run "
                             f"{reference.out_dir} has {field}={reference.key.get(field)!r} and this run "
                             f"{run.key.get(field)!r}; sample the FP model with the same --seed/--sampler/--steps/"
                             "--eta (and labels and guidance)")
    if reference.num_samples < run.num_samples:
        raise ValueError(f"the reference run {reference.out_dir} has {reference.num_samples} samples, this run "
                         f"{run.num_samples}; sample the reference with at least as many")
    if run.key["model_fingerprint"] == reference.key["model_fingerprint"]:
        logger.warning("the reference run %s was sampled from the same model as %s", reference.out_dir, run.out_dir)


def _statistics(run: ShardedRun, reference: ShardedRun | None, chunk: ChunkRange,
                classifier: DigitClassifier, progress: bool,
                decoder: Callable[[Tensor], Tensor] | None = None) -> ChunkStatistics:
    payload = run.load_chunk(chunk)
    images = payload["images"] if decoder is None else decoder(payload["images"])
    if reference is None:
        return chunk_statistics(chunk, images, classifier, progress=progress)
    both_recorded = run.key["record_trajectory"] and reference.key["record_trajectory"]
    states = payload["states"] if both_recorded else None  # a latent model's per-step error stays in its latents
    reference_states = reference.read(chunk.start, chunk.stop, states=True) if both_recorded else None
    reference_images = reference.read(chunk.start, chunk.stop)
    if decoder is not None:
        reference_images = decoder(reference_images)
        if states is None:  # the final error in the latents the sampler walked in, as tadq evaluate reports it
            states, reference_states = payload["images"][None], reference.read(chunk.start, chunk.stop)[None]
    return chunk_statistics(chunk, images, classifier, reference_images, states, reference_states,
                            progress=progress)


def _reduce(parts: list[ChunkStatistics], chunks: tuple[ChunkRange, ...], real_statistics: tuple,
            fd_floor: float | None) -> ShardedMetrics:
    """Concatenate per-sample values in chunk order and reduce once (rank 0)."""
    parts = sorted(parts, key=lambda part: part.chunk.start)
    if tuple(part.chunk for part in parts) != chunks:
        raise RuntimeError("the gathered chunk statistics do not cover the run exactly once")
    mu, sigma = gaussian_statistics(torch.cat([part.features for part in parts]))
    metrics = {"num_samples": chunks[-1].stop, "fd_digits": frechet_distance(*real_statistics, mu, sigma),
               "fd_floor": fd_floor}
    if parts[0].reference_labels is not None:
        labels = torch.cat([part.labels for part in parts])
        same = labels == torch.cat([part.reference_labels for part in parts])
        step_mse = torch.cat([part.step_mse for part in parts]).mean(dim=0)  # (K,)
        metrics.update(agreement=float(same.float().mean()),
                       psnr=float(torch.cat([part.psnr for part in parts]).mean()),
                       ssim=None if parts[0].ssim is None else float(torch.cat([part.ssim for part in parts]).mean()),
                       final_mse=float(step_mse[-1]),
                       per_step_mse=step_mse.tolist() if len(step_mse) > 1 else None)
    return ShardedMetrics(**metrics)


@functools.lru_cache(maxsize=4)
def _shipped_reference(resolution: int) -> tuple[Tensor, float]:
    """Training digits and FD floor of the shipped classifier, once per process (loading digits costs seconds)."""
    from tadq.evaluation import fd_reference

    reference = fd_reference(resolution)
    return reference.real, reference.floor


def _real_and_floor(resolution: int, real: Tensor | None, shipped_classifier: bool) -> tuple[Tensor, float | None]:
    """The real images FD is measured against and, for the shipped classifier and digits, the real-vs-real floor."""
    from tadq.zoo.data import DigitsConfig, load_digits_split

    if real is None and shipped_classifier:
        return _shipped_reference(resolution)
    if real is None:
        real = load_digits_split(DigitsConfig(resolution=resolution)).train_images
    return real, None


def sharded_metrics(
    run: ShardedRun, *, reference: ShardedRun | None = None, world: World | None = None,
    classifier: DigitClassifier | None = None, real: Tensor | None = None, progress: bool = True,
    decoder: Callable[[Tensor], Tensor] | None = None,
) -> ShardedMetrics:
    """FD-digits of ``run`` (and agreement, PSNR, SSIM, MSE against ``reference``), computed by all ranks.

    Call it on every rank; every rank returns the same ``ShardedMetrics``. The result does not depend on the
    number of ranks (per-sample values are gathered in chunk order, see the module docstring).

    Args:
        run: The sampled run (``ShardedSamplingReport.run`` or ``ShardedRun.open(dir)``).
        reference: The FP run from the same seed and sampler, for the paired metrics.
        world: This process's ``World`` (default: ``World.current()``).
        classifier: Feature extractor (default: the shipped digits classifier, which also gives ``fd_floor``).
        real: Real images (M, 1, H, W) in [-1, 1] for FD (default: the training digits at the run's resolution).
        progress: the feature-extraction bars of large chunks and real sets, on rank 0 (as ``sample_sharded``'s).
        decoder: latents → images in [-1, 1] (a latent model's VAE, ``tadq.experiments.workload.vae_decoder``):
            the image metrics read the decoded images of both runs, the MSE stays in the latent space the
            sampler walks in; ``None``: the samples are images.
    """
    world = world or World.current()
    image_shape = decoded_shape(tuple(run.key["sample_shape"]), decoder)
    check_metrics_fit(image_shape, real_given=real is not None)
    if run.num_samples < 2:
        raise ValueError("FD-digits needs at least 2 samples for a covariance")
    if reference is not None:
        check_reference(run, reference)
        if min(image_shape[-2:]) < SSIM_MIN_SIDE:
            logger.warning("SSIM not measured: %s images are smaller than its window (at least %d×%d)",
                           "×".join(map(str, image_shape[-2:])), SSIM_MIN_SIDE, SSIM_MIN_SIDE)
    extractor = (classifier or load_digit_classifier()).to(world.device)
    mine = assign_chunks(run.chunks, world.rank, world.world_size)
    progress = progress and world.is_main
    gathered = world.gather([_statistics(run, reference, chunk, extractor, progress, decoder) for chunk in mine])

    def reduce() -> ShardedMetrics:
        real_images, floor = _real_and_floor(image_shape[-1], real, shipped_classifier=classifier is None)
        real_statistics = gaussian_statistics(digit_features(real_images, extractor, progress=progress))
        return _reduce([part for rank_parts in gathered for part in rank_parts], run.chunks, real_statistics, floor)

    return world.on_main(reduce)
