"""Folder layouts no other test builds (a robustness probe): the legacy ``Transformer2DModel`` name that released
DiT and PixArt-α folders carry."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from tests.adapters.test_transformer2d import build_tiny_dit

from tadq.models import load_pipeline_parts


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
