"""``evaluate_against_reference``'s prompt agreement: both rows score the label each sample asked for, read back by
the feature space, and labels it cannot read (or of the wrong count) are refused before anything is sampled."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

import tadq
from tadq.config import QuantConfig
from tadq.evaluation import evaluate_against_reference
from tadq.metrics.features import FeatureSpace, MetricMismatchError
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig("ddim", 2)


class _BrightnessLabels(FeatureSpace):
    """A label reader standing in for a classifier: label 1 for an image brighter than the middle grey, else 0."""

    name = "brightness"
    reads_labels = True

    def __init__(self) -> None:
        self.real = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def features(self, images: torch.Tensor, progress: bool = True) -> torch.Tensor:
        return images.flatten(1)[:, :4].double()

    def prompted_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        read = (images.flatten(1).mean(1) > 0).long()
        return float((read == labels).float().mean())


class _NoLabels(_BrightnessLabels):
    reads_labels = False


@pytest.fixture(scope="module")
def pair():
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    config = QuantConfig.from_preset("W8A8")
    config = dataclasses.replace(config, calibration=dataclasses.replace(
        config.calibration, sampler=SAMPLER, num_trajectories=2, num_steps_kept=2, samples_per_step=2, batch_size=4))
    fp = build_tiny_unet()
    return tadq.quantize(fp, scheduler, config, progress=False), fp, scheduler


def test_both_rows_score_the_labels_the_samples_asked_for(pair) -> None:
    qmodel, fp, scheduler = pair
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    features = _BrightnessLabels()
    evaluation = evaluate_against_reference(qmodel, fp, scheduler, SAMPLER, num_samples=6, seed=1000, batch_size=3,
                                            features=features, progress=False, expected_labels=labels)
    for run, metrics in ((evaluation.reference, evaluation.reference_metrics),
                         (evaluation.candidate, evaluation.candidate_metrics)):
        read = (run.images.clamp(-1, 1).flatten(1).mean(1) > 0).long()  # the samples as returned, read again here
        assert metrics.prompt_accuracy == float((read == labels).float().mean())
        assert metrics.to_dict()["prompt_accuracy"] == metrics.prompt_accuracy
    without = evaluate_against_reference(qmodel, fp, scheduler, SAMPLER, num_samples=6, seed=1000, batch_size=3,
                                         features=features, progress=False)
    assert without.candidate_metrics.prompt_accuracy is None


@pytest.mark.parametrize(("features", "labels", "error", "message"), [
    (None, torch.zeros(4, dtype=torch.long), MetricMismatchError, "no features"),
    (_NoLabels(), torch.zeros(4, dtype=torch.long), MetricMismatchError, "reads labels back"),
    (_BrightnessLabels(), torch.zeros(3, dtype=torch.long), ValueError, r"\(3,\) labels for 4 samples"),
])
def test_labels_that_cannot_be_scored_are_refused_before_sampling(pair, monkeypatch, features, labels, error,
                                                                  message) -> None:
    qmodel, fp, scheduler = pair
    import tadq.api

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the labels were checked")

    monkeypatch.setattr(tadq.api, "sample", no_sampling)
    with pytest.raises(error, match=message):
        evaluate_against_reference(qmodel, fp, scheduler, SAMPLER, num_samples=4, seed=1000, features=features,
                                   progress=False, expected_labels=labels)
