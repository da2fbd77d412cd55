"""``tadq recipe`` with the SVDQuant-family bases (svdquant, smoothquant) and GPTQ-rounded Q-Diffusion bases: the
bases build, take corrections and score through the search path; the plan's bit-operations count the low-rank
branch exactly as ``tadq.svdquant.cost`` measures the built model; the W4A4 budget keeps the branch-free base and
rules out the branched one; ``--recon-rounding`` reaches the recipes and the report. Tiny model, tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.search.tiny_search import SAMPLER, run_tiny_search, tiny_scheduler, tiny_space
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.config import ReconstructionConfig
from tadq.corrections.ptqd.bitops import FP_BITS, bit_operations
from tadq.quant.lowrank import effective_rank
from tadq.quant.transformed import TransformedQuantLayer
from tadq.search import BASES, Budget, Candidate, SearchSpace, plan_search, run_search
from tadq.search.space import branch_macs, forward_macs, gbitops_per_sample, quantized_layers
from tadq.svdquant import SVDQUANT_GROUP, SVDQUANT_RANK, SVDQuantMethod, svdquant_schemes
from tadq.svdquant.cost import cost_summary

runner = CliRunner()


def _space(**changes) -> SearchSpace:
    fields = dict(presets=("W4A4",), bases=("svdquant", "smoothquant"), stacks=("none", "tac"))
    return tiny_space(**(fields | changes))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """SVDQuant and smoothing-only bases at W4A4, each bare and with TAC, under a budget they all fit."""
    return run_tiny_search(_space(), tmp_path_factory.mktemp("svdquant-search"))


def test_the_svdquant_family_is_searched_under_the_readme_row_names():
    assert {"naive", "qdiffusion", "svdquant", "smoothquant"} <= set(BASES)
    names = [c.name for c in _space(stacks=("none", "tac", "tac+tcec")).candidates()]
    assert names == ["svdquant-W4A4", "svdquant+tac-W4A4", "svdquant+tac+tcec-W4A4", "smoothquant-W4A4",
                     "smoothquant+tac-W4A4", "smoothquant+tac+tcec-W4A4"]


def test_the_svdquant_base_is_the_recipe_of_tadq_runs_rows():
    from tadq.experiments.rows.recipes import SVDQUANT_ROWS, recipes_for_row
    from tadq.experiments.run import RunConfig

    space = _space(fit_trajectories=256, selection_samples=64)  # the correction configs' own defaults
    run = RunConfig(sampler=SAMPLER, calibration=space.calibration, presets=("W4A4",), methods=("svdquant",),
                    fp_layers="none")  # the search's default space keeps no layer in float
    for row, stack in SVDQUANT_ROWS.items():
        assert space.recipe(Candidate("svdquant", "W4A4", stack)) == recipes_for_row(row, "W4A4", run), row


def test_smoothquant_is_svdquant_without_the_branch():
    space = _space()
    svd, smooth = (space.recipe(Candidate(base, "W4A4")) for base in ("svdquant", "smoothquant"))
    assert isinstance(svd.method, SVDQuantMethod) and svd.method == smooth.method
    assert (svd.weights.lowrank_rank, smooth.weights.lowrank_rank) == (SVDQUANT_RANK, 0)
    assert svd.activations == smooth.activations
    assert smooth.activations.smoothing and smooth.activations.dynamic
    assert (smooth.activations.granularity, smooth.activations.group_size) == ("per_group", SVDQUANT_GROUP)
    assert (svd.weights, svd.activations) == svdquant_schemes("W4A4")
    assert (smooth.weights, smooth.activations) == svdquant_schemes("W4A4", rank=0)


def test_svdquant_bases_build_take_corrections_and_score(searched):
    result, out = searched["result"], searched["out"]
    assert [r["name"] for r in result.records] == ["svdquant-W4A4", "svdquant+tac-W4A4", "smoothquant-W4A4",
                                                   "smoothquant+tac-W4A4"]
    assert all(r["status"] == "scored" and torch.isfinite(torch.tensor(r["score"]["median_psnr"]))
               for r in result.records)
    assert result.stats["bases_built"] == 2 and result.stats["corrections_fitted"] == 2  # TAC on each saved base
    qmodel, _ = tadq.load(out / result.record("svdquant+tac-W4A4")["artefact"])
    assert [type(c).__name__ for c in qmodel.recipe.corrections] == ["TACConfig"] and len(qmodel.corrections) == 1
    layers = [m for m in qmodel.model.modules() if isinstance(m, TransformedQuantLayer)]
    assert layers and any(m.rank for m in layers) and all(m.smooth is not None for m in layers)
    qmodel, _ = tadq.load(out / result.record("smoothquant-W4A4")["artefact"])
    assert not any(m.rank for m in qmodel.model.modules() if isinstance(m, TransformedQuantLayer))
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["space"]["bases"] == ["svdquant", "smoothquant"]
    assert report["settings"]["space"]["reconstruction_rounding"] == "gptq"  # the default


def test_plan_bit_operations_count_the_branch_as_the_built_model_costs(searched):
    result, out, model = searched["result"], searched["out"], searched["model"]
    for name in ("svdquant-W4A4", "svdquant+tac-W4A4", "smoothquant-W4A4"):
        qmodel, _ = tadq.load(out / result.record(name)["artefact"])
        measured = cost_summary(qmodel, SAMPLER.num_steps)
        assert result.record(name)["gbitops"] * 1e9 == pytest.approx(measured["bitops"], rel=1e-12), name
        assert measured["bitops"] == pytest.approx(
            (bit_operations(qmodel) + measured["branch_macs"] // SAMPLER.num_steps * FP_BITS**2)
            * SAMPLER.num_steps, rel=1e-12)
    # the branch is not free, and smoothing alone costs what the plain preset costs
    svd, smooth = result.record("svdquant-W4A4")["gbitops"], result.record("smoothquant-W4A4")["gbitops"]
    naive = gbitops_per_sample(model, _space(bases=("naive",)).recipe(Candidate("naive", "W4A4")))
    assert smooth == pytest.approx(naive, rel=1e-12) and svd > smooth


def test_branch_macs_use_the_rank_the_build_caps_per_layer():
    model, space = build_tiny_unet(), _space()
    recipe = space.recipe(Candidate("svdquant", "W4A4"))
    macs, quantized = forward_macs(model), quantized_layers(model, recipe)
    ranks = {name: effective_rank(model.get_submodule(name).weight.shape[0],
                                  model.get_submodule(name).weight[0].numel(), SVDQUANT_RANK) for name in quantized}
    assert set(ranks.values()) - {SVDQUANT_RANK}  # the tiny model has layers under the cap (4 channels: rank 2)
    assert branch_macs(model, recipe, macs, quantized) > 0
    assert branch_macs(model, space.recipe(Candidate("smoothquant", "W4A4")), macs, quantized) == 0


def test_the_w4a4_budget_keeps_smoothing_only_and_rules_out_the_branch():
    model = build_tiny_unet()
    space = _space(bases=("naive", "svdquant", "smoothquant"))
    budget = Budget("gbitops", gbitops_per_sample(model, space.recipe(Candidate("naive", "W4A4"))), "W4A4")
    plan = plan_search(model, space, budget)
    assert {c.name for c in plan.feasible} == {"naive-W4A4", "naive+tac-W4A4", "smoothquant-W4A4",
                                               "smoothquant+tac-W4A4"}
    assert set(plan.ruled_out) == {"svdquant-W4A4", "svdquant+tac-W4A4"}


def test_an_unknown_base_is_refused_naming_every_base():
    for make in (lambda: _space(bases=("svd",)), lambda: Candidate("svd", "W4A4")):
        with pytest.raises(ValueError, match="unknown base method 'svd'") as caught:
            make()
        assert all(base in str(caught.value) for base in ("naive", "qdiffusion", "svdquant", "smoothquant"))


def _cli(tmp_path, model_dir, *flags):
    args = ["recipe", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "4", "--calib-trajectories", "8",
            "--fit-trajectories", "4", "--selection-samples", "4", "--heldout", "4", "--threads", "1", *flags]
    return runner.invoke(app, args)


class _Stop(ValueError):
    pass


def _captured(monkeypatch, tmp_path, model_dir, *flags) -> dict:
    """The search space and plan the CLI hands to ``run_search`` for ``flags`` (the search itself never runs)."""
    import tadq.search

    seen = {}

    def capture(model, scheduler, space, budget, out, **kwargs):
        seen.update(space=space, plan=kwargs["plan"])
        raise _Stop("captured")

    monkeypatch.setattr(tadq.search, "run_search", capture)
    result = _cli(tmp_path, model_dir, *flags)
    assert result.exit_code == 2 and "captured" in result.output, result.output
    return seen


def test_the_cli_feeds_recon_rounding_and_the_new_bases_to_the_search(tmp_path, tiny_model_dir, monkeypatch):
    seen = _captured(monkeypatch, tmp_path, tiny_model_dir, "--budget-bits", "W4A4", "--presets", "W4A4", "--bases",
                     "qdiffusion,svdquant,smoothquant", "--stacks", "none,tac", "--recon-rounding", "adaround",
                     "--fp-layers", "none")  # the README's every-layer names
    space, plan = seen["space"], seen["plan"]
    assert space.reconstruction.rounding == "adaround" and space.bases == ("qdiffusion", "svdquant", "smoothquant")
    assert plan.recipes["qdiffusion+tac-W4A4"].method.reconstruction.rounding == "adaround"
    assert {"svdquant-W4A4", "svdquant+tac-W4A4"} <= set(plan.ruled_out)
    assert "smoothquant+tac-W4A4" in {c.name for c in plan.feasible}


def test_the_cli_feeds_the_gptq_target_damping_to_every_qdiffusion_recipe(tmp_path, tiny_model_dir, monkeypatch):
    cases = (((), ReconstructionConfig().gptq_target_damp), (("--recon-gptq-target-damp", "0.01"), 0.01))
    for flags, expected in cases:
        seen = _captured(monkeypatch, tmp_path, tiny_model_dir, "--budget-bits", "W4A8", "--presets", "W4A8",
                         "--bases", "qdiffusion", "--stacks", "none", *flags)
        assert seen["space"].reconstruction.gptq_target_damp == expected
        assert {r.method.reconstruction.gptq_target_damp for r in seen["plan"].recipes.values()} == {expected}


def test_the_cli_feeds_the_gptq_target_prior_to_every_qdiffusion_recipe(tmp_path, tiny_model_dir, monkeypatch):
    default = ReconstructionConfig().gptq_target_prior
    other = "zero" if default == "weight" else "weight"
    for flags, expected in (((), default), (("--recon-gptq-target-prior", other.upper()), other)):
        seen = _captured(monkeypatch, tmp_path, tiny_model_dir, "--budget-bits", "W4A8", "--presets", "W4A8",
                         "--bases", "qdiffusion", "--stacks", "none", *flags)
        assert seen["space"].reconstruction.gptq_target_prior == expected
        assert {r.method.reconstruction.gptq_target_prior for r in seen["plan"].recipes.values()} == {expected}


@pytest.mark.parametrize(("flags", "message"), [
    (["--recon-gptq-target-prior", "ones"], "gptq_target_prior must be 'zero' or 'weight'"),
    (["--bases", "naive,svd"], "searched bases: ['naive', 'qdiffusion', 'svdquant', 'smoothquant']"),
    (["--recon-rounding", "nearest"], "rounding must be 'adaround', 'gptq' or 'gptq_adaround'"),
    (["--recon-gptq-target-damp", "0"], "gptq_target_damp must be > 0"),
])
def test_the_cli_refuses_an_unknown_base_or_rounding_before_any_work(tmp_path, tiny_model_dir, monkeypatch, flags,
                                                                      message):
    import tadq.search

    def never(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(tadq.search, "run_search", never)
    result = _cli(tmp_path, tiny_model_dir, "--budget-bits", "W4A8", *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out" / "cache").exists()


def test_a_gptq_rounded_qdiffusion_base_builds_and_scores_through_the_search(tmp_path):
    space = _space(presets=("W4A8",), bases=("qdiffusion",), stacks=("none",),
                   reconstruction=ReconstructionConfig(rounding="gptq", activation_iters=0, batch_size=8,
                                                       gptq_inputs=16))
    result = run_search(build_tiny_unet(), tiny_scheduler(), space, Budget("gbitops", 1e6), tmp_path,
                        heldout_trajectories=4, progress=False)
    record = result.record("qdiffusion-W4A8")
    assert record["status"] == "scored" and result.settings["space"]["reconstruction_rounding"] == "gptq"
    qmodel, _ = tadq.load(tmp_path / record["artefact"])
    assert qmodel.recipe.method.reconstruction.rounding == "gptq"
    assert qmodel.recipe == space.recipe(Candidate("qdiffusion", "W4A8"))


def test_an_fp8_preset_is_refused_for_the_svdquant_bases_when_the_space_is_made():
    with pytest.raises(ValueError, match="SVDQuant.*no fp8 form.*W4A8-FP8"):
        SearchSpace(presets=("W4A8", "W4A8-FP8"), bases=("naive", "smoothquant"))
    with pytest.raises(ValueError, match="no fp8 form"):
        svdquant_schemes("W8A8-FP8")
    assert SearchSpace(presets=("W4A8-FP8",), bases=("naive", "qdiffusion")).presets == ("W4A8-FP8",)
