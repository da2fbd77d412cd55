"""FreeU survives save and load: diffusers keeps it as attributes of the up blocks, which no config records, so an
artefact quantized with FreeU on used to load without it and sample other images, silently."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler
from tests.conftest import build_tiny_sd_unet

import tadq
from tadq.adapters.freeu import freeu_settings, match_freeu
from tadq.config import CalibrationConfig, QuantConfig
from tadq.io import CONFIG_FILE
from tadq.io.manifest import write_manifest
from tadq.sampling import Conditioning, ConditioningList, SamplerConfig

SAMPLER = SamplerConfig("ddim", num_steps=2)
FACTORS = {"s1": 0.9, "s2": 0.2, "b1": 1.2, "b2": 1.4}


def _text(n: int = 4) -> ConditioningList:
    generator = torch.Generator().manual_seed(0)
    return ConditioningList(Conditioning(encoder_hidden_states=torch.randn(n, 3, 16, generator=generator)))


def _quantized(freeu: bool):
    model = build_tiny_sd_unet()
    if freeu:
        model.enable_freeu(**FACTORS)
    config = QuantConfig.from_preset("W8A8", method="naive", calibration=CalibrationConfig(
        sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=2, batch_size=4))
    return tadq.quantize(model, DDIMScheduler(num_train_timesteps=1000), config, conditions=_text(), progress=False)


def _images(qmodel, scheduler):
    return tadq.sample(qmodel, scheduler, SAMPLER, num_samples=2, seed=0, progress=False, conditions=_text()).images


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("freeu") / "art"
    qmodel = _quantized(freeu=True)
    qmodel.save_pretrained(folder, DDIMScheduler(num_train_timesteps=1000))
    return qmodel, folder


def test_the_loaded_model_samples_as_the_saved_one_with_freeu_on(saved):
    qmodel, folder = saved
    loaded, scheduler = tadq.load(folder)
    assert freeu_settings(loaded.model) == FACTORS
    assert torch.equal(_images(qmodel, scheduler), _images(loaded, scheduler))
    loaded.model.disable_freeu()  # the factors matter: without them the same noise gives other images
    assert not torch.equal(_images(qmodel, scheduler), _images(loaded, scheduler))


def test_an_artefact_without_freeu_records_none(tmp_path):
    _quantized(freeu=False).save_pretrained(tmp_path / "art", DDIMScheduler(num_train_timesteps=1000))
    assert "freeu" not in json.loads((tmp_path / "art" / CONFIG_FILE).read_text())
    assert freeu_settings(tadq.load(tmp_path / "art")[0].model) is None


@pytest.mark.parametrize("value", [{"s1": 0.9}, {**FACTORS, "b2": float("nan")}, [0.9, 0.2, 1.2, 1.4]])
def test_damaged_freeu_factors_are_refused_by_name(saved, tmp_path, value):
    import shutil

    folder = tmp_path / "art"
    shutil.copytree(saved[1], folder)
    meta = json.loads((folder / CONFIG_FILE).read_text())
    meta["freeu"] = value
    (folder / CONFIG_FILE).write_text(json.dumps(meta))
    write_manifest(folder)  # a consistent artefact whose entry is wrong, not a damaged file
    with pytest.raises(ValueError, match="freeu is"):
        tadq.load(folder)


def test_factors_set_on_some_up_blocks_only_are_refused_when_saved(tmp_path):
    qmodel = _quantized(freeu=False)
    qmodel.model.up_blocks[0].s1 = 0.5  # by hand, not enable_freeu: what would the artefact record?
    with pytest.raises(ValueError, match="different FreeU factors"):
        qmodel.save_pretrained(tmp_path / "art", DDIMScheduler(num_train_timesteps=1000))
    assert not (tmp_path / "art").exists()


def test_the_fp_reference_gets_the_artefacts_factors(saved):
    reference = build_tiny_sd_unet()
    assert match_freeu(reference, saved[0].model) == FACTORS and freeu_settings(reference) == FACTORS


def test_evaluate_and_analyze_give_their_fp_reference_the_artefacts_factors(saved):
    """Both commands take their FP reference from one helper (``tadq.cli.sample._matched_reference``, behind
    ``artefact_pair`` and ``prompt_pipeline_pair``); tadq analyze's own copy of the loading skipped FreeU, so the
    FreeU difference counted as quantization error there."""
    from tadq.cli.sample import _matched_reference

    reference = _matched_reference(build_tiny_sd_unet(), saved[0], torch.device("cpu"), torch.float32)
    assert freeu_settings(reference) == FACTORS
