"""Metrics for quantized diffusion samples: FD-digits, paired image metrics, trajectory divergence, Inception FID.

FD-digits and classifier agreement use the tadq digits classifier (``load_digit_classifier()``) as their feature
extractor; Inception FID needs a local TorchScript Inception file (see ``tadq.metrics.inception``).
"""

from tadq.metrics.classifier import (
    ClassifierTrainConfig,
    DigitClassifier,
    default_classifier_path,
    load_digit_classifier,
    save_digit_classifier,
    train_digit_classifier,
)
from tadq.metrics.frechet import (
    DigitFeatures,
    digit_features,
    fd_digits,
    fd_digits_reference,
    frechet_distance,
    gaussian_statistics,
)
from tadq.metrics.image import classifier_agreement, predicted_labels, psnr_per_sample, ssim_per_sample
from tadq.metrics.inception import InceptionFeatures, inception_fid
from tadq.metrics.trajectory import as_state_stack, per_step_cosine, per_step_mse

__all__ = [
    "ClassifierTrainConfig",
    "DigitClassifier",
    "DigitFeatures",
    "InceptionFeatures",
    "as_state_stack",
    "classifier_agreement",
    "default_classifier_path",
    "digit_features",
    "fd_digits",
    "fd_digits_reference",
    "frechet_distance",
    "gaussian_statistics",
    "inception_fid",
    "load_digit_classifier",
    "per_step_cosine",
    "per_step_mse",
    "predicted_labels",
    "psnr_per_sample",
    "save_digit_classifier",
    "ssim_per_sample",
    "train_digit_classifier",
]
