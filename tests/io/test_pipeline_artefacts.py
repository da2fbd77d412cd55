"""Red-team: artefacts of pipeline models (tiny SD, SDXL, PixArt, DiT) and of correction stacks (PTQD, TAC, TCEC).

Every file the pipeline copy carries (text encoders, tokenizers, VAE, scheduler, model_index.json), the correction
tables and the recipe: damage (including edits that keep valid JSON but change meaning) is named by ``tadq verify``,
``tadq.load`` and ``tadq.load_pipeline`` before any sampling; swapped-in components are detected; moved, copied and
symlinked artefacts still load and verify; saving twice gives identical bytes; ``--overwrite`` keeps a user's file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from tests.pipelines.builders import _vae, build_sd, build_sdxl
from tests.pipelines.builders_transformer import build_pixart
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.fsguard import OutputRefused
from tadq.io import save_quantized
from tadq.io.manifest import _digest
from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
from tadq.pipelines.components import pipeline_denoiser
from tadq.recipe import Deployment, Recipe
from tadq.sampling import RandomClassLabels, SamplerConfig

runner = CliRunner()
PROMPTS = ["a cat", "a dog"]
GUIDANCE = 2.0
DIT_CLASSES = 10


def _sampler(kind: str) -> SamplerConfig:
    return SamplerConfig(kind, num_steps=2, eta=0.0) if kind == "ddim" else SamplerConfig(kind, num_steps=2)


def _recipe(kind: str, corrections: tuple = (), null_class: int | None = None) -> Recipe:
    sampler = _sampler(kind)
    recipe = Recipe.from_preset("W8A8")
    recipe = dataclasses.replace(
        recipe, weights=dataclasses.replace(recipe.weights, range_method="minmax"),
        activations=dataclasses.replace(recipe.activations, range_method="minmax"))
    calibration = dataclasses.replace(recipe.calibration, sampler=sampler, num_trajectories=2, num_steps_kept=2,
                                      samples_per_step=2, batch_size=4)
    return dataclasses.replace(recipe, calibration=calibration, corrections=corrections,
                               deployments=(Deployment(sampler, GUIDANCE, null_class=null_class),))


CORRECTIONS = (PTQDConfig(num_samples=2, seed=1), TACConfig(num_samples=2, seed=2),
               TCECConfig(num_samples=2, seed=3, select=False))


def _quantize_pipeline(folder: Path, kind: str, corrections: tuple = ()):
    torch.set_num_threads(1)
    pipe = load_fp_pipeline(folder)
    return tadq.quantize(pipeline_denoiser(pipe), pipe.scheduler, _recipe(kind, corrections),
                         conditions=PromptConditions(pipe, PROMPTS), progress=False, fit_batch_size=2)


def _build_dit(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2,
                                  num_embeds_ada_norm=DIT_CLASSES).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=model, vae=_vae(), scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"sd": build_sd(root / "sd"), "sdxl": build_sdxl(root / "sdxl"), "pixart": build_pixart(root / "pixart"),
            "dit": _build_dit(root / "dit"), "sd-other": build_sd(root / "sd-other", seed=1)}


@pytest.fixture(scope="module")
def arts(sources, tmp_path_factory):
    """sd (with PTQD + TAC + TCEC tables), sdxl, pixart (with TAC tables), dit (class-conditional + PTQD)."""
    root = tmp_path_factory.mktemp("arts")
    made = {}
    save_pipeline(_quantize_pipeline(sources["sd"], "ddim", CORRECTIONS), sources["sd"], root / "sd")
    made["sd"] = root / "sd"
    save_pipeline(_quantize_pipeline(sources["sdxl"], "ddim"), sources["sdxl"], root / "sdxl")
    made["sdxl"] = root / "sdxl"
    save_pipeline(_quantize_pipeline(sources["pixart"], "dpmsolver++", (TACConfig(num_samples=2, seed=2),)),
                  sources["pixart"], root / "pixart")
    made["pixart"] = root / "pixart"
    dit = DiTPipeline.from_pretrained(sources["dit"])
    qmodel = tadq.quantize(dit.transformer, dit.scheduler,
                           _recipe("ddim", (PTQDConfig(num_samples=2, seed=1),), null_class=DIT_CLASSES),
                           conditions=RandomClassLabels(DIT_CLASSES, null_class=DIT_CLASSES), progress=False,
                           fit_batch_size=2)
    save_quantized(qmodel, root / "dit", dit.scheduler, pipeline_source=sources["dit"])
    made["dit"] = root / "dit"
    return made


def _copy(art: Path, tmp_path: Path, name: str = "art") -> Path:
    shutil.copytree(art, tmp_path / name, symlinks=True)
    return tmp_path / name


def _verify(path: Path) -> tuple[int, str]:
    result = runner.invoke(app, ["verify", str(path)])
    return result.exit_code, " ".join(result.output.split())


def _all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _edit_json(file: Path, edit) -> None:
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _flip_last_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


def _swap_vocab(data) -> None:
    """Two vocabulary entries trade ids: valid JSON, a tokenizer that encodes 'cat' as another token."""
    vocab = data["model"]["vocab"]
    vocab["cat</w>"], vocab["dog</w>"] = vocab["dog</w>"], vocab["cat</w>"]


def _t5_vocab(data) -> None:
    vocab = data["model"]["vocab"]  # Unigram: [[piece, score], ...]
    vocab[5][1] = vocab[5][1] + 3.0


# (family, file, damage): every component the pipeline copy carries, the tables and the recipe
DAMAGE = [
    ("sd", "text_encoder/model.safetensors", _flip_last_byte),
    ("sd", "text_encoder/config.json", lambda f: _edit_json(f, _set("layer_norm_eps", 1e-3))),
    ("sd", "tokenizer/tokenizer.json", lambda f: _edit_json(f, _swap_vocab)),
    ("sd", "tokenizer/tokenizer_config.json", lambda f: _edit_json(f, _set("model_max_length", 12))),
    ("sd", "vae/config.json", lambda f: _edit_json(f, _set("scaling_factor", 0.5))),
    ("sd", "vae/diffusion_pytorch_model.safetensors", _flip_last_byte),
    ("sd", "scheduler/scheduler_config.json", lambda f: _edit_json(f, _set("beta_end", 0.02))),
    ("sd", "model_index.json", lambda f: _edit_json(f, _set("requires_safety_checker", True))),
    ("sd", "corrections.safetensors", _flip_last_byte),
    ("sd", "tadq_recipe.json", lambda f: _edit_json(f, lambda d: d["data"].__setitem__("name", "someone-else"))),
    ("sdxl", "text_encoder_2/model.safetensors", _flip_last_byte),
    ("sdxl", "tokenizer_2/tokenizer.json", lambda f: _edit_json(f, _swap_vocab)),
    ("sdxl", "model_index.json", lambda f: _edit_json(f, _set("force_zeros_for_empty_prompt", False))),
    ("pixart", "text_encoder/model.safetensors", _flip_last_byte),
    ("pixart", "tokenizer/tokenizer.json", lambda f: _edit_json(f, _t5_vocab)),
    ("pixart", "scheduler/scheduler_config.json", lambda f: _edit_json(f, _set("solver_order", 3))),
    ("pixart", "corrections.safetensors", _flip_last_byte),
    ("dit", "vae/config.json", lambda f: _edit_json(f, _set("scaling_factor", 0.5))),
    ("dit", "vae/diffusion_pytorch_model.safetensors", _flip_last_byte),
    ("dit", "scheduler/scheduler_config.json", lambda f: _edit_json(f, _set("beta_end", 0.03))),
    ("dit", "corrections.safetensors", _flip_last_byte),
]


def test_fresh_pipeline_artefacts_verify_and_load(arts):
    for family, art in arts.items():
        code, text = _verify(art)
        assert code == 0 and f"OK {art}" in text, (family, text)
        qmodel, scheduler = tadq.load(art)
        assert scheduler is not None and qmodel.recipe is not None
        if family != "dit":
            pipe = tadq.load_pipeline(art)
            assert pipe.tadq_recipe == qmodel.recipe
    assert "correction 2 (TCEC" in _verify(arts["sd"])[1]


@pytest.mark.parametrize(("family", "name", "damage"), DAMAGE, ids=[f"{f}:{n}" for f, n, _ in DAMAGE])
def test_damage_to_any_pipeline_file_is_named_everywhere(arts, tmp_path, family, name, damage):
    art = _copy(arts[family], tmp_path)
    before = (art / name).read_bytes()
    damage(art / name)
    assert (art / name).read_bytes() != before
    code, text = _verify(art)
    assert code == 1 and "FAILED" in text and name in text, text
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        tadq.load(art)
    if family != "dit":  # a prompt pipeline: refused before any component is used
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            tadq.load_pipeline(art)


def test_a_component_folder_swapped_in_from_another_pipeline_is_detected(arts, sources, tmp_path):
    for component in ("text_encoder", "vae", "tokenizer"):
        art = _copy(arts["sd"], tmp_path, f"art-{component}")
        shutil.rmtree(art / component)
        shutil.copytree(sources["sd-other"] / component, art / component)
        changed = [name for name, data in _all_bytes(art / component).items()
                   if data != (arts["sd"] / component / name).read_bytes()]
        if not changed:  # the random builder gives both pipelines the same tokenizer: nothing to detect
            assert component == "tokenizer"
            continue
        code, text = _verify(art)
        assert code == 1 and f"{component}/" in text, text
        with pytest.raises(ValueError, match=f"{component}/"):
            tadq.load(art)
        with pytest.raises(ValueError, match=f"{component}/"):
            tadq.load_pipeline(art)


def test_moved_copied_and_symlinked_pipeline_artefacts_load_and_verify(arts, tmp_path):
    reference, _ = tadq.load(arts["sd"])
    copied = _copy(arts["sd"], tmp_path, "copied")
    moved = tmp_path / "elsewhere" / "deeper" / "moved"
    moved.parent.mkdir(parents=True)
    os.rename(_copy(arts["sd"], tmp_path, "to-move"), moved)
    link = tmp_path / "link"
    link.symlink_to(copied, target_is_directory=True)
    relative = tmp_path / "rel-link"
    relative.symlink_to(Path("elsewhere") / "deeper" / "moved", target_is_directory=True)
    for where in (copied, moved, link, relative):
        code, text = _verify(where)
        assert code == 0, (where, text)
        qmodel, _ = tadq.load(where)
        state, expected = qmodel.state_dict(), reference.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]
                   for key, value in state.items())
        pipe = tadq.load_pipeline(where)
        assert pipe.tadq_recipe == reference.recipe


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_saving_a_pipeline_artefact_twice_gives_identical_bytes(sources, tmp_path, family):
    tac = (TACConfig(num_samples=2, seed=2),)
    kind, corrections = ("ddim", CORRECTIONS) if family == "sd" else ("dpmsolver++", tac)
    first = _quantize_pipeline(sources[family], kind, corrections)
    save_pipeline(first, sources[family], tmp_path / "a")
    save_pipeline(first, sources[family], tmp_path / "b")
    save_pipeline(_quantize_pipeline(sources[family], kind, corrections), sources[family], tmp_path / "c")
    a = _all_bytes(tmp_path / "a")
    assert a == _all_bytes(tmp_path / "b") and a == _all_bytes(tmp_path / "c")
    save_pipeline(first, sources[family], tmp_path / "a", overwrite=True)
    assert _all_bytes(tmp_path / "a") == a


@pytest.mark.parametrize("added", ["text_encoder/NOTES.md", "my-eval/results.csv", ".user-notes"])
def test_overwrite_of_a_pipeline_artefact_keeps_a_users_file(arts, sources, tmp_path, added):
    art = _copy(arts["sd"], tmp_path)
    (art / added).parent.mkdir(parents=True, exist_ok=True)
    (art / added).write_text("mine")
    qmodel, _ = tadq.load(arts["sd"])
    with pytest.raises(OutputRefused, match="after tadq saved it"):
        save_pipeline(qmodel, sources["sd"], art, overwrite=True)
    assert (art / added).read_text() == "mine"


def test_overwrite_of_a_pipeline_artefact_with_a_damaged_manifest_keeps_a_users_file(arts, sources, tmp_path):
    """The manifest is what tells tadq's files from the user's: when it cannot be read, the user's notes must not be
    deleted by --overwrite (they are not an artefact file tadq wrote)."""
    art = _copy(arts["sd"], tmp_path)
    (art / "my-eval").mkdir()
    (art / "my-eval" / "results.csv").write_text("mine")
    manifest = art / "tadq_manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])  # damaged (e.g. a sync conflict), the usual reason to overwrite
    qmodel, _ = tadq.load(arts["sd"])
    try:
        save_pipeline(qmodel, sources["sd"], art, overwrite=True)
    except OutputRefused:
        pass
    assert (art / "my-eval" / "results.csv").is_file(), "--overwrite deleted a file tadq did not write"


def test_cli_quantize_of_a_pipeline_folder_twice_gives_identical_bytes_and_overwrite_keeps_user_files(
        sources, tmp_path):
    args = ["quantize", str(sources["sd"]), "--preset", "W8A8", "--method", "naive", "--steps", "2",
            "--calib-trajectories", "2", "--calib-prompt", "a dog", "--guidance-scale", "2.0", "--correct", "ptqd",
            "--set", "weights.range_method=minmax", "--set", "activations.range_method=minmax",
            "--set", "calibration.samples_per_step=2", "--set", "calibration.num_steps_kept=2",
            "--set", "corrections.0.num_samples=2", "--threads", "1"]
    for out in ("a", "b"):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    assert _all_bytes(tmp_path / "a") == _all_bytes(tmp_path / "b")
    assert _verify(tmp_path / "a")[0] == 0
    (tmp_path / "a" / "vae" / "my-finetune-notes.txt").write_text("mine")
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "a"), "--overwrite"])
    assert result.exit_code == 2 and (tmp_path / "a" / "vae" / "my-finetune-notes.txt").read_text() == "mine"


# -- files added to, or dropped from the manifest of, a component folder the pipeline loader reads ------------------

ADDED_TOKENIZER_FILES = {
    # an extra token: "cat" becomes a new id (outside the text encoder's vocabulary)
    "added_tokens.json": {"cat": 90},
    # another pad token: "a" becomes special, prompts tokenize and pad differently
    "special_tokens_map.json": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "a",
                                "unk_token": "<|endoftext|>"},
}


@pytest.mark.parametrize("name", list(ADDED_TOKENIZER_FILES))
def test_verify_reports_a_file_added_to_a_tokenizer_folder(arts, tmp_path, name):
    art = _copy(arts["sd"], tmp_path)
    (art / "tokenizer" / name).write_text(json.dumps(ADDED_TOKENIZER_FILES[name]))
    code, text = _verify(art)
    assert code == 1 and f"tokenizer/{name}" in text, text


@pytest.mark.parametrize("name", list(ADDED_TOKENIZER_FILES))
def test_load_pipeline_refuses_a_tokenizer_file_added_after_saving(arts, tmp_path, name):
    """A file put into tokenizer/ after the save changes how every prompt is tokenized (transformers reads it), yet
    tadq.load_pipeline used it silently: a file the loader reads must be covered by the manifest."""
    art = _copy(arts["sd"], tmp_path)
    reference = tadq.load_pipeline(arts["sd"]).tokenizer("a cat").input_ids
    (art / "tokenizer" / name).write_text(json.dumps(ADDED_TOKENIZER_FILES[name]))
    try:
        pipe = tadq.load_pipeline(art)
    except ValueError as error:
        assert f"tokenizer/{name}" in str(error) or name in str(error)
        return
    changed = pipe.tokenizer("a cat").input_ids
    pytest.fail(f"load_pipeline accepted tokenizer/{name}, unlisted in the manifest; 'a cat' now tokenizes as "
                f"{changed} instead of {reference}")


def test_load_pipeline_refuses_text_encoder_weights_dropped_from_the_manifest(arts, tmp_path):
    """Removing a component file's entry from the manifest and changing the file: tadq.load checks that the files it
    reads are listed (LOADED_FILES), but load_pipeline also reads the text encoder, VAE and tokenizers."""
    art = _copy(arts["sd"], tmp_path)
    manifest = json.loads((art / "tadq_manifest.json").read_text())
    del manifest["files"]["text_encoder/model.safetensors"]
    manifest["digest"] = _digest(manifest["files"])  # rewritten whole: a stale digest is refused before this check
    (art / "tadq_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    _flip_last_byte(art / "text_encoder" / "model.safetensors")
    code, text = _verify(art)
    assert code == 1 and "text_encoder/model.safetensors" in text, text
    with pytest.raises(ValueError, match=r"text_encoder/model\.safetensors"):
        tadq.load_pipeline(art)


def test_save_quantized_refuses_a_pipeline_source_the_model_was_not_quantized_from(sources, tmp_path):
    """``save_quantized(..., pipeline_source=FOLDER)`` copied FOLDER's VAE and encoders beside any denoiser: a DiT
    saved with the folder of another DiT (another depth) was written without a word, and sampled with a VAE it was
    never calibrated for. ``save_pipeline`` checked the denoiser config; the writer now does, before writing."""
    other = _build_dit(tmp_path / "other-dit")
    _edit_json(other / "transformer" / "config.json", lambda config: config.update(num_layers=3))
    dit = DiTPipeline.from_pretrained(sources["dit"])
    qmodel = tadq.quantize(dit.transformer, dit.scheduler, _recipe("ddim", null_class=DIT_CLASSES),
                           conditions=RandomClassLabels(DIT_CLASSES, null_class=DIT_CLASSES), progress=False)
    with pytest.raises(ValueError, match=r"not the folder this model was quantized from.*num_layers"):
        save_quantized(qmodel, tmp_path / "art", dit.scheduler, pipeline_source=other)
    assert not (tmp_path / "art").exists()
    shutil.rmtree(other / "transformer")
    with pytest.raises(ValueError, match="config.json is missing"):
        save_quantized(qmodel, tmp_path / "art", dit.scheduler, pipeline_source=other)
    save_quantized(qmodel, tmp_path / "art", dit.scheduler, pipeline_source=sources["dit"])  # its own folder: taken
