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


def test_apply_tfmq_leaves_no_recipe_that_describes_other_tables(tiny_setup, tmp_path):
    """``apply_tfmq`` on a model from ``tadq.quantize`` (or ``tadq.load``) rebuilt its tables but kept its recipe,
    which the artefact saves as "the Recipe that made the model": it named the old sampler and TFMQ settings, so
    ``tadq sample`` refused the artefact with either grid (the recipe's default: not the tables'; the tables' own
    with --steps: not the recipe's)."""
    import dataclasses

    import tadq
    from tadq.config import CalibrationConfig
    from tadq.recipe import Deployment, Recipe
    from tadq.sampling import SamplerConfig
    from tadq.tfmq import TFMQConfig, TFMQMethod, apply_tfmq

    model, sched, _ = tiny_setup
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    settings = TFMQConfig(tiar_iters=2, maintenance="cache_fp")
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=2)
    recipe = Recipe.from_preset("W8A8", method=TFMQMethod(base="naive", tfmq=settings), calibration=calibration,
                                deployments=(Deployment(sampler),))
    qmodel = api.quantize(model, sched, recipe, progress=False)
    other = dataclasses.replace(settings, maintenance="tib", fsc="off")
    apply_tfmq(qmodel, model, sched, other, sampler, progress=False)  # same sampler: the recipe says the new settings
    assert qmodel.recipe == dataclasses.replace(recipe, method=dataclasses.replace(recipe.method, tfmq=other))
    assert qmodel.recipe.quant_config() == qmodel.config
    apply_tfmq(qmodel, model, sched, settings, SamplerConfig(kind="ddim", num_steps=4), progress=False)
    assert qmodel.recipe is None  # no recipe calibrates on one grid and tabulates another
    qmodel.save_pretrained(tmp_path / "q", sched)
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.recipe is None and loaded.corrections[0].sampler_key == "ddim-4-eta0.0"


def test_sampling_a_tfmq_artefact_on_another_grid_names_its_per_step_ranges(tiny_setup, tmp_path):
    """The refusal named "corrections" for a TFMQ artefact that has none: what it has is per-step ranges."""
    from typer.testing import CliRunner

    from tadq.cli.app import app
    from tadq.config import CalibrationConfig
    from tadq.recipe import Deployment, Recipe
    from tadq.sampling import SamplerConfig
    from tadq.tfmq import TFMQConfig, TFMQMethod

    model, sched, _ = tiny_setup
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=2)
    recipe = Recipe.from_preset("W8A8", method=TFMQMethod(base="naive", tfmq=TFMQConfig(tiar_iters=2)),
                                calibration=calibration, deployments=(Deployment(sampler),))
    api.quantize(model, sched, recipe, progress=False).save_pretrained(tmp_path / "q", sched)
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "q"), "--steps", "4", "--num-samples", "1",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "per-step activation ranges (TFMQ) were fitted for ddim-3-eta0.0, not ddim-4-eta0.0" in message
    assert "corrections" not in message.split("were fitted")[0]
    assert not (tmp_path / "s.png").exists()
