"""Quantized vs FP from the same noise: the metrics of the results table, shared by ``tadq run`` and ``tadq evaluate``.

Both samplers start from the same seed, so the paired metrics (PSNR, SSIM, classifier agreement, trajectory MSE)
compare the same initial noise; FD-digits scores each set against the real training digits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from torch import Tensor, nn

from tadq.metrics import (
    DigitClassifier,
    classifier_agreement,
    fd_digits,
    fd_digits_reference,
    load_digit_classifier,
    per_step_mse,
    psnr_per_sample,
    ssim_per_sample,
)
from tadq.sampling import SamplerConfig, SamplingResult
from tadq.zoo.data import DigitsConfig, load_digits_split

__all__ = [
    "QualityMetrics", "quality_metrics", "FDReference", "fd_reference", "Evaluation", "evaluate_against_reference",
    "check_same_architecture",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityMetrics:
    """One row of the results table (paired metrics are ``None`` for the reference itself).

    Args:
        fd_digits: Fréchet distance to the real training digits on the digit classifier's features (lower is better).
        agreement: share of samples whose predicted digit matches the reference sample's from the same noise.
        psnr: mean PSNR (dB) against the reference sample from the same noise.
        ssim: mean SSIM against the reference sample from the same noise.
        final_mse: MSE between the final states of the two trajectories.
    """

    fd_digits: float
    agreement: float
    psnr: float | None
    ssim: float | None
    final_mse: float

    def to_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FDReference:
    """What every FD-digits table is measured against: the classifier, the real training digits, and the
    real-vs-real floor (all held-out digits vs the same training digits)."""

    classifier: DigitClassifier
    real: Tensor
    floor: float
    heldout_count: int


def fd_reference(resolution: int) -> FDReference:
    """The shipped classifier, the training digits at ``resolution`` and the FD-digits floor."""
    classifier = load_digit_classifier()
    digits_config = DigitsConfig(resolution=resolution)
    digits = load_digits_split(digits_config)
    floor = fd_digits_reference(n=len(digits.heldout_images), seed=0, classifier=classifier, digits=digits_config,
                                reference_set="train")
    return FDReference(classifier, digits.train_images, floor, len(digits.heldout_images))


def quality_metrics(
    images: Tensor, states: Tensor, reference_images: Tensor, reference_states: Tensor, real: Tensor,
    classifier: DigitClassifier,
) -> QualityMetrics:
    """Metrics of samples against reference samples drawn from the same noise.

    Args:
        images: samples (N, C, H, W), any range (clamped to [-1, 1] here).
        states: their trajectory (S+1, N, C, H, W).
        reference_images: FP samples from the same noise (N, C, H, W); pass ``images`` itself for the FP row.
        reference_states: FP trajectory (S+1, N, C, H, W).
        real: real images (M, C, H, W) in [-1, 1] for FD-digits.
        classifier: the digit classifier behind FD-digits and agreement.
    """
    is_reference = images is reference_images
    images, reference = images.clamp(-1, 1), reference_images.clamp(-1, 1)
    return QualityMetrics(
        fd_digits=fd_digits(real, images, classifier),
        agreement=classifier_agreement(images, reference, classifier),
        psnr=None if is_reference else float(psnr_per_sample(images, reference).mean()),
        ssim=None if is_reference else float(ssim_per_sample(images, reference).mean()),
        final_mse=float(per_step_mse(reference_states, states)[-1]),
    )


@dataclass(frozen=True)
class Evaluation:
    """A quantized model and its FP reference sampled from the same noise, with their metrics.

    Args:
        reference: the FP samples and trajectory.
        candidate: the quantized samples and trajectory.
        reference_metrics: the FP row (its FD-digits is the generator's own; paired metrics are ``None``).
        candidate_metrics: the quantized row.
        per_step_mse: MSE(x_t FP, x_t quantized) at every step, (S+1,), step 0 = x_T.
        fd_floor: real-vs-real FD-digits, the score a perfect generator would get.
    """

    reference: SamplingResult
    candidate: SamplingResult
    reference_metrics: QualityMetrics
    candidate_metrics: QualityMetrics
    per_step_mse: Tensor
    fd_floor: float


def _public_config(model: nn.Module) -> dict | None:
    config = getattr(getattr(model, "model", model), "config", None)  # a QuantizedDenoiser wraps its model
    if config is None:
        return None
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


def check_same_architecture(candidate: nn.Module, reference: nn.Module) -> None:
    """Raise unless both models have the same diffusers config: paired metrics against another model mean nothing."""
    mine, theirs = _public_config(candidate), _public_config(reference)
    if mine is None or theirs is None:
        return
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differing:
        raise ValueError(f"the reference model's config differs from the quantized model's at {differing[:5]}; "
                         "pass the FP model it was quantized from")


def evaluate_against_reference(
    candidate: nn.Module, reference: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int,
    batch_size: int = 128, progress: bool = True,
) -> Evaluation:
    """Sample ``candidate`` (a ``QuantizedDenoiser``) and its FP ``reference`` from the same noise and compare them.

    Args:
        candidate: the quantized denoiser.
        reference: the FP diffusers model it was quantized from.
        scheduler: the training scheduler (its config builds the sampler's scheduler for both).
        sampler: the deployment sampler.
        num_samples: samples per model (FD-digits needs about 1000 to mean something; PSNR far fewer).
        seed: noise seed shared by both models.
        batch_size: sampling batch.
    """
    from tadq.api import sample

    check_same_architecture(candidate, reference)
    runs = {}
    for name, model in (("FP", reference), ("quantized", candidate)):
        logger.info("sampling the %s model (%d samples, %s, seed %d)", name, num_samples, sampler.key, seed)
        runs[name] = sample(model, scheduler, sampler, num_samples=num_samples, seed=seed, batch_size=batch_size,
                            record_trajectory=True, progress=progress)
    fp, quantized = runs["FP"], runs["quantized"]
    if fp.images.shape != quantized.images.shape:
        raise ValueError(f"the reference samples {tuple(fp.images.shape[1:])} but the quantized model "
                         f"{tuple(quantized.images.shape[1:])}: pass the FP model it was quantized from")
    reference = fd_reference(fp.images.shape[-1])
    fp_states, q_states = fp.trajectory.states, quantized.trajectory.states
    return Evaluation(
        reference=fp, candidate=quantized,
        reference_metrics=quality_metrics(fp.images, fp_states, fp.images, fp_states, reference.real,
                                          reference.classifier),
        candidate_metrics=quality_metrics(quantized.images, q_states, fp.images, fp_states, reference.real,
                                          reference.classifier),
        per_step_mse=per_step_mse(fp_states, q_states),
        fd_floor=reference.floor,
    )
