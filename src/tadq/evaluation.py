"""Quantized vs FP from the same noise: the metrics of the results table, shared by ``tadq run`` and ``tadq evaluate``.

Both samplers start from the same seed, so the paired metrics (PSNR, SSIM, label agreement, trajectory MSE)
compare the same initial noise; a Fréchet distance scores each set against real images in a feature space the
caller chooses (``tadq.metrics.features``): FD-digits for the shipped model, the user's own features otherwise, or
none — never features that do not fit the data.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tadq.metrics import per_step_mse, psnr_per_sample, ssim_per_sample
from tadq.metrics.features import DigitsFeatureSpace, FeatureSpace, MetricMismatchError
from tadq.metrics.image import SSIM_MIN_SIDE, SSIM_WINDOW
from tadq.provenance import check_same_architecture, check_same_weights
from tadq.registry import adapter_for
from tadq.safefiles import require_finite
from tadq.sampling import ConditionSource, SamplerConfig, SamplingResult

__all__ = [
    "QualityMetrics", "quality_metrics", "FDReference", "fd_reference", "Evaluation", "evaluate_against_reference",
    "check_same_architecture", "check_same_weights", "check_evaluation_seed",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityMetrics:
    """One row of the results table (paired metrics are ``None`` for the reference itself).

    Args:
        fd: Fréchet distance to the real images in the chosen feature space (lower is better); ``None`` without one.
        agreement: share of samples whose predicted label matches the reference sample's from the same noise;
            ``None`` when the feature space reads no labels.
        psnr: mean PSNR (dB) against the reference sample from the same noise.
        ssim: mean SSIM against the reference sample from the same noise; ``None`` for images smaller than its
            window (``ssim_measurable``).
        final_mse: MSE between the final states of the two trajectories.
        fd_key: the name the distance is reported under (``fd_digits`` for the shipped classifier).
        prompt_accuracy: share of samples read as the label their prompt asked for (conditional models with a
            label reader); ``None`` otherwise.
    """

    fd: float | None
    agreement: float | None
    psnr: float | None
    ssim: float | None
    final_mse: float
    fd_key: str = "fd_digits"
    prompt_accuracy: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        values = dataclasses.asdict(self)
        key, fd = values.pop("fd_key"), values.pop("fd")
        return {key: fd, **values}


FDReference = DigitsFeatureSpace  # the shipped default feature space (kept under its old name for the harness)


def fd_reference(resolution: int) -> DigitsFeatureSpace:
    """The shipped classifier, the training digits at ``resolution`` and the FD-digits floor."""
    return DigitsFeatureSpace(resolution)


def quality_metrics(
    images: Tensor, states: Tensor, reference_images: Tensor, reference_states: Tensor,
    features: FeatureSpace | None, expected_labels: Tensor | None = None, progress: bool = True,
) -> QualityMetrics:
    """Metrics of samples against reference samples drawn from the same noise.

    Latent models: pass decoded images (the VAE's output) and latent states, so image metrics read pixels and the
    per-step error reads the space the sampler walks in.

    Args:
        images: samples (N, C, H, W), any range (clamped to [-1, 1] here).
        states: their trajectory (S+1, N, C, H, W).
        reference_images: FP samples from the same noise (N, C, H, W); pass ``images`` itself for the FP row.
        reference_states: FP trajectory (S+1, N, C, H, W).
        features: the feature space of the Fréchet distance and agreement; ``None`` skips both.
        expected_labels: (N,) the label each sample was prompted with; measured by ``features.prompted_accuracy``.
        progress: show the feature-extraction bars of a long Fréchet distance.
    """
    if expected_labels is not None and features is None:
        raise ValueError("prompt agreement needs a feature space that reads labels; got expected_labels without one")
    is_reference = images is reference_images
    images, reference = images.clamp(-1, 1), reference_images.clamp(-1, 1)
    return QualityMetrics(
        fd=features.fd(images, progress) if features is not None else None,
        agreement=features.agreement(images, reference) if features is not None else None,
        psnr=None if is_reference else float(psnr_per_sample(images, reference).mean()),
        ssim=None if is_reference or not ssim_measurable(images.shape[1:]) else float(
            ssim_per_sample(images, reference).mean()),
        final_mse=float(per_step_mse(reference_states, states)[-1]),
        fd_key=features.metric_key if features is not None else "fd",
        prompt_accuracy=None if expected_labels is None else features.prompted_accuracy(images, expected_labels),
    )


def ssim_measurable(image_shape: Sequence[int]) -> bool:
    """Whether SSIM's window fits images of ``image_shape`` (C, H, W); said once when it does not, so the missing
    SSIM of a tiny pixel model is reported as not measured (–) instead of failing after both models sampled."""
    if min(image_shape[-2:]) >= SSIM_MIN_SIDE:
        return True
    logger.warning("SSIM not measured: images of %s×%s are smaller than its %d×%d window (at least %d×%d)",
                   image_shape[-2], image_shape[-1], SSIM_WINDOW, SSIM_WINDOW, SSIM_MIN_SIDE, SSIM_MIN_SIDE)
    return False


@dataclass(frozen=True)
class Evaluation:
    """A quantized model and its FP reference sampled from the same noise, with their metrics.

    Args:
        reference: the FP samples and trajectory.
        candidate: the quantized samples and trajectory.
        reference_metrics: the FP row (its FD-digits is the generator's own; paired metrics are ``None``).
        candidate_metrics: the quantized row.
        per_step_mse: MSE(x_t FP, x_t quantized) at every step, (S+1,), step 0 = x_T.
        fd_floor: real-vs-real distance in the feature space (a perfect generator's score), when known.
    """

    reference: SamplingResult
    candidate: SamplingResult
    reference_metrics: QualityMetrics
    candidate_metrics: QualityMetrics
    per_step_mse: Tensor
    fd_floor: float | None


def check_evaluation_seed(model: nn.Module, seed: int, flag: str = "seed") -> None:
    """Refuse an evaluation seed the model was calibrated, fitted or chosen on (its recipe's ``noise_seeds``):
    sample i of that seed is calibration trajectory i, so the scores would measure the model on its own noise. A
    model without a recipe (an FP model, a hand-built network) has none to compare."""
    recipe = getattr(model, "recipe", None)
    calibration = getattr(getattr(model, "config", None), "calibration", None)  # a QuantConfig without a recipe
    seeds = recipe.noise_seeds() if hasattr(recipe, "noise_seeds") else \
        {"calibration.seed": calibration.seed} if isinstance(getattr(calibration, "seed", None), int) else {}
    used = [where for where, value in seeds.items() if value == seed]
    if used:
        raise ValueError(f"{flag} {seed} is the seed of the model's {', '.join(used)}: evaluated on it, the model is "
                         "scored on the noise it was calibrated on; evaluate on another seed (the README's tables use "
                         "1000)")


def decoded_shape(shape: Sequence[int], decoder: Callable[[Tensor], Tensor] | None) -> tuple[int, ...]:
    """(C, H, W) of one image made from a sample of ``shape``: the sample itself without a decoder, else what the
    decoder (a latent model's VAE, which moves its input to its own device and dtype) returns for one."""
    if decoder is None:
        return tuple(shape)
    with torch.no_grad():
        return tuple(decoder(torch.zeros(1, *shape)).shape[1:])


def evaluate_against_reference(
    candidate: nn.Module, reference: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int,
    batch_size: int = 128, features: FeatureSpace | None = None, progress: bool = True,
    conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
    decoder: Callable[[Tensor], Tensor] | None = None, expected_labels: Tensor | None = None,
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
        features: the feature space of the Fréchet distance and label agreement (e.g. ``fd_reference(16)`` for the
            shipped digits model); ``None`` reports PSNR, SSIM and trajectory error only. Checked against the
            samples' shape before anything is sampled.
        conditions, guidance_scale: per-sample conditioning and classifier-free guidance of both runs (see
            ``tadq.api.sample``); a sample gets the same conditions in both.
        decoder: latents → images (a latent model's VAE): the image metrics and the returned samples are the
            decoded images, the per-step error stays in the latent space the sampler walks in.
        expected_labels: (num_samples,) the label each sample asks for (its prompt's digit, its class), read back
            by ``features`` as prompt agreement in both rows; checked before anything is sampled.
    """
    from tadq.api import sample

    check_same_architecture(candidate, reference)
    if expected_labels is not None:
        if features is None or not features.reads_labels:
            raise MetricMismatchError("prompt agreement needs a feature space that reads labels back (the shipped "
                                      f"classifiers); got {'no features' if features is None else features.name}")
        if tuple(expected_labels.shape) != (num_samples,):
            raise ValueError(f"expected_labels holds {tuple(expected_labels.shape)} labels for {num_samples} samples; "
                             "give one label per sample")
    check_evaluation_seed(candidate, seed)
    if features is not None:
        shape = getattr(candidate, "sample_shape", None) or adapter_for(candidate).sample_shape(candidate)
        features.check_fits(decoded_shape(shape, decoder), "the model's samples")  # the features read images
        if num_samples < 2:  # refused now, not after both models have sampled
            raise MetricMismatchError(f"FD-{features.name} needs at least 2 samples for a covariance, got "
                                      f"num_samples={num_samples}; sample more or measure without features")
    runs = {}
    for name, model in (("FP", reference), ("quantized", candidate)):
        logger.info("sampling the %s model (%d samples, %s, seed %d)", name, num_samples, sampler.key, seed)
        runs[name] = sample(model, scheduler, sampler, num_samples=num_samples, seed=seed, batch_size=batch_size,
                            record_trajectory=True, progress=progress, conditions=conditions,
                            guidance_scale=guidance_scale)
    for name, run in runs.items():  # before any metric: NaN would hang scipy's sqrtm and poison every mean
        require_finite(run.images, f"the {name} model's samples")
    if decoder is not None:
        runs = {name: dataclasses.replace(run, images=decoder(run.images)) for name, run in runs.items()}
        for name, run in runs.items():  # a VAE overflowing to Inf scored 100 dB after clamping
            require_finite(run.images, f"the {name} model's decoded images")
    fp, quantized = runs["FP"], runs["quantized"]
    if fp.images.shape != quantized.images.shape:
        raise ValueError(f"the reference samples {tuple(fp.images.shape[1:])} but the quantized model "
                         f"{tuple(quantized.images.shape[1:])}: pass the FP model it was quantized from")
    fp_states, q_states = fp.trajectory.states, quantized.trajectory.states
    return Evaluation(
        reference=fp, candidate=quantized,
        reference_metrics=quality_metrics(fp.images, fp_states, fp.images, fp_states, features, expected_labels,
                                          progress=progress),
        candidate_metrics=quality_metrics(quantized.images, q_states, fp.images, fp_states, features,
                                          expected_labels, progress=progress),
        per_step_mse=per_step_mse(fp_states, q_states),
        fd_floor=features.floor if features is not None else None,
    )
