"""Sharded metrics agree with the single-process harness and do not depend on the order chunks arrive in."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet
from tests.distributed.tiny_runs import TinySetup

from tadq.distributed import ChunkRange, ShardedRun, chunk_statistics, sample_sharded, sharded_metrics
from tadq.distributed.metrics import _reduce
from tadq.evaluation import fd_reference, quality_metrics
from tadq.metrics import digit_features, gaussian_statistics, load_digit_classifier, per_step_mse
from tadq.sampling import SamplerConfig


def test_matches_the_single_process_quality_metrics(tiny_setup: TinySetup) -> None:
    run, reference = ShardedRun.open(tiny_setup.candidate_run), ShardedRun.open(tiny_setup.reference_run)
    sharded = sharded_metrics(run, reference=reference)
    assert json.loads((tiny_setup.candidate_run / "metrics.json").read_text())["metrics"] == sharded.to_dict()
    real = fd_reference(run.key["sample_shape"][-1])
    states, reference_states = run.read(states=True), reference.read(states=True)
    whole = quality_metrics(run.read(), states, reference.read(), reference_states, real)
    assert sharded.fd_digits == pytest.approx(whole.fd, rel=1e-6)
    assert sharded.agreement == whole.agreement
    assert sharded.psnr == pytest.approx(whole.psnr, rel=1e-6) and sharded.ssim == pytest.approx(whole.ssim, rel=1e-6)
    assert sharded.final_mse == pytest.approx(whole.final_mse, rel=1e-9)
    assert sharded.per_step_mse == pytest.approx(per_step_mse(reference_states, states).tolist(), rel=1e-9)
    assert sharded.fd_floor == real.floor


def test_reduction_ignores_the_order_chunks_arrive_in(tiny_setup: TinySetup) -> None:
    run, reference = ShardedRun.open(tiny_setup.candidate_run), ShardedRun.open(tiny_setup.reference_run)
    real = fd_reference(run.key["sample_shape"][-1])
    parts = [chunk_statistics(chunk, run.load_chunk(chunk)["images"], real.classifier,
                              reference.read(chunk.start, chunk.stop)) for chunk in run.chunks]
    real_statistics = gaussian_statistics(digit_features(real.real, real.classifier))
    ordered = _reduce(parts, run.chunks, real_statistics, None)
    shuffled = parts[:]
    random.Random(0).shuffle(shuffled)
    assert _reduce(shuffled, run.chunks, real_statistics, None) == ordered
    assert ordered.per_step_mse is None and ordered.final_mse is not None  # final state only, from the images
    with pytest.raises(RuntimeError, match="exactly once"):
        _reduce(parts[1:], run.chunks, real_statistics, None)


def test_without_reference_only_fd(tiny_setup: TinySetup) -> None:
    metrics = sharded_metrics(ShardedRun.open(tiny_setup.reference_run))
    assert metrics.fd_digits > 0 and metrics.num_samples == 10
    assert (metrics.agreement, metrics.psnr, metrics.ssim, metrics.final_mse) == (None, None, None, None)


def test_reference_from_other_noise_raises(tiny_setup: TinySetup, tmp_path: Path) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    other = sample_sharded(build_tiny_unet(1), scheduler, SamplerConfig("ddim", num_steps=3), num_samples=10,
                           seed=123, out_dir=tmp_path, batch_size=2, progress=False, assemble=False).run
    with pytest.raises(ValueError, match="same noise.*seed"):
        sharded_metrics(ShardedRun.open(tiny_setup.candidate_run), reference=other)


def test_colour_runs_need_another_metric(tmp_path: Path) -> None:
    run = ShardedRun(tmp_path, {"sample_shape": [3, 8, 8]}, 4, {})
    with pytest.raises(ValueError, match="1-channel"):
        sharded_metrics(run)


def test_chunk_statistics_shapes() -> None:
    images, reference = torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1
    states = torch.stack([images, images])
    stats = chunk_statistics(ChunkRange(0, 3), images, load_digit_classifier(), reference, states,
                             torch.stack([reference, reference]))
    assert stats.features.dtype == torch.float64 and stats.features.shape[0] == 3
    assert stats.step_mse.shape == (3, 2) and stats.psnr.shape == (3,) and stats.reference_labels.shape == (3,)
