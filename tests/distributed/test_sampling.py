"""``sample_sharded`` draws exactly what ``tadq.sample`` draws for the same seed and batching."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq.api import sample
from tadq.distributed import sample_sharded
from tadq.safefiles import load_checked
from tadq.sampling import SamplerConfig


def load_samples(path):
    """samples.safetensors as one dict: its tensors and its JSON metadata."""
    tensors, meta = load_checked(path, "samples")
    return {**meta, **tensors}


def test_same_images_and_trajectory_as_tadq_sample(tmp_path: Path) -> None:
    model, scheduler = build_tiny_unet(), DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sampler = SamplerConfig("ddim", num_steps=3, eta=1.0)  # stochastic: the step noises must line up too
    expected = sample(model, scheduler, sampler, num_samples=7, seed=11, batch_size=2, record_trajectory=True,
                      progress=False)
    report = sample_sharded(model, scheduler, sampler, num_samples=7, seed=11, out_dir=tmp_path, batch_size=2,
                            chunk_size=4, record_trajectory=True, progress=False)
    assert [(c.start, c.stop) for c in report.computed] == [(0, 4), (4, 7)]
    assert torch.equal(report.run.read(), expected.images)
    assert torch.equal(report.run.read(states=True), expected.trajectory.states)
    saved = load_samples(tmp_path / "samples.safetensors")
    assert torch.equal(saved["images"], expected.images) and torch.equal(saved["indices"], torch.arange(7))
