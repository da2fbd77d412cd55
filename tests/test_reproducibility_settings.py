"""README, "What tadq guarantees", Determinism: the same seed gives the same numbers and artefact bytes under
execution settings that should not matter (how the model path is spelled, the working directory, the hash seed, a
fresh process or one that ran other commands, the order of ``--set`` flags and of ``--methods``), and the thread
count, which does matter, moves only what float rounding moves."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.cli.common import torch_setup
from tadq.cli.quantize import QuantFlags, parse_settings, resolve_recipe
from tadq.config import CalibrationConfig, QuantConfig
from tadq.io import WEIGHTS_FILE
from tadq.sampling import SamplerConfig

runner = CliRunner()
SRC = Path(__file__).resolve().parents[1] / "src"
QUANT = ["--steps", "2", "--calib-trajectories", "2", "--threads", "1"]


def _tree(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file: "byte-identical" means equal trees."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _differing(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    return sorted(name for name in set(a) | set(b) if a.get(name) != b.get(name))


def _quantize(model: str, out: Path, cache: Path) -> None:
    result = runner.invoke(app, ["quantize", model, "--out", str(out), "--cache-dir", str(cache), *QUANT])
    assert result.exit_code == 0, result.output


def test_artefact_and_cache_key_do_not_depend_on_how_the_model_folder_is_spelled(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    """diffusers records the folder a model was read from (``_name_or_path``) and its ``save_config`` wrote it into
    the artefact's ``unet/config.json``: the same model quantized from ``model``, ``/abs/model/`` or a symlink gave
    artefacts with different bytes, and the user's path travelled with every artefact."""
    link = tmp_path / "link-to-model"
    link.symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    spellings = {"relative": tiny_model_dir.name, "absolute-slash": f"{tiny_model_dir}/", "symlink": link.name,
                 "dot-dot": f"../{tmp_path.name}/{tiny_model_dir.name}"}
    trees, caches = {}, {}
    for name, spelled in spellings.items():
        _quantize(spelled, tmp_path / f"q-{name}", tmp_path / f"cache-{name}")
        trees[name] = _tree(tmp_path / f"q-{name}")
        caches[name] = sorted(p.name for p in (tmp_path / f"cache-{name}").iterdir())
    for name in spellings:
        assert _differing(trees["relative"], trees[name]) == [], name
        assert caches[name] == caches["relative"] and caches[name], name
    config = json.loads(trees["relative"]["unet/config.json"])
    assert "_name_or_path" not in config and config["_class_name"] == "UNet2DModel"
    for name, data in trees["absolute-slash"].items():  # no spelling of the input folder in any artefact file
        assert str(tmp_path).encode() not in data and tiny_model_dir.name.encode() not in data, name


def test_a_fresh_process_with_another_hash_seed_and_directory_writes_the_same_bytes(tmp_path, tiny_model_dir):
    """In this process after another quantization, and in a subprocess from another working directory under another
    ``PYTHONHASHSEED`` (set or dict order leaking into a file or key would show here)."""
    _quantize(str(tiny_model_dir), tmp_path / "warm-up", tmp_path / "cache-w")
    _quantize(str(tiny_model_dir), tmp_path / "here", tmp_path / "cache-here")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    model = os.path.relpath(tiny_model_dir, elsewhere)
    done = subprocess.run([sys.executable, "-m", "tadq.cli.app", "quantize", model, "--out", "../there",
                           "--cache-dir", "../cache-there", *QUANT],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    here = _tree(tmp_path / "here")
    assert _differing(here, _tree(tmp_path / "warm-up")) == []
    assert _differing(here, _tree(tmp_path / "there")) == []
    assert sorted((tmp_path / "cache-here").iterdir())[0].name == sorted((tmp_path / "cache-there").iterdir())[0].name


def test_threads_0_puts_back_the_count_an_earlier_command_set():
    """``--threads 0`` is "torch's default", but a command run after ``--threads 1`` in the same process (the CLI
    from Python, a notebook) kept one thread, so its artefact differed from the same command in a fresh process."""
    torch.set_num_threads(3)
    torch_setup(1)
    assert torch.get_num_threads() == 1
    torch_setup(2)  # a second count: 0 still goes back to the one before tadq's first
    torch_setup(0)
    assert torch.get_num_threads() == 3
    torch_setup(0)  # nothing of tadq's left to undo
    assert torch.get_num_threads() == 3
    torch_setup(1)
    torch.set_num_threads(4)  # the caller's own count after tadq's: theirs, kept
    torch_setup(0)
    assert torch.get_num_threads() == 4


def test_other_thread_counts_move_only_activation_steps_and_by_float_rounding(tiny_unet, ddpm_scheduler, tmp_path):
    """README: bytes are the same for the same thread count only. What may differ is bounded: weight ranges are
    min/max of the weights (exact in any summation order), so every weight code and weight step is bit-identical;
    activation steps come from float sums and move by rounding, orders of magnitude below one 8-bit step (a
    relative change of 1/255 ≈ 4e-3 would be a different range, not rounding; 1e-4 separates the two)."""
    calibration = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=2,
                                    num_steps_kept=2, samples_per_step=2)
    saved = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        qmodel = tadq.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=calibration),
                               progress=False)
        qmodel.save_pretrained(tmp_path / f"t{threads}", ddpm_scheduler)
        saved[threads] = load_file(tmp_path / f"t{threads}" / WEIGHTS_FILE)
    one, two = saved[1], saved[2]
    assert sorted(one) == sorted(two)
    for key in one:
        if key.endswith(".codes") or "weight_quantizer" in key or "input_quantizer" not in key:
            assert torch.equal(one[key], two[key]), key
        elif key.endswith(".scale"):
            assert torch.allclose(one[key], two[key], rtol=1e-4, atol=0), key
    assert any(k.endswith(".codes") for k in one) and any("input_quantizer.scale" in k for k in one)


