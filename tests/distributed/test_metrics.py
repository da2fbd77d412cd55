"""Sharded metrics agree with the single-process harness and do not depend on the order chunks arrive in."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet
from tests.distributed.tiny_runs import RUN_FLAGS, TinySetup, run_cli

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


def _save_grey_model(path: Path, sample_size: int | tuple[int, int], seed: int) -> Path:
    """A tiny grey DDPM of another sample size than the shipped digits' (``build_tiny_unet``'s 8x8)."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
                 ).save_pretrained(path)
    return path


def test_a_size_without_real_digits_is_refused_before_sampling(tmp_path: Path) -> None:
    """A 4x4 grey model with metrics on sampled every chunk, then failed with "resolution must be one of (8, 16,
    32), got 4" (the real digits FD-digits compares with exist only at those sizes)."""
    from typer.testing import CliRunner

    from tadq.cli.app import app
    from tadq.zoo.data import SUPPORTED_RESOLUTIONS

    side = min(SUPPORTED_RESOLUTIONS) // 2
    model, run_dir = _save_grey_model(tmp_path / "model", side, 0), tmp_path / "run"
    result = CliRunner().invoke(app, ["sample-sharded", str(model), "--num-samples", "4", "--steps", "2",
                                      "--batch-size", "2", "--threads", "1", "--out-dir", str(run_dir)])
    assert result.exit_code == 2 and "--no-metrics" in result.output, result.output
    chunks = sorted(p.name for p in run_dir.rglob("*.safetensors")) if run_dir.exists() else []
    assert not chunks, f"samples were written before the refusal: {chunks}"


def test_images_below_the_ssim_window_report_ssim_as_not_measured(tmp_path: Path) -> None:
    """4x8 grey samples (real digits exist at width 8): the sharded paired metrics failed with "SSIM needs images
    of at least 6x6" after the whole run; ``quality_metrics`` reports SSIM as not measured and the rest as usual."""
    from tadq.metrics.image import SSIM_MIN_SIDE
    from tadq.zoo.data import SUPPORTED_RESOLUTIONS

    width = min(SUPPORTED_RESOLUTIONS)
    height = width // 2
    assert height < SSIM_MIN_SIDE  # the case under test
    runs = {}
    for name, seed in (("reference", 1), ("candidate", 0)):
        model = _save_grey_model(tmp_path / name, (height, width), seed)
        extra = ["--no-metrics"] if name == "reference" else ["--reference-dir", str(runs["reference"])]
        runs[name] = tmp_path / f"{name}-run"
        run_cli(["sample-sharded", str(model), *RUN_FLAGS, "--out-dir", str(runs[name]), *extra])
    run, reference = ShardedRun.open(runs["candidate"]), ShardedRun.open(runs["reference"])
    sharded = sharded_metrics(run, reference=reference)
    states, reference_states = run.read(states=True), reference.read(states=True)
    whole = quality_metrics(run.read(), states, reference.read(), reference_states, fd_reference(width))
    assert sharded.ssim is None and whole.ssim is None
    assert sharded.fd_digits == pytest.approx(whole.fd, rel=1e-6) and sharded.agreement == whole.agreement
    assert sharded.psnr == pytest.approx(whole.psnr, rel=1e-6)
    assert sharded.final_mse == pytest.approx(whole.final_mse, rel=1e-9)
    assert json.loads((runs["candidate"] / "metrics.json").read_text())["metrics"] == sharded.to_dict()


def test_the_feature_bars_follow_the_callers_progress_setting(tiny_setup: TinySetup, monkeypatch) -> None:
    """A chunk of 20 or more feature batches drew its bar whatever the caller (or ``tadq --quiet``) said."""
    import tadq.distributed.metrics as metrics

    asked: list[bool] = []

    def recorded(images, classifier, *args, progress: bool = True, **options):
        asked.append(progress)
        return digit_features(images, classifier, *args, progress=progress, **options)

    monkeypatch.setattr(metrics, "digit_features", recorded)
    run = ShardedRun.open(tiny_setup.candidate_run)
    hidden = sharded_metrics(run, progress=False)
    assert asked and not any(asked)
    asked.clear()
    assert sharded_metrics(run) == hidden and asked and all(asked)
