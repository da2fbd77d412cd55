"""A correction's saved table key (``corrections.safetensors`` metadata): what older tadqs wrote loads, anything
else is one ValueError naming the file. A key missing a field raised a TypeError traceback from ``TableKey``; a
string guidance scale loaded; a saved state that was not an object, or a null key, loaded a keyed correction
unfitted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.corrections.analytic import AnalyticDenoiser, InjectedError, analytic_scheduler, fit_context

from tadq.corrections import CorrectionStack, PTQDConfig, collect_trajectory_pair
from tadq.corrections.io import CORRECTIONS_FILE, load_corrections, save_corrections
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
STATE = "members.0._extra_state"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list]:
    correction = correction_for(PTQDConfig(num_samples=8))
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    request = correction.pair_request()
    correction.fit(collect_trajectory_pair(fit_context(fp, InjectedError(fp), scheduler, SAMPLER, bits="W4A8"),
                                           num_samples=request.num_samples, seed=request.seed, mode=request.mode))
    folder = tmp_path_factory.mktemp("key")
    return folder, json.loads(json.dumps(save_corrections(CorrectionStack([correction]), folder)))


def _rewrite(saved, tmp_path: Path, edit) -> Path:
    """A copy of the saved tables whose member-0 state is ``edit(state)``."""
    folder, _ = saved
    with safe_open(str(folder / CORRECTIONS_FILE), framework="pt") as handle:
        extra = json.loads(handle.metadata()["tadq_extra_state"])
    extra[STATE] = edit(extra[STATE])
    save_file(load_file(folder / CORRECTIONS_FILE), str(tmp_path / CORRECTIONS_FILE),
              metadata={"tadq_extra_state": json.dumps(extra)})
    return tmp_path


def _key(edit):
    def state(saved_state):
        fields = json.loads(saved_state["table_key"])
        edit(fields)
        return {"table_key": json.dumps(fields)}
    return state


def test_a_key_as_the_first_writer_wrote_it_loads(saved, tmp_path):
    """sampler_key, num_steps, guidance_scale and bits only (clip, schedule, noise and prediction type came later)."""
    first = ("sampler_key", "num_steps", "guidance_scale", "bits")
    folder = _rewrite(saved, tmp_path, _key(lambda f: [f.pop(k) for k in list(f) if k not in first]))
    key = load_corrections(folder, saved[1])[0].table_key
    assert (key.clip_recorded, key.schedule, key.noise, key.prediction_type) == (False, None, None, None)
    assert key.num_steps == SAMPLER.num_steps


@pytest.mark.parametrize(("edit", "needle"), [
    (_key(lambda f: f.pop("bits")), r"lacks \['bits'\]"),
    (_key(lambda f: f.update(num_steps="4")), "has num_steps = '4'"),
    (_key(lambda f: f.update(num_steps=True)), "has num_steps = True"),
    (_key(lambda f: f.update(guidance_scale="7.5")), "has guidance_scale = '7.5'"),
    (_key(lambda f: f.update(sampler_key=None)), "has sampler_key = None"),
    (_key(lambda f: f.update(clip_sample_range="1")), "has clip_sample_range = '1'"),
    (lambda _state: {"table_key": {"bits": "W4A8"}}, "table key is a dict, not the JSON text"),
    (lambda _state: {"table_key": "{not json"}, "is not valid JSON"),
    (lambda _state: [1], "saved state is a list"),
    (lambda _state: {"table_key": None}, r"\['0 \(PTQDCorrection\)'\] have tables but no table key"),
])
def test_a_damaged_key_is_one_error_naming_the_file(saved, tmp_path, edit, needle):
    folder = _rewrite(saved, tmp_path, edit)
    with pytest.raises(ValueError, match=needle) as caught:
        load_corrections(folder, saved[1])
    assert str(folder / CORRECTIONS_FILE) in str(caught.value)