SET_ITEMS = ["sampler.num_steps=10", "calibration.num_steps_kept=5", "calibration.num_trajectories=4",
             "calibration.samples_per_step=4", "weights.bits=4"]


def test_set_flags_give_the_same_recipe_in_any_order():
    """``--set sampler.num_steps=10 --set calibration.num_steps_kept=5`` was refused ("num_steps_kept (25) cannot
    exceed the sampler's steps (10)") and the reverse order accepted: each parent config was replaced alone, so
    fields of two configs that constrain each other were checked one at a time."""
    recipes = {resolve_recipe(None, None, QuantFlags(), parse_settings(list(order)))
               for order in itertools.permutations(SET_ITEMS)}
    assert len(recipes) == 1
    recipe = recipes.pop()
    assert recipe.sampler.num_steps == recipe.calibration.sampler.num_steps == 10
    assert recipe.calibration.num_steps_kept == 5 and recipe.weights.bits == 4
    # the two spellings of the one sampler agree: accepted, whatever the order
    same = ["sampler.num_steps=10", "calibration.sampler.num_steps=10", "calibration.num_steps_kept=5"]
    assert {resolve_recipe(None, None, QuantFlags(), parse_settings(list(order))).sampler.key
            for order in itertools.permutations(same)} == {"ddim-10-eta0.0"}


@pytest.mark.parametrize("items", [
    ["calibration.seed=3", 'calibration={"type": "CalibrationConfig", "version": 1, "data": {"seed": 7}}'],
    ["sampler.num_steps=10", "calibration.sampler.num_steps=12", "calibration.num_steps_kept=5"],
])
def test_set_flags_whose_order_would_decide_are_refused_naming_both(items):
    """A path inside another (``calibration`` and ``calibration.seed``) or one field given two values: which one won
    depended on the order of the flags (seed 7 one way, 3 the other)."""
    first, second = (item.partition("=")[0] for item in items[:2])
    for order in (items, items[::-1]):
        with pytest.raises(ValueError, match="overlap|different values") as caught:
            resolve_recipe(None, None, QuantFlags(), parse_settings(order))
        assert first in str(caught.value) and second in str(caught.value)


# ≈ 8 s on a 2-core AVX2 CPU (two runs): `make test-slow`
@pytest.mark.slow
def test_run_gives_the_same_numbers_and_cells_with_methods_in_any_order(tmp_path, tiny_model_dir):
    args = ["run", "--model", str(tiny_model_dir), "--presets", "W8A8", "--num-samples", "2", "--steps", "2",
            "--calib-trajectories", "2", "--batch-size", "2", "--threads", "1", "--recon-iters", "2"]
    rows, cells, models = {}, {}, {}
    for name, methods in (("ab", "naive,qdiffusion"), ("ba", "qdiffusion,naive")):
        out = tmp_path / name
        result = runner.invoke(app, [*args, "--methods", methods, "--out", str(out),
                                     "--cache-dir", str(tmp_path / f"cache-{name}")])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "results.json").read_text())
        rows[name] = {(row["method"], row["bits"]): {k: v for k, v in row.items() if not k.endswith("_s")}
                      for row in report["rows"]}
        cells[name] = {p.name.split("-", 1)[1] for p in (out / "cells").iterdir()}
        models[name] = {p.name: _tree(p) for p in (out / "models").iterdir() if p.is_dir()}
    assert rows["ab"] == rows["ba"] and len(rows["ab"]) == 3
    assert cells["ab"] == cells["ba"]
    assert sorted(models["ab"]) == sorted(models["ba"]) and len(models["ab"]) == 2  # the artefacts, byte for byte
    assert {k: _differing(v, models["ba"][k]) for k, v in models["ab"].items()} == {k: [] for k in models["ab"]}


def test_one_set_path_given_twice_with_two_values_is_refused():
    """``--set a=1 --set a=2`` kept the last value silently (the settings dict dropped the first before the recipe
    saw it); the same value twice is harmless."""
    from tadq.cli.quantize import parse_settings

    assert parse_settings(["calibration.seed=3", "calibration.seed=3"]) == {"calibration.seed": 3}
    with pytest.raises(ValueError, match="calibration.seed given twice with different values"):
        parse_settings(["calibration.seed=3", "calibration.seed=4"])
