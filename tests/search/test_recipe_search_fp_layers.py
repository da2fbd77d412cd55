"""``tadq recipe`` with the floating-point layers axis (``SearchSpace.fp_layers``, ``--fp-layers``): the axis
multiplies the candidates with the right ``keep_fp_roles``, leaves the ``none`` names as they were, counts the FP
layers at 32 × 32 bits exactly as the built model does, and a budget between the two costs keeps the quantized
candidate and rules out the FP-layers one before building it. Tiny model, tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.search.tiny_search import SAMPLER, run_tiny_search, tiny_scheduler, tiny_space
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.config import DEFAULT_FP_LAYERS, FP_LAYER_PRESETS
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.search import Budget, Candidate, SearchSpace, plan_search
from tadq.search.evaluate import _is_readme_row
from tadq.search.space import gbitops_per_sample, quantized_layers
from tadq.svdquant.cost import cost_summary

FP = ("none", "first_last")
runner = CliRunner()


def _space(**changes) -> SearchSpace:
    return tiny_space(**(dict(presets=("W4A8",), bases=("naive",), stacks=("none", "tac"), fp_layers=FP) | changes))


def test_the_axis_doubles_the_candidates_with_the_right_recipes():
    plain, both = _space(fp_layers=("none",)), _space()
    assert SearchSpace().fp_layers == (DEFAULT_FP_LAYERS,)  # tadq run's layers in float
    names = [c.name for c in both.candidates()]
    assert len(names) == 2 * len(plain.candidates()) == len(set(names))
    assert names == ["naive-W4A8", "naive+tac-W4A8", "naive-W4A8-fp_first_last", "naive+tac-W4A8-fp_first_last"]
    for candidate in both.candidates():
        recipe = both.recipe(candidate)
        assert recipe.keep_fp_roles == FP_LAYER_PRESETS[candidate.fp_layers] == candidate.keep_fp_roles
        assert recipe.name == candidate.name
        # a stack is fitted on the base with the same floating-point layers
        assert candidate.base_candidate.fp_layers == candidate.fp_layers
        assert candidate.parent is None or candidate.parent.fp_layers == candidate.fp_layers
        assert candidate.parent is None or candidate.parent in both.candidates()[:names.index(candidate.name)]
    # the "none" candidates (names, recipes) are exactly those of a search without the axis
    assert [(c.name, plain.recipe(c)) for c in plain.candidates()] == \
        [(c.name, both.recipe(c)) for c in both.candidates() if c.fp_layers == "none"]
    assert both.recipe(Candidate("naive", "W4A8", ("tac",))).keep_fp_roles == ()


def test_names_stay_as_they_were_for_none_and_are_file_names_otherwise():
    assert Candidate("qdiffusion", "W4A8", ("tac", "tcec")).name == "qdiffusion+tac+tcec-W4A8"
    assert Candidate("naive", "W4A4", fp_layers="none").name == "naive-W4A4"
    assert Candidate("qdiffusion", "W4A8", ("tac",), "first_last").name == "qdiffusion+tac-W4A8-fp_first_last"
    assert Candidate("svdquant", "W4A4", (), "First_Last_Time ").name == "svdquant-W4A4-fp_first_last_time"
    for key in FP_LAYER_PRESETS:
        name = Candidate("qdiffusion", "W4A8", ("tac", "tcec"), key).name
        assert all(ch.isalnum() or ch in "+-_" for ch in name), name


@pytest.mark.parametrize("make", [
    lambda: _space(fp_layers=("none", "first_and_last")),
    lambda: Candidate("naive", "W4A8", fp_layers="all"),
    lambda: _space(fp_layers="first_last"),  # a bare string is not a tuple of keys
    lambda: _space(fp_layers=()),
])
def test_an_unknown_or_missing_fp_layers_key_is_refused(make):
    with pytest.raises(ValueError, match="fp_layers") as error:
        make()
    if "unknown" in str(error.value):
        assert all(key in str(error.value) for key in FP_LAYER_PRESETS)  # the message lists the keys


@pytest.mark.parametrize("base", ["naive", "svdquant"])
def test_plan_bit_operations_of_first_last_equal_those_of_the_built_model(base):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_tiny_unet()
    preset = "W4A4" if base == "svdquant" else "W4A8"
    space = _space(presets=(preset,), bases=(base,), stacks=("none",))
    plan = plan_search(model, space, Budget("gbitops", 1e6))
    fp, plain = Candidate(base, preset, (), "first_last"), Candidate(base, preset)
    assert plan.gbitops[fp.name] > plan.gbitops[plain.name]
    kept = quantized_layers(model, space.recipe(plain)) - quantized_layers(model, space.recipe(fp))
    assert kept == {"conv_in", "conv_out"}  # the tiny UNet's input and output convs
    qmodel = tadq.quantize(model, tiny_scheduler(), space.recipe(fp), progress=False)
    if base == "svdquant":  # its measure with the low-rank branches of the layers still quantized
        built = cost_summary(qmodel, SAMPLER.num_steps)["bitops"] / 1e9
    else:
        built = bit_operations(qmodel) * SAMPLER.num_steps / 1e9
    assert plan.gbitops[fp.name] == pytest.approx(built, rel=1e-12)


def test_a_budget_between_the_two_costs_keeps_none_and_rules_out_first_last():
    model = build_tiny_unet()
    space = _space(stacks=("none",))
    plain, fp = space.candidates()
    low, high = (gbitops_per_sample(model, space.recipe(c)) for c in (plain, fp))
    assert low < high
    plan = plan_search(model, space, Budget("gbitops", (low + high) / 2))
    assert [c.name for c in plan.feasible] == [plain.name]
    assert fp.name in plan.ruled_out and "Gbit-ops/sample > budget" in plan.ruled_out[fp.name]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """naive W4A8, stacks none and tac, with and without FP first/last layers, under a budget all fit."""
    return run_tiny_search(_space(), tmp_path_factory.mktemp("fp-layers-search"))


def test_the_search_builds_each_fp_layers_base_once_and_fits_its_stacks_on_it(searched):
    result, out = searched["result"], searched["out"]
    assert result.stats["bases_built"] == 2 and result.stats["corrections_fitted"] == 2
    assert all(r["status"] == "scored" for r in result.records)
    assert {r["name"]: r["fp_layers"] for r in result.records} == {
        "naive-W4A8": "none", "naive+tac-W4A8": "none",
        "naive-W4A8-fp_first_last": "first_last", "naive+tac-W4A8-fp_first_last": "first_last"}
    record = result.record("naive+tac-W4A8-fp_first_last")
    qmodel, _ = tadq.load(out / record["artefact"])
    assert qmodel.recipe.keep_fp_roles == ("input_conv", "output_conv") and len(qmodel.corrections) == 1
    assert record["gbitops"] == pytest.approx(bit_operations(qmodel) * SAMPLER.num_steps / 1e9, rel=1e-12)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["space"]["fp_layers"] == list(FP)
    assert {c["name"]: c["fp_layers"] for c in report["candidates"]} == {r["name"]: r["fp_layers"]
                                                                         for r in result.records}


def test_readme_rows_are_every_layer_or_the_headlines_fp_layers(searched):
    rows = {r["name"]: _is_readme_row(r) for r in searched["result"].records}
    assert rows == {"naive-W4A8": True, "naive+tac-W4A8": False,  # not a README row, with or without the axis
                    "naive-W4A8-fp_first_last": True, "naive+tac-W4A8-fp_first_last": False}
    assert _is_readme_row({"name": "qdiffusion+tac+tcec-W4A8", "base": "qdiffusion", "stack": "tac+tcec"})
    assert _is_readme_row({"name": "qdiffusion+tac+tcec-W4A8-fp_first_last", "base": "qdiffusion",
                           "stack": "tac+tcec", "fp_layers": "first_last"})
    assert not _is_readme_row({"name": "qdiffusion+tac+tcec-W4A8-fp_first_last_time", "base": "qdiffusion",
                               "stack": "tac+tcec", "fp_layers": "first_last_time"})


def _cli(tmp_path, model_dir, *flags):
    args = ["recipe", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "4", "--calib-trajectories", "8",
            "--fit-trajectories", "4", "--selection-samples", "4", "--heldout", "4", "--threads", "1",
            "--presets", "W4A8", "--bases", "naive", "--stacks", "none", *flags]
    return runner.invoke(app, args)


def test_the_cli_refuses_an_unknown_fp_layers_key_before_any_work(tmp_path, tiny_model_dir, monkeypatch):
    import tadq.search

    def never(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(tadq.search, "run_search", never)
    result = _cli(tmp_path, tiny_model_dir, "--budget-bits", "W4A8", "--fp-layers", "none,first_lsat")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "unknown fp_layers 'first_lsat'" in text and "first_last_time" in text
    assert not (tmp_path / "out" / "cache").exists()


def test_the_cli_searches_the_axis_and_records_it(tmp_path, tiny_model_dir):
    # the W4A8 preset's bit-operations lie between the two: the FP first/last candidate is over budget
    result = _cli(tmp_path, tiny_model_dir, "--budget-bits", "W4A8", "--fp-layers", "none, first_last")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["space"]["fp_layers"] == ["none", "first_last"]
    status = {c["name"]: c["status"] for c in report["candidates"]}
    assert status == {"naive-W4A8": "scored", "naive-W4A8-fp_first_last": "over budget"}
    assert report["winner"] == "naive-W4A8"
    assert not (tmp_path / "out" / "cache" / "models" / "naive-W4A8-fp_first_last").exists()


def test_the_cli_default_searches_the_headlines_fp_layers_under_that_presets_cost(tmp_path, tiny_model_dir):
    # no --fp-layers: tadq run's default; --budget-bits W4A8 is the W4A8 preset's cost with those layers in float,
    # so the headline's W4A8 model fits exactly (an every-layer W4A8 budget would rule it out)
    result = _cli(tmp_path, tiny_model_dir, "--budget-bits", "W4A8")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    name = f"naive-W4A8-fp_{DEFAULT_FP_LAYERS}"
    assert report["settings"]["space"]["fp_layers"] == [DEFAULT_FP_LAYERS]
    assert {c["name"]: c["status"] for c in report["candidates"]} == {name: "scored"}
    record = next(c for c in report["candidates"] if c["name"] == name)
    assert report["budget"]["value"] == pytest.approx(record["gbitops"], rel=1e-12)
    assert f"fp_layers={DEFAULT_FP_LAYERS}" in report["budget"]["source"]
