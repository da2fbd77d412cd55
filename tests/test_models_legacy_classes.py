"""Folder layouts no other test builds (a robustness probe): the legacy ``Transformer2DModel`` name that released
DiT and PixArt-α folders carry, loaded and saved back with the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from tests.adapters.test_transformer2d import build_tiny_dit

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.io import save_quantized
from tadq.io.save import config_mismatch
from tadq.models import load_pipeline_parts
from tadq.sampling import ClassLabels, SamplerConfig


def _legacy_dit_folder(path, norm_type: str = "ada_norm_zero"):
    model = build_tiny_dit()
    model.save_pretrained(path / "transformer")
    DDIMScheduler().save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "scheduler": ["diffusers",
                                           "DDIMScheduler"], "transformer": ["diffusers", "Transformer2DModel"]}))
    config_file = path / "transformer" / "config.json"
    config = json.loads(config_file.read_text()) | {"_class_name": "Transformer2DModel", "norm_type": norm_type}
    config_file.write_text(json.dumps(config))
    return model


def test_a_dit_folder_under_the_legacy_transformer2d_name_loads_as_diffusers_loads_it(tmp_path):
    model = _legacy_dit_folder(tmp_path)  # as facebook/DiT-XL-2-256 is saved; it used to be refused by class name
    loaded, _ = load_pipeline_parts(tmp_path)
    assert type(loaded) is DiTTransformer2DModel
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in model.state_dict().items())


def test_a_legacy_transformer2d_of_another_norm_type_is_still_refused(tmp_path):
    _legacy_dit_folder(tmp_path, norm_type="layer_norm")
    with pytest.raises(ValueError, match="holds a 'Transformer2DModel'; supported model classes"):
        load_pipeline_parts(tmp_path)


def test_a_model_quantized_from_a_legacy_named_folder_is_saved_with_that_pipeline(tmp_path):
    """The artefact of a DiT pipeline keeps its VAE and scheduler (``pipeline_source``), and save checks that the
    folder's denoiser config is the model's: it compared the class names, so the legacy ``Transformer2DModel``
    folder was refused as "not the folder this model was quantized from" after the whole calibration."""
    folder = tmp_path / "dit"
    folder.mkdir()
    _legacy_dit_folder(folder)
    model, scheduler = load_pipeline_parts(folder)
    assert config_mismatch(model, folder / "transformer" / "config.json") is None
    sampler = SamplerConfig("ddim", num_steps=2, eta=0.0)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2)
    qmodel = api.quantize(model, scheduler, QuantConfig.from_preset("W8A8", calibration=calibration),
                          conditions=ClassLabels([1, 2]), progress=False)
    save_quantized(qmodel, tmp_path / "artefact", scheduler, pipeline_source=folder)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert type(loaded.model) is DiTTransformer2DModel
    images = [api.sample(denoiser, schedule, sampler, num_samples=2, seed=3, progress=False,
                         conditions=ClassLabels([4, 5])).images
              for denoiser, schedule in ((qmodel, scheduler), (loaded, loaded_scheduler))]
    assert torch.equal(*images)


def test_a_legacy_name_of_another_class_still_differs_from_the_model(tmp_path):
    _legacy_dit_folder(tmp_path, norm_type="ada_norm_single")  # names a PixArt, holds a DiT
    model = build_tiny_dit()
    assert "is a Transformer2DModel, but the quantized model is a DiTTransformer2DModel" in config_mismatch(
        model, tmp_path / "transformer" / "config.json")
