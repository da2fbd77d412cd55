"""The shipped photos DDPM loads through tadq and is class-conditional; its training loop resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import build_tiny_unet

from tadq.models import load_pipeline_parts
from tadq.zoo.photos import num_photo_classes
from tadq.zoo.photos_model import PhotosTrainConfig, build_photos_unet, null_label
from tadq.zoo.train import CHECKPOINT_NAME, train_ddpm

SHIPPED = Path(__file__).resolve().parents[2] / "src" / "tadq" / "zoo" / "weights" / "photos-ddpm"


def test_shipped_model_loads_and_predicts_eps_for_a_label_batch():
    model, scheduler = load_pipeline_parts(SHIPPED)
    k = num_photo_classes()
    assert model.config.num_class_embeds == k + 1 and null_label() == k
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, k - 1, k, 3])
    with torch.no_grad():
        eps = model(x, torch.full((4,), 500), class_labels=labels).sample
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    info = json.loads((Path(SHIPPED) / "training_info.json").read_text())
    assert info["config"]["seed"] == 0 and info["wall_time_s"] > 0


def test_architecture_matches_the_issue_measurement():
    unet = build_photos_unet()
    assert unet.config.block_out_channels == (32, 64, 64) and unet.config.in_channels == 3
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"  # attention at 16x16 for 32x32 input


class _Interrupt(Exception):
    pass


def _train(out, steps, config, fail_at_call=None):
    """A tiny class-conditional run; ``fail_at_call`` interrupts it at that UNet call (as a killed process would)."""
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    unet = build_tiny_unet(0, num_class_embeds=4)
    if fail_at_call is not None:
        calls, forward = [0], unet.forward

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at_call:
                raise _Interrupt
            return forward(*args, **kwargs)

        unet.forward = failing
    return train_ddpm(PhotosTrainConfig(**{**vars(config), "steps": steps}), unet, images, out,
                      labels=torch.arange(16) % 3, null_label=3, label_dropout=config.label_dropout)


def test_resumed_run_with_other_steps_equals_the_uninterrupted_run(tmp_path):
    """Killed at step 4 of 6 (checkpoint at 2), resumed with steps=4: the weights of a 4-step run from scratch."""
    config = PhotosTrainConfig(batch_size=4, warmup_steps=2, checkpoint_every=2, label_dropout=0.5)
    straight = _train(tmp_path / "straight", 4, config)
    with pytest.raises(_Interrupt):
        _train(tmp_path / "resumed", 6, config, fail_at_call=4)
    assert (tmp_path / "resumed" / CHECKPOINT_NAME).is_file()
    resumed = _train(tmp_path / "resumed", 4, config)
    assert not (resumed / CHECKPOINT_NAME).exists()
    a = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    info_a = json.loads((straight / "training_info.json").read_text())
    info_b = json.loads((resumed / "training_info.json").read_text())
    assert info_a["final_batch_loss"] == info_b["final_batch_loss"]
    assert info_a["mean_loss_last_100_steps"] == info_b["mean_loss_last_100_steps"]


def test_resume_refuses_another_config(tmp_path):
    config = PhotosTrainConfig(batch_size=4, warmup_steps=2, checkpoint_every=2, label_dropout=0.5)
    with pytest.raises(_Interrupt):
        _train(tmp_path / "run", 6, config, fail_at_call=4)
    with pytest.raises(ValueError, match="different TrainConfig"):
        _train(tmp_path / "run", 6, PhotosTrainConfig(**{**vars(config), "label_dropout": 0.2}))
