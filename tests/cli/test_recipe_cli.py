"""``tadq quantize --recipe`` and the flags for the common cases: a complete artefact that samples bit-identically
in another process, and sample/evaluate refusing a sampler its tables were not fitted for."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.quantize import QuantFlags, parse_settings, resolve_recipe
from tadq.io.load import read_recipe
from tadq.recipe import load_recipe
from tadq.safefiles import load_checked

runner = CliRunner()
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TINY = ["--steps", "4", "--calib-trajectories", "8", "--set", "calibration.num_steps_kept=2",
        "--set", "calibration.samples_per_step=4", "--set", "calibration.batch_size=8"]
TINY_RECON = ["--set", "method.reconstruction.weight_iters=2", "--set", "method.reconstruction.activation_iters=2"]


def _tiny_corrections(count: int) -> list[str]:
    items = []
    for index in range(count):
        items += ["--set", f"corrections.{index}.num_samples=8"]
    return items


def _flat(output: str) -> str:
    """The output on one line, without the boxes rich draws around usage errors."""
    return " ".join(output.replace("│", " ").split())


def _sample_in_subprocess(artefact: Path, out: Path) -> torch.Tensor:
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "tadq.cli.app", "sample", str(artefact), "--num-samples", "3", "--seed", "5",
               "--threads", "1", "--out", str(out / "s.png"), "--tensor-out", str(out / "s.safetensors")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return load_checked(out / "s.safetensors", "samples")[0]["images"]


@pytest.mark.parametrize(("recipe", "extra"), [
    ("qdiffusion+tac+tcec-W4A8.json", [*TINY_RECON, *_tiny_corrections(2),
                                       "--set", "corrections.1.selection_samples=4"]),
    pytest.param("tfmq+ptqd-W4A8.json", [*TINY_RECON, *_tiny_corrections(1), "--set", "method.tfmq.tiar_iters=2",
                                         "--set", "method.tfmq.num_samples=8",
                                         "--set", "method.tfmq.fsc_samples_per_step=4"],
                 marks=pytest.mark.slow),  # ≈ 10 s; the TFMQ artefact round trip stays in tests/tfmq/test_io.py
])
def test_shipped_recipe_quantizes_to_an_artefact_that_samples_identically_elsewhere(tmp_path, tiny_model_dir,
                                                                                     recipe, extra):
    import tadq

    out = tmp_path / "art"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", str(RECIPES / recipe), "--out",
                                 str(out), "--cache-dir", str(tmp_path / "cache"), *TINY, *extra])
    assert result.exit_code == 0, result.output
    saved = read_recipe(out)
    expected = load_recipe(RECIPES / recipe)
    assert saved.name == expected.name and saved.corrections[0].num_samples == 8
    assert type(saved.method) is type(expected.method) and saved.sampler.num_steps == 4

    qmodel, scheduler = tadq.load(out)
    assert qmodel.recipe == saved and len(qmodel.corrections) == len(saved.corrections) + (recipe[:4] == "tfmq")
    here = tadq.sample(qmodel, scheduler, saved.sampler, num_samples=3, seed=5, progress=False).images
    assert torch.equal(here, _sample_in_subprocess(out, tmp_path))  # recipe's sampler is the default there

    result = runner.invoke(app, ["sample", str(out), "--steps", "5", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "fitted for ddim-4-eta0.0, not ddim-5-eta0.0" in _flat(result.output)
    assert not (tmp_path / "x.png").exists()
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(tiny_model_dir), "--eta", "0.5"])
    assert result.exit_code == 2 and "not ddim-4-eta0.5" in _flat(result.output)


def test_flags_build_the_recipe(tmp_path):
    flags = QuantFlags(preset="w4a4", method="qdiffusion", steps=10, eta=0.5, correct=("tac", "tcec"),
                       calib_seed=3, recon_iters=7)
    recipe = resolve_recipe(None, None, flags, parse_settings(["corrections.0.num_samples=32", "name=mine"]))
    assert (recipe.label, type(recipe.method).__name__, recipe.method.reconstruction.weight_iters) == (
        "W4A4", "QDiffusionMethod", 7)
    assert recipe.sampler.key == "ddim-10-eta0.5" == recipe.calibration.sampler.key
    assert [type(c).__name__ for c in recipe.corrections] == ["TACConfig", "TCECConfig"]
    assert [c.seed for c in recipe.corrections] == [3, 3] and recipe.corrections[0].num_samples == 32
    assert recipe.name == "mine"
    gptq = resolve_recipe(None, None, QuantFlags(method="qdiffusion", recon_rounding="gptq", recon_iters=7))
    assert (gptq.method.reconstruction.rounding, gptq.method.reconstruction.weight_iters) == ("gptq", 7)
    from_config = resolve_recipe(None, None, QuantFlags(method="qdiffusion"))
    assert from_config.method.reconstruction.rounding == "gptq"  # the library default when the flag is absent
    from_file = resolve_recipe(RECIPES / "qdiffusion+ptqd-W8A8.json", None, QuantFlags(preset="W4A8"))
    assert from_file.label == "W4A8" and type(from_file.corrections[0]).__name__ == "PTQDConfig"
    assert type(resolve_recipe(None, None, QuantFlags(method="tfmq")).method).__name__ == "TFMQMethod"
    flags = QuantFlags(preset="W4A8", method="qdiffusion", correct=("tac", "tcec"), split_shortcut=True,
                       quantize_attention=True, steps=50, eta=0.0, recon_rounding="adaround",
                       recon_activation_iters=400, fp_layers="none")  # the README row (its setting), from flags
    shipped = load_recipe(RECIPES / "qdiffusion+tac+tcec-W4A8.json")
    assert resolve_recipe(None, None, flags, {"name": shipped.name}) == shipped


@pytest.mark.parametrize(("args", "message"), [
    (["--correct", "magic"], "unknown corrections ['magic']"),
    (["--method", "naive", "--recon-iters", "3"], "apply to --method qdiffusion or tfmq"),
    (["--method", "naive", "--recon-rounding", "gptq"], "apply to --method qdiffusion or tfmq"),
    (["--method", "qdiffusion", "--recon-rounding", "nearest"], "rounding must be"),
    (["--set", "method.nope=1"], "--set method.nope: NaiveMethod has no field 'nope'"),
    (["--set", "novalue"], "FIELD.PATH=VALUE"),
    (["--recipe", "r.json", "--config", "c.json"], "not both"),
    (["--device", "cuda:7"], "cuda"),
    (["--device", "tpu"], "tpu"),
    (["--dtype", "float8"], "float8"),
])
def test_bad_recipe_input_is_refused_before_any_work(tmp_path, tiny_model_dir, args, message):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in _flat(result.output)
    assert not out.exists()


def test_recipe_file_with_an_unknown_field_is_refused(tmp_path, tiny_model_dir):
    payload = json.loads((RECIPES / "naive-W8A8.json").read_text())
    payload["data"]["calibration"]["data"]["trajectories"] = 3
    (tmp_path / "r.json").write_text(json.dumps(payload))
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", str(tmp_path / "r.json"), "--out",
                                 str(tmp_path / "q")])
    assert result.exit_code == 2
    assert "Recipe.calibration: CalibrationConfig has no fields ['trajectories']" in _flat(result.output)


class _Resolved(Exception):
    """Stops ``tadq quantize`` right after it resolved the recipe (before the model is loaded)."""


def _resolved_recipe(monkeypatch, args: list[str]):
    """The recipe ``tadq quantize ARGS`` would build, from the real flag parsing."""
    import tadq.cli.quantize as quantize_module

    seen = []

    def capture(*given, **options):
        seen.append(resolve_recipe(*given, **options))
        raise _Resolved

    monkeypatch.setattr(quantize_module, "resolve_recipe", capture)
    runner.invoke(app, ["quantize", *args])
    assert seen, f"tadq quantize {' '.join(args)} stopped before resolving its recipe"
    return seen[0]


def test_docs_flags_build_the_same_recipe_as_the_shipped_file(monkeypatch, tmp_path):
    """docs/recipes.md shows a recipes/ file and "the same recipe from flags": the flags must build it (its name
    aside); they named another correction stack, the default layers in float and the default rounding."""
    import shlex

    from tadq.models import shipped_model_path

    page = (Path(__file__).resolve().parents[2] / "docs" / "recipes.md").read_text(encoding="utf-8")
    block = page.split("## From the command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    from_flags = next(line for line in lines if "the same recipe from flags" in line)
    from_file = lines[lines.index(from_flags) - 1]
    recipes = []
    for line in (from_file, from_flags):
        words = shlex.split(line.split("#", 1)[0])[2:]  # past "tadq quantize"
        words = [str(shipped_model_path()) if w == "MODEL" else w for w in words]
        words[words.index("--out") + 1] = str(tmp_path / "out")
        words = [str(RECIPES.parent / w) if w.startswith("recipes/") else w for w in words]
        recipes.append(_resolved_recipe(monkeypatch, words))
    file_recipe, flag_recipe = recipes
    assert dataclasses.replace(flag_recipe, name=file_recipe.name) == file_recipe


def test_repeated_correct_flags_stack_in_the_order_given(monkeypatch, tmp_path, tiny_model_dir):
    """``--correct tac --correct tcec,ptqd`` is the stack tac, tcec, ptqd: the flag held one string, so a repeated
    ``--correct`` kept only the last one and the artefact was fitted with TCEC + PTQD alone, without a word."""
    recipe = _resolved_recipe(monkeypatch, [str(tiny_model_dir), "--out", str(tmp_path / "q"), "--correct", "tac",
                                            "--correct", "tcec,ptqd"])
    assert [type(c).__name__ for c in recipe.corrections] == ["TACConfig", "TCECConfig", "PTQDConfig"]
