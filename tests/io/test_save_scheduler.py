"""``save_pretrained(dir, scheduler)`` of a model with per-step tables: the artefact keeps ``scheduler`` as its
own, so one its tables were not fitted on is refused before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet
from tests.io.tiny_artefacts import CALIB

import tadq
from tadq.config import QuantConfig
from tadq.corrections import TACConfig
from tadq.recipe import Recipe


@pytest.fixture(scope="module")
def corrected():
    """(TAC-corrected tiny model, the scheduler it was quantized and fitted with)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    config = QuantConfig.from_preset("W8A8", calibration=CALIB)
    config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), range_method="minmax")
                                            for name in ("weights", "activations")})
    recipe = dataclasses.replace(Recipe.from_quant_config(config), corrections=(TACConfig(num_samples=4),))
    return tadq.quantize(build_tiny_unet(), scheduler, recipe, progress=False), scheduler


def test_a_scheduler_the_tables_were_not_fitted_on_is_refused_before_writing(corrected, tmp_path):
    """It was written, and the artefact then refused its own scheduler at every sampling ("TACCorrection was fitted
    on another training schedule"), the fitting one no longer in the folder."""
    qmodel, _ = corrected
    other = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="save_pretrained: the DDPMScheduler given is not the scheduler "
                                         "TACCorrection's per-step tables were fitted on") as error:
        qmodel.save_pretrained(tmp_path / "artefact", other)
    assert "another training schedule" in str(error.value)
    assert not (tmp_path / "artefact").exists() and list(tmp_path.iterdir()) == []


def test_the_fitting_scheduler_is_saved_and_its_artefact_samples(corrected, tmp_path):
    qmodel, scheduler = corrected
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, own = tadq.load(tmp_path / "artefact")
    result = tadq.sample(loaded, own, CALIB.sampler, num_samples=2, seed=1, batch_size=2, progress=False)
    assert result.images.shape[0] == 2 and result.images.isfinite().all()
