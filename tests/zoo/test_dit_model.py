"""The shipped class-conditional DiT: DiTPipeline layout, loads through tadq and diffusers, trains reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiTPipeline
from safetensors.torch import load_file

from tadq.experiments.workload import load_workload
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.zoo import dit
from tadq.zoo.dit import NUM_CLASSES, DiTTrainConfig, build_digits_dit, shipped_dit_path

SHIPPED = shipped_dit_path()


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="shipped DiT not trained in this checkout")
def test_shipped_dit_loads_with_its_classes_vae_and_guidance():
    model, scheduler = load_pipeline_parts(SHIPPED)
    adapter = adapter_for(model)
    assert adapter.num_classes(model) == NUM_CLASSES and adapter.null_class(model) == NUM_CLASSES
    assert scheduler.config.prediction_type == "epsilon" and not scheduler.config.clip_sample
    workload = load_workload("dit")
    assert workload.guidance_scale == dit.DEFAULT_GUIDANCE_SCALE and workload.image_shape() == (1, 16, 16)
    assert workload.features is not None and workload.expected_labels is not None
    info = json.loads((SHIPPED / "training_info.json").read_text())
    assert info["config"]["seed"] == 0 and info["wall_time_s"] > 0


def _tiny_config(**changes) -> DiTTrainConfig:
    return DiTTrainConfig(**({"steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 2, "heads": 2,
                              "head_dim": 8, "layers": 1} | changes))


def test_training_writes_a_ditpipeline_that_diffusers_loads_and_repeats_byte_for_byte(tmp_path, monkeypatch):
    """Two runs with one seed give the same weight bytes; the folder is a DiTPipeline diffusers samples."""
    from tadq.zoo import data

    real = data.load_digits_split
    monkeypatch.setattr(dit, "load_digits_split", lambda config: _few(real(config)))  # 32 digits: fast
    first = dit.train_digits_dit(_tiny_config(), tmp_path / "a")
    second = dit.train_digits_dit(_tiny_config(), tmp_path / "b")
    weights = Path("transformer") / "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(first / weights)), load_file(str(second / weights))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # the VAE read from the t2i folder: its config names no path of the training machine
    assert (first / "vae" / "config.json").read_bytes() == (second / "vae" / "config.json").read_bytes()
    assert "_name_or_path" not in json.loads((first / "vae" / "config.json").read_text())
    pipe = DiTPipeline.from_pretrained(first, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[3], guidance_scale=1.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 1)
    # the label table keeps the null row (trained by tadq's own label dropout, not diffusers')
    table = pipe.transformer.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NUM_CLASSES + 1


def _few(split):
    split.train_images, split.train_labels = split.train_images[:32], split.train_labels[:32]
    return split


def test_architecture_is_the_documented_one():
    model = build_digits_dit()
    assert model.config.patch_size == 2 and model.config.sample_size == 8 and model.config.in_channels == 4
    assert model.config.num_attention_heads * model.config.attention_head_dim == 128
    assert model.config.out_channels == 4  # ε only: no learned variance


def test_bad_training_configs_raise():
    for changes in ({"label_dropout": 0.0}, {"steps": 0}, {"ema_decay": 1.0}):
        with pytest.raises(ValueError):
            _tiny_config(**changes)
