"""A TFMQ model saves and loads exactly: FSC tables, cache and the network's per-step structure come back."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.tfmq.common import SAMPLER, scheduler

from tadq import api
from tadq.io import load_quantized, save_quantized
from tadq.tfmq import TFMQCorrection
from tadq.tfmq.fsc import StepQuantizer

VARIANTS = [{}, {"fsc": "model", "maintenance": "select", "cache_bits": 2}, {"maintenance": "cache_quantized"},
            {"maintenance": "cache_fp", "fsc": "off"}]


def _images(qmodel) -> torch.Tensor:
    return api.sample(qmodel, scheduler(), SAMPLER, num_samples=3, seed=5, progress=False).images


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_save_and_load_reproduce_the_outputs_exactly(build_tfmq, tmp_path, overrides):
    qmodel = build_tfmq(**overrides)
    save_quantized(qmodel, tmp_path / "tfmq", scheduler())
    loaded, _ = load_quantized(tmp_path / "tfmq")
    original, restored = qmodel.corrections[0], loaded.corrections[0]
    assert isinstance(restored, TFMQCorrection) and restored.config == original.config
    assert restored.report == original.report and restored.cache_layers == original.cache_layers
    assert restored.cache_size_bytes() == original.cache_size_bytes()
    steps = [n for n, m in loaded.model.named_modules() if isinstance(m, StepQuantizer)]
    assert steps == [n for n, m in qmodel.model.named_modules() if isinstance(m, StepQuantizer)]
    assert torch.equal(_images(loaded), _images(qmodel))


def test_a_deep_copy_samples_identically_and_independently(build_tfmq):
    qmodel = build_tfmq()
    twin = copy.deepcopy(qmodel)
    assert twin.corrections[0].state is not qmodel.corrections[0].state
    assert torch.equal(_images(twin), _images(qmodel))
