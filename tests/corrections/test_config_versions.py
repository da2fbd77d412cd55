"""Correction configs written by an older tadq mean what they meant then (tadq.config ``fields_added``).

TCEC and PTQD gained fields while staying at version 1, with defaults that changed what a config without them did:
a payload as tadq wrote it before (every field it had then) read the new default, so an old TCEC recipe refitted a
per-element model with an offset and an old PTQD artefact sampled with the noise-only VSC. Hand-written short
payloads (docs/recipes.md) keep today's defaults, and today's payloads are written and read as before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.io.tiny_artefacts import save_tiny_artefact

from tadq.config import config_from_dict, config_to_dict
from tadq.corrections import PTQDConfig, TCECConfig
from tadq.io import load_quantized
from tadq.io.manifest import write_manifest
from tadq.io.save import CONFIG_FILE, RECIPE_FILE

# the fields each config had when tadq wrote it before the change (git show 0391638^ / f8df7ec^ of its config.py)
TCEC_BEFORE_0391638 = {"trajectory": "quantized", "num_samples": 256, "seed": 0, "mix": 1.0, "damping": 1.0,
                       "select": True, "mix_candidates": [1.0, 0.5, 0.0], "damping_candidates": [1.0, 0.5],
                       "relative_weight": 0.0, "mask_threshold": 0.05, "target": "same_input", "sequential": True,
                       "selection_seed": None, "selection_samples": 64, "refit_candidates": False,
                       "error_model": "on_estimate"}
PTQD_BEFORE_F8DF7EC = {"trajectory": "teacher_forced", "num_samples": 256, "seed": 0, "correlated": True,
                       "bias": True, "variance": True, "clamp_negative_k": True}


def test_a_tcec_config_written_before_the_per_element_model_keeps_the_channel_model():
    config = config_from_dict({"type": "TCECConfig", "version": 1, "data": TCEC_BEFORE_0391638})
    assert (config.resolution, config.offset, config.include_off) == ("channel", False, False)
    assert (config.start, config.start_candidates, config.error_space) == (0.0, (0.0,), "eps")
    assert config.refit_candidates is False  # written, so kept
    today = TCECConfig()
    assert (today.resolution, today.offset, today.include_off) != (config.resolution, config.offset,
                                                                   config.include_off)


def test_a_tcec_config_written_before_refit_candidates_refitted_every_candidate():
    data = {k: v for k, v in TCEC_BEFORE_0391638.items() if k not in ("refit_candidates", "error_model")}
    config = config_from_dict({"type": "TCECConfig", "version": 1, "data": data})
    assert config.refit_candidates is True and config.error_model == "on_estimate"


def test_a_ptqd_config_written_before_vsc_form_keeps_the_full_code_vsc():
    config = config_from_dict({"type": "PTQDConfig", "version": 1, "data": PTQD_BEFORE_F8DF7EC})
    assert config.vsc_form == "full_code" and PTQDConfig().vsc_form == "noise_only"
    assert config.select is False


@pytest.mark.parametrize("config", [TCECConfig(), PTQDConfig(), TCECConfig(resolution="channel", offset=False),
                                    PTQDConfig(vsc_form="full_code", select=True)])
def test_todays_payloads_read_back_as_written(config):
    payload = config_to_dict(config)
    assert config_from_dict(json.loads(json.dumps(payload))) == config
    assert payload["version"] == 1  # no new version: recipes, cache and search keys stay what they were


@pytest.mark.parametrize(("kind", "data"), [("TCECConfig", {}), ("PTQDConfig", {"seed": 3}),
                                            ("TCECConfig", {"num_samples": 8, "mix": 0.5})])
def test_a_short_hand_written_payload_takes_todays_defaults(kind, data):
    """docs/recipes.md: ``{"type": "TCECConfig", "version": 1, "data": {}}`` is today's TCEC."""
    klass = {"TCECConfig": TCECConfig, "PTQDConfig": PTQDConfig}[kind]
    assert config_from_dict({"type": kind, "version": 1, "data": data}) == klass(**data)


def _as_written_before(folder: Path, kind: str, fields: dict) -> None:
    """Keep only ``fields`` of every ``kind`` correction config of the artefact, as the older tadq wrote it."""
    def strip(payloads):
        for payload in payloads:
            if payload["type"] == kind:
                payload["data"] = {k: v for k, v in payload["data"].items() if k in fields}

    meta = json.loads((folder / CONFIG_FILE).read_text())
    strip(meta["corrections"])
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if (folder / RECIPE_FILE).is_file():
        recipe = json.loads((folder / RECIPE_FILE).read_text())
        strip(recipe["data"]["corrections"])
        (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2))
    write_manifest(folder)


def test_a_ptqd_artefact_written_before_vsc_form_samples_with_the_full_code_vsc(tmp_path):
    folder = save_tiny_artefact(tmp_path / "q", "W8A8", corrections=(PTQDConfig(num_samples=4, seed=1),))
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    _as_written_before(old, "PTQDConfig", PTQD_BEFORE_F8DF7EC)
    today, before = load_quantized(folder)[0].corrections[0], load_quantized(old)[0].corrections[0]
    assert (today.config.vsc_form, before.config.vsc_form) == ("noise_only", "full_code")
    for name, table in today.named_buffers():  # same tables: only the config's reading differs
        assert torch.equal(table, dict(before.named_buffers())[name])


def test_a_tcec_artefact_written_before_the_per_element_model_loads_and_samples_as_it_did(tmp_path):
    """It was refused ("corrections.safetensors lacks 'members.0.b' ... save it again"), and its config would have
    read as today's per-element model with an offset: the channel-wise K_t it holds, every step compensated."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tadq import api
    from tadq.sampling import SamplerConfig

    fields = {k: v for k, v in TCEC_BEFORE_0391638.items() if k not in ("num_samples", "selection_samples")}
    then = TCECConfig(**{**fields, "num_samples": 4, "selection_samples": 4, "mix_candidates": (1.0, 0.0),
                         "damping_candidates": (1.0,)}, resolution="channel", offset=False, include_off=False,
                      start_candidates=(0.0,))
    folder = save_tiny_artefact(tmp_path / "q", "W8A8", corrections=(then,))
    old = Path(shutil.copytree(folder, tmp_path / "old"))
    _as_written_before(old, "TCECConfig", TCEC_BEFORE_0391638)
    def drop(artefact: Path, names: tuple[str, ...]) -> None:
        tables = artefact / "corrections.safetensors"
        with safe_open(str(tables), framework="pt") as handle:
            metadata = handle.metadata()
            kept = {key: handle.get_tensor(key) for key in handle.keys() if key.split(".")[-1] not in names}
        save_file(kept, str(tables), metadata=metadata)
        write_manifest(artefact)

    drop(old, ("b", "strength", "start"))
    damaged = Path(shutil.copytree(folder, tmp_path / "damaged"))
    drop(damaged, ("b",))  # one of them lost from today's file: damage, still refused
    with pytest.raises(ValueError, match="lacks 'members.0.b'"):
        load_quantized(damaged)

    today, scheduler = load_quantized(folder)
    before, _ = load_quantized(old)
    assert before.corrections[0].config == then  # read as written: the channel model, no offset
    for name, value in today.corrections[0].state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(before.corrections[0].state_dict()[name], value), name
    sampler = SamplerConfig(kind="ddim", num_steps=2)
    images = [api.sample(model, scheduler, sampler, num_samples=2, seed=1000, progress=False)
              for model in (today, before)]
    assert torch.equal(images[0].images, images[1].images)
