"""Artefacts written by another tadq: what a newer one adds is refused with "upgrade", never dropped while loading.

``tadq_config.json`` gained a key without a new format version once already ("freeu"): a tadq from before it loaded
a FreeU artefact without FreeU and sampled other images. Each case edits one tiny artefact by hand and rewrites its
manifest (a consistent artefact, as the other tadq would have written it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.io.tiny_artefacts import save_tiny_artefact
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.config import NewerVersionError
from tadq.io import load_quantized, save_quantized
from tadq.io.manifest import MANIFEST_FILE, write_manifest
from tadq.io.save import CONFIG_FILE, RECIPE_FILE


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("versions") / "q", "W8A8")


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / CONFIG_FILE).read_text())
    edit(meta)
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    write_manifest(folder)


def test_a_setting_this_tadq_does_not_know_is_refused_not_dropped(copy):
    """A newer tadq's runtime setting beside quant_config (as "freeu" was added) loaded without it, silently."""
    _edit_meta(copy, lambda meta: meta.update(future_guidance={"strength": 0.5}))
    with pytest.raises(ValueError, match=r"tadq_config.json has keys \['future_guidance'\].*upgrade tadq"):
        load_quantized(copy)


def test_a_config_of_another_format_is_refused(copy):
    _edit_meta(copy, lambda meta: meta.update(format="someone-elses-format"))
    with pytest.raises(ValueError, match="format is 'someone-elses-format', not 'tadq-quantized'"):
        load_quantized(copy)


def test_todays_keys_all_load(artefact):
    """Every key today's writer puts in tadq_config.json is one the loader knows (FreeU: tests/io/test_freeu.py)."""
    from tadq.io.load import META_KEYS

    assert set(json.loads((artefact / CONFIG_FILE).read_text())) <= META_KEYS
    load_quantized(artefact)


@pytest.mark.parametrize("place", ["quant_config", "quant_config.weights"])
def test_a_newer_network_config_says_upgrade_not_save_again(copy, place):
    """It said "quant_config is malformed (...newer...); save the artefact again": no save by this tadq can help."""
    def edit(meta):
        node = meta
        for name in place.split("."):
            node = node[name] if name == "quant_config" else node["data"][name]
        node["version"] += 1
    _edit_meta(copy, edit)
    with pytest.raises(NewerVersionError, match="is newer than this tadq understands") as caught:
        load_quantized(copy)
    assert "upgrade tadq" in str(caught.value) and "save the artefact again" not in str(caught.value)
    assert "malformed" not in str(caught.value)


def test_an_unknown_correction_kind_names_a_newer_tadq_or_plugin(copy):
    _edit_meta(copy, lambda meta: meta.update(corrections=[{"type": "FutureConfig", "version": 1, "data": {}}]))
    with pytest.raises(ValueError, match="corrections: unknown config type 'FutureConfig'.*upgrade tadq"):
        load_quantized(copy)


def _newer_manifest(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["version"] += 1
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


def _newer_recipe(folder: Path) -> None:
    recipe = json.loads((folder / RECIPE_FILE).read_text())
    recipe["version"] += 1
    (folder / RECIPE_FILE).write_text(json.dumps(recipe))
    write_manifest(folder)


def _newer_correction(meta: dict) -> None:
    meta["corrections"] = [{"type": "PTQDConfig", "version": 2, "data": {}}]


NEWER = {
    "a setting": (lambda folder: _edit_meta(folder, lambda meta: meta.update(future_guidance=1.5)), "future_guidance"),
    "the format": (lambda folder: _edit_meta(folder, lambda meta: meta.update(format_version=99)), "format 99"),
    "the network config": (lambda folder: _edit_meta(folder, lambda meta: meta["quant_config"].update(version=99)),
                           "version 99"),
    "a correction config": (lambda folder: _edit_meta(folder, _newer_correction), "PTQDConfig version 2"),
    "the recipe": (_newer_recipe, "Recipe version"),
    "the manifest": (_newer_manifest, "manifest version 2"),
}


@pytest.mark.parametrize("what", sorted(NEWER))
def test_verify_says_newer_with_its_own_exit_code_not_damaged(copy, what):
    """It exited 1 with FAILED, as for a damaged artefact, though saving again cannot help: upgrading tadq does."""
    from tadq.cli.verify import EXIT_NEWER

    edit, needle = NEWER[what]
    edit(copy)
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == EXIT_NEWER != 1, result.output
    flat = " ".join(result.output.split())
    assert flat.startswith(f"NEWER {copy}") and needle in flat and "upgrade tadq" in flat, flat


def test_verify_still_fails_a_damaged_artefact_with_exit_1(copy):
    _edit_meta(copy, lambda meta: meta.update(format_version="two"))
    result = CliRunner().invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "FAILED" in result.output, result.output


# what tadq wrote as the (unused) reconstruction settings of a naive model: version 1 before GPTQ rounding existed,
# version 2 before gptq_target_damp, version 3 before gptq_target_prior; the recipe (NaiveMethod) records none, so
# its network carries today's defaults
OLDER_RECONSTRUCTION = {
    1: ("rounding", "gptq_damp", "gptq_target_damp", "gptq_target_prior", "gptq_act_order", "gptq_target",
        "gptq_inputs"),
    2: ("gptq_target_damp", "gptq_target_prior"),
    3: ("gptq_target_prior",),
}


@pytest.mark.parametrize("version", sorted(OLDER_RECONSTRUCTION))
def test_a_naive_artefact_of_an_older_tadq_loads_and_saves_again(artefact, copy, tmp_path, version):
    """It was refused: "tadq_recipe.json and tadq_config.json describe different networks" (the recipe's naive
    method reports today's ReconstructionConfig(), the config the migrated older one), though nothing differs that
    the model uses."""
    def edit(meta):
        reconstruction = meta["quant_config"]["data"]["reconstruction"]
        reconstruction["version"] = version
        for name in OLDER_RECONSTRUCTION[version]:
            reconstruction["data"].pop(name)
    _edit_meta(copy, edit)
    today, scheduler = load_quantized(artefact)
    older, _ = load_quantized(copy)
    assert older.recipe == today.recipe and older.config == today.config
    assert older.state_dict().keys() == today.state_dict().keys()
    assert all(torch.equal(older.state_dict()[key], value) for key, value in today.state_dict().items()
               if isinstance(value, torch.Tensor))
    save_quantized(older, tmp_path / "again", scheduler)
    assert load_quantized(tmp_path / "again")[0].config == today.config


def test_a_recipe_of_another_network_is_still_refused(copy):
    recipe = json.loads((copy / RECIPE_FILE).read_text())
    recipe["data"]["split_shortcut"] = True
    (copy / RECIPE_FILE).write_text(json.dumps(recipe))
    write_manifest(copy)
    with pytest.raises(ValueError, match="tadq_recipe.json and tadq_config.json describe different networks"):
        load_quantized(copy)
