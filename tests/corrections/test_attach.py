"""``fit_corrections``: the corrected model's recipe records the stack it carries."""

from __future__ import annotations

import dataclasses

from tests.corrections.conftest import TINY_SAMPLER

from tadq.corrections import PTQDConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.io.load import read_recipe

SAMPLER = TINY_SAMPLER
N = 4


def test_the_saved_recipe_of_a_corrected_model_lists_its_corrections(tiny_w4a8, tmp_path):
    """The view shared the base's recipe: the artefact carried PTQD and TCEC tables under a recipe without
    corrections, so ``tadq sample`` named it as the base and did not check its sampler flags against the tables."""
    fp, scheduler, qmodel = tiny_w4a8
    base_recipe = qmodel.recipe
    assert base_recipe is not None and base_recipe.corrections == ()
    ptqd = PTQDConfig(num_samples=N)
    once = fit_corrections(qmodel, fp, scheduler, SAMPLER, [ptqd], batch_size=N, progress=False)
    tcec = TCECConfig(num_samples=N, select=False)
    twice = fit_corrections(once, fp, scheduler, SAMPLER, [tcec], batch_size=N, progress=False)
    assert once.recipe.corrections == (ptqd,) and twice.recipe.corrections == (ptqd, tcec)
    assert qmodel.recipe is base_recipe and base_recipe.corrections == ()  # the base is unchanged
    twice.save_pretrained(tmp_path / "artefact", scheduler)
    assert read_recipe(tmp_path / "artefact").corrections == (ptqd, tcec)

def test_a_recipe_deployed_elsewhere_is_kept_as_it_is(tiny_w4a8):
    fp, scheduler, qmodel = tiny_w4a8
    other = dataclasses.replace(SAMPLER, num_steps=SAMPLER.num_steps + 1)
    corrected = fit_corrections(qmodel, fp, scheduler, other, [PTQDConfig(num_samples=N)], batch_size=N,
                                progress=False)
    assert corrected.recipe is qmodel.recipe
