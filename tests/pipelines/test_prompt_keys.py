"""The key of a prompt set (``PromptConditions.key``), which run cells and calibration caches are stored under,
must change whenever the encodings can: a tokenizer's BPE merges or a text encoder's config edited on disk changed
the encodings without changing the key (it hashed the vocabulary and the tensors only), so a rerun served the old
numbers. It must not change with the folder's path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tests.pipelines.builders_transformer import build_pixart

from tadq.pipelines import PromptConditions
from tadq.pipelines.components import load_fp_pipeline

PROMPTS = ["a cat", "a dog"]


def _key(folder: Path, prompts=PROMPTS) -> str:
    return PromptConditions(load_fp_pipeline(folder), prompts).key


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def sd_copy(sd_folder, tmp_path) -> Path:
    return Path(shutil.copytree(sd_folder, tmp_path / "sd"))


def test_the_key_does_not_depend_on_the_folder_path(sd_folder, sd_copy):
    assert _key(sd_copy) == _key(sd_folder)


def test_an_edited_merges_file_changes_the_key(sd_copy):
    before = load_fp_pipeline(sd_copy)
    key = PromptConditions(before, PROMPTS).key
    file = sd_copy / "tokenizer" / "tokenizer.json"  # save_pretrained writes the merges into it
    tokenizer = json.loads(file.read_text())
    merges = tokenizer["model"]["merges"]  # "a b" strings or [a, b] pairs, by tokenizers' version
    tokenizer["model"]["merges"] = [m for m in merges if (m.split() if isinstance(m, str) else m) != ["do", "g</w>"]]
    assert len(tokenizer["model"]["merges"]) == len(merges) - 1
    file.write_text(json.dumps(tokenizer))
    after = load_fp_pipeline(sd_copy)
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()  # what the key used to see: unchanged
    assert after.tokenizer("a dog").input_ids != before.tokenizer("a dog").input_ids
    assert PromptConditions(after, PROMPTS).key != key
    assert PromptConditions(after, ["a cat"]).key == PromptConditions(before, ["a cat"]).key  # "cat" tokenizes alike


def test_an_edited_text_encoder_config_changes_the_key(sd_copy):
    key = _key(sd_copy)
    _edit_json(sd_copy / "text_encoder" / "config.json", layer_norm_eps=1e-2)
    assert _key(sd_copy) != key


def test_a_transformer_pipeline_key_follows_its_t5_config_not_its_path(tmp_path):
    folder = build_pixart(tmp_path / "pixart")
    key = _key(folder)
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    assert _key(moved) == key
    _edit_json(moved / "text_encoder" / "config.json", layer_norm_epsilon=1e-2)
    assert _key(moved) != key
