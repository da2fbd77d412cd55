"""A rerun of `tadq recipe` in its own folder with other settings, interrupted after the search while exporting the
winner or evaluating it (minutes with --evaluate): recipe.json, model/ and the report must never describe two
different searches. recipe.json used to be the new winner's while report.json/.md and pareto.png still named the
earlier search's winner and candidates (or model/ still held the earlier winner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.recipe import load_recipe

FLAGS = ["--budget-bits", "W8A8", "--presets", "W8A8,W4A8", "--bases", "naive", "--steps", "2",
         "--calib-trajectories", "4", "--fit-trajectories", "4", "--selection-samples", "2", "--heldout", "4",
         "--batch-size", "4", "--threads", "1"]


def _search(model_dir, out, *flags):
    return CliRunner().invoke(app, ["recipe", str(model_dir), *FLAGS, "--out", str(out), *flags])


@pytest.mark.parametrize("where", ["tadq.search.search:save_quantized", "tadq.search.evaluate:evaluate_candidates"],
                         ids=["exporting", "evaluating"])
def test_an_interrupted_rerun_never_pairs_one_searchs_report_with_anothers_winner(where, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    import importlib

    out = tmp_path / "out"
    first = _search(tiny_model_dir, out, "--stacks", "none")
    assert first.exit_code == 0, first.output
    module_name, attribute = where.split(":")
    real = getattr(importlib.import_module(module_name), attribute)

    def interrupted(*args, **kwargs):
        if attribute == "save_quantized" and Path(args[1]) != out / "model":  # the search's own cached models
            return real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module_name), attribute, interrupted)
    rerun = _search(tiny_model_dir, out, "--stacks", "none,tac", "--evaluate", "2")
    assert rerun.exit_code != 0
    monkeypatch.undo()
    model_recipe = load_recipe(out / "model" / "tadq_recipe.json").name
    if (out / "recipe.json").exists():
        assert load_recipe(out / "recipe.json").name == model_recipe, "recipe.json and model/ are different winners"
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
        assert (out / "recipe.json").exists() and report["winner"] == load_recipe(out / "recipe.json").name, \
            "report.json names another search's winner than recipe.json"
    finished = _search(tiny_model_dir, out, "--stacks", "none,tac", "--evaluate", "2")
    assert finished.exit_code == 0, finished.output
    report = json.loads((out / "report.json").read_text())
    assert report["winner"] == load_recipe(out / "recipe.json").name == load_recipe(
        out / "model" / "tadq_recipe.json").name
    assert len(report["candidates"]) == 4 and (out / "pareto.png").exists() and (out / "report.md").exists()
