"""``tadq recipe`` (tadq.search): budget honoured, held-out seeds apart from the evaluation seed, resume without
new work, recipe.json round trip, and the CLI's refusals before any expensive work. Tiny model, tiny budgets."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.search.tiny_search import SAMPLER, tiny_scheduler, tiny_space
from typer.testing import CliRunner

import tadq
from tadq.cli.app import app
from tadq.cli.quantize import QuantFlags, resolve_recipe
from tadq.config import DEFAULT_FP_LAYERS
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.recipe import load_recipe, recipe_from_dict
from tadq.search import Budget, Candidate, SearchSpace, heldout_seed, plan_search, run_search
from tadq.search.report import write_report
from tadq.search.score import robust_score
from tadq.search.search import choose_winner, export_winner
from tadq.search.space import gbitops_per_sample

EVAL_SEED = 1000
runner = CliRunner()


def _space(**changes) -> SearchSpace:
    fields = dict(presets=("W8A8", "W4A8"), bases=("naive", "qdiffusion"), stacks=("none", "tac", "tac+tcec"))
    return tiny_space(**(fields | changes))


class SeedRecorder:
    """Every seed any sampling run of the process draws initial noise from (calibration, fits, scoring)."""

    def __init__(self) -> None:
        import tadq.sampling.walker as walker

        self.walker, self.original, self.seeds = walker, walker.initial_noise, set()

    def __enter__(self) -> SeedRecorder:
        def recording(seed, indices, shape):
            self.seeds.add(int(seed))
            return self.original(seed, indices, shape)

        self.walker.initial_noise = recording
        return self

    def __exit__(self, *exc) -> None:
        self.walker.initial_noise = self.original


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """One search at the W4A8 bit-operations budget over W8A8 and W4A8 (W8A8 is over it)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, scheduler, space = build_tiny_unet(), tiny_scheduler(), _space()
    budget = Budget("gbitops", gbitops_per_sample(model, space.recipe(Candidate("naive", "W4A8"))), "W4A8")
    out = tmp_path_factory.mktemp("search")
    with SeedRecorder() as recorder:
        result = run_search(model, scheduler, space, budget, out, heldout_trajectories=4, eval_seed=EVAL_SEED,
                            progress=False)
    export_winner(result, out, scheduler)
    write_report(result, out)
    return {"model": model, "scheduler": scheduler, "space": space, "budget": budget, "out": out,
            "result": result, "seeds": recorder.seeds}


def test_the_search_never_builds_or_scores_a_candidate_over_budget(searched):
    result, out, budget = searched["result"], searched["out"], searched["budget"]
    over = [r for r in result.records if r["preset"] == "W8A8"]
    assert over and all(r["status"] == "over budget" and r["score"] is None for r in over)
    assert not any((out / "cache" / "models" / r["name"]).exists() for r in over)  # never even built
    scored = [r for r in result.records if r["status"] == "scored"]
    assert {r["preset"] for r in scored} == {"W4A8"} and len(scored) == 6
    assert all(r["gbitops"] <= budget.value for r in scored)
    assert result.record(result.winner)["status"] == "scored"
    report = json.loads((out / "report.json").read_text())
    assert report["winner"] == result.winner and report["why"]
    assert {c["name"] for c in report["candidates"]} == {r["name"] for r in result.records}
    assert all(c["score"] is None for c in report["candidates"] if c["preset"] == "W8A8")
    assert (out / "pareto.png").stat().st_size > 0 and "Pareto" not in result.front  # front holds names
    assert set(result.front) <= {r["name"] for r in scored} and (out / "report.md").is_file()


def test_held_out_scoring_seeds_never_equal_the_evaluation_seed(searched):
    result, out = searched["result"], searched["out"]
    seeds = json.loads((out / "report.json").read_text())["seeds"]
    assert seeds["evaluation"] == EVAL_SEED and seeds["heldout"] == heldout_seed(0)
    assert EVAL_SEED not in {v for k, v in seeds.items() if k != "evaluation"}
    assert {r["score"]["seed"] for r in result.records if r["score"]} == {seeds["heldout"]}
    # every sampling run of the search (calibration, correction fits, TCEC selection, scoring), instrumented
    assert EVAL_SEED not in searched["seeds"]
    assert seeds["heldout"] in searched["seeds"] and seeds["calibration"] in searched["seeds"]


def test_a_rerun_reuses_every_finished_candidate_without_new_work(searched, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(searched["out"], out)
    again = run_search(searched["model"], searched["scheduler"], searched["space"], searched["budget"], out,
                       heldout_trajectories=4, eval_seed=EVAL_SEED, progress=False)
    assert again.stats == {"bases_built": 0, "corrections_fitted": 0, "candidates_scored": 0,
                           "candidates_reused": 6, "models_loaded": 0}
    assert again.winner == searched["result"].winner
    # a changed held-out count rescores, but builds and fits nothing
    rescored = run_search(searched["model"], searched["scheduler"], searched["space"], searched["budget"], out,
                          heldout_trajectories=3, eval_seed=EVAL_SEED, progress=False)
    assert rescored.stats["candidates_scored"] == 6
    assert rescored.stats["bases_built"] == rescored.stats["corrections_fitted"] == 0


def test_a_smaller_budget_in_the_same_folder_reuses_scores_and_drops_what_no_longer_fits(searched, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(searched["out"], out)
    sizes = sorted(r["bytes"] for r in searched["result"].records if r["status"] == "scored")
    budget = Budget("bytes", sizes[0])  # only the smallest artefacts (no correction tables) fit
    space = dataclasses.replace(searched["space"], presets=("W4A8",))
    again = run_search(searched["model"], searched["scheduler"], space, budget, out, heldout_trajectories=4,
                       eval_seed=EVAL_SEED, progress=False)
    assert again.stats["candidates_scored"] == again.stats["bases_built"] == again.stats["corrections_fitted"] == 0
    over = [r for r in again.records if r["status"] == "over budget"]
    assert over and all(r["bytes"] > budget.value and r["score"] is None for r in over)
    assert all(r["bytes"] <= budget.value for r in again.records if r["status"] == "scored")
    assert again.record(again.winner)["bytes"] <= budget.value


def test_an_interrupted_search_resumes_from_its_finished_candidates(tmp_path):
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    space = _space(presets=("W4A8",), bases=("naive",))
    budget = Budget("gbitops", 1.0)
    finished = []

    def interrupt(record):
        finished.append(record["name"])
        if len(finished) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_search(model, scheduler, space, budget, tmp_path, heldout_trajectories=4, progress=False,
                   on_candidate=interrupt)
    assert finished == ["naive-W4A8", "naive+tac-W4A8"]
    resumed = run_search(model, scheduler, space, budget, tmp_path, heldout_trajectories=4, progress=False)
    # only TCEC is fitted, on top of the saved TAC model; the base is neither rebuilt nor recalibrated
    assert resumed.stats == {"bases_built": 0, "corrections_fitted": 1, "candidates_scored": 1,
                             "candidates_reused": 2, "models_loaded": 1}
    assert [r["reused"] for r in resumed.records] == [True, True, False]


def test_recipe_json_round_trips_and_the_artefact_loads(searched):
    out, result = searched["out"], searched["result"]
    expected = recipe_from_dict(result.record(result.winner)["recipe"])
    assert load_recipe(out / "recipe.json") == expected
    assert resolve_recipe(out / "recipe.json", None, QuantFlags()) == expected  # what tadq quantize --recipe reads
    qmodel, _ = tadq.load(out / "model")
    assert qmodel.recipe == expected
    assert len(qmodel.corrections) == len(expected.corrections)


def test_bit_operations_from_the_plan_equal_those_of_the_built_model(searched):
    out, result = searched["out"], searched["result"]
    record = next(r for r in result.records if r["name"] == "qdiffusion+tac-W4A8")
    qmodel, _ = tadq.load(out / record["artefact"])
    assert record["gbitops"] == pytest.approx(bit_operations(qmodel) * SAMPLER.num_steps / 1e9, rel=1e-12)


def test_the_score_is_robust_to_a_few_heavy_tailed_trajectories():
    calm = torch.full((60,), 30.0)
    tails = torch.cat([calm, torch.full((4,), 0.0)])  # four trajectories gone badly wrong
    assert robust_score(tails, tails, 1).median_psnr == pytest.approx(30.0)
    assert robust_score(tails, tails, 1).mean_psnr < 28.5


def test_ties_go_to_the_cheaper_candidate():
    def record(name, gbitops, score):
        return {"name": name, "gbitops": gbitops, "bytes": 1, "status": "scored",
                "score": {"median_psnr": score, "num_trajectories": 4, "seed": 7}}

    records = [record("big", 2.0, 30.03), record("small", 1.0, 30.0), record("bad", 0.5, 20.0)]
    winner, why = choose_winner(records, Budget("gbitops", 3.0), tie_db=0.05)
    assert winner == "small" and "cheaper" in why
    assert choose_winner(records, Budget("gbitops", 3.0), tie_db=0.0)[0] == "big"


def test_plan_refuses_a_budget_no_candidate_fits():
    with pytest.raises(ValueError, match="too small for every candidate"):
        plan_search(build_tiny_unet(), _space(), Budget("gbitops", 1e-9))


def _cli(tmp_path, model_dir, *flags):
    args = ["recipe", str(model_dir), "--out", str(tmp_path / "out"), "--steps", "4", "--calib-trajectories", "8",
            "--fit-trajectories", "4", "--selection-samples", "4", "--heldout", "4", "--threads", "1", *flags]
    return runner.invoke(app, args)


@pytest.mark.parametrize(("flags", "message"), [
    (["--budget-bits", "W3A3"], "--budget-bits: unknown preset 'W3A3'"),
    ([], "exactly one budget"),
    (["--budget-bits", "W4A8", "--budget-bytes", "1000"], "exactly one budget"),
    (["--budget-gbitops", "1e-9"], "too small for every candidate"),
    (["--budget-bytes", "10"], "too small for every candidate"),
    (["--budget-bits", "W4A8", "--seed", "1000"], "equals the evaluation seed"),
    (["--budget-bits", "W4A8", "--seed", "0", "--eval-seed", "200000"], "held-out scoring seed 200000 equals"),
    (["--budget-bits", "W4A8", "--presets", "W4A8,W9A9"], "unknown preset"),
    (["--budget-bits", "W4A8", "--stacks", "tac,magic"], "unknown correction stack"),
])
def test_the_cli_refuses_bad_input_before_any_expensive_work(tmp_path, tiny_model_dir, monkeypatch, flags, message):
    import tadq.search

    def never(*args, **kwargs):
        raise AssertionError("the search started")

    monkeypatch.setattr(tadq.search, "run_search", never)
    result = _cli(tmp_path, tiny_model_dir, *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out" / "cache").exists()


def test_a_block_wise_preset_is_a_bit_budget_as_it_is_a_searched_preset(tmp_path, tiny_model_dir, monkeypatch):
    """`--presets W4A8-G16` is searched, but `--budget-bits W4A8-G16` was refused as "not a preset" (an exact match on
    the plain preset names). Read as `--presets` reads it, a block-wise preset's budget is its widths' bit-operations:
    block steps rescale partial sums, they add no MACs."""
    import tadq.search

    budgets = []

    def planned(model, space, budget):
        budgets.append(budget)
        raise ValueError("planned")  # stop before the search

    monkeypatch.setattr(tadq.search, "plan_search", planned)
    for preset in (" w4a8-g16 ", "W4A8"):
        result = _cli(tmp_path, tiny_model_dir, "--budget-bits", preset, "--presets", "W4A8-G16", "--bases", "naive",
                      "--stacks", "none")
        assert result.exit_code == 2 and "planned" in result.output, result.output
    blocked, plain = budgets
    assert blocked.kind == plain.kind == "gbitops" and blocked.value == plain.value > 0
    assert blocked.source.startswith("the W4A8-G16 preset's bit-operations")


def test_the_cli_writes_recipe_artefact_report_and_evaluation(tmp_path, tiny_model_dir):
    result = _cli(tmp_path, tiny_model_dir, "--budget-bits", "W4A8", "--presets", "W8A8,W4A8", "--bases", "naive",
                  "--stacks", "none,tac", "--evaluate", "4")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("recipe.json", "report.md", "report.json", "pareto.png", "model/tadq_recipe.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    plain, tac = (f"{name}-W4A8-fp_{DEFAULT_FP_LAYERS}" for name in ("naive", "naive+tac"))  # the default FP layers
    assert report["winner"] in {plain, tac}
    assert report["evaluation"]["seed"] == 1000 and "README row" in report["evaluation"]["summary"]
    summary = report["evaluation"]["summary"]
    if report["winner"] == plain:  # the only README row in the budget: nothing else to compare with
        assert summary.startswith("no README row other than the winner")
    else:  # naive+tac is not a README row: compared with naive-W4A8, and not called one
        assert "itself" not in summary and f"best README row within the budget, {plain}" in summary
    assert set(report["evaluation"]["rows"]) == {plain, tac}
    assert load_recipe(out / "recipe.json").name == report["winner"]


def test_a_candidate_whose_samples_diverge_is_recorded_as_diverged_and_never_wins(tmp_path, monkeypatch):
    """Its NaN median PSNR compared as neither better nor worse than the others (max() could pick it); PSNR now
    refuses non-finite images, so the search records such a candidate as diverged, with why, and reuses that."""
    import tadq.search.search as search_module

    model, scheduler = build_tiny_unet(), tiny_scheduler()
    space = _space(presets=("W4A8",), bases=("naive",), stacks=("none", "tac"))
    real = search_module.final_samples

    def diverging(denoiser, *args, **kwargs):  # the TAC candidate blows up
        images = real(denoiser, *args, **kwargs)
        recipe = getattr(denoiser, "recipe", None)
        return images.fill_(float("nan")) if recipe is not None and recipe.corrections else images

    monkeypatch.setattr(search_module, "final_samples", diverging)
    result = run_search(model, scheduler, space, Budget("gbitops", 1.0), tmp_path, heldout_trajectories=4,
                        progress=False)
    status = {r["name"]: (r["status"], r.get("why")) for r in result.records}
    assert status["naive+tac-W4A8"] == ("diverged", "4 of 4 held-out samples are NaN or Inf")
    assert status["naive-W4A8"][0] == "scored" and result.winner == "naive-W4A8"
    again = run_search(model, scheduler, space, Budget("gbitops", 1.0), tmp_path, heldout_trajectories=4,
                       progress=False)
    assert again.stats["candidates_reused"] == 2 and again.winner == "naive-W4A8"
    write_report(again, tmp_path)  # the report shows the status and why of a diverged candidate
    assert "diverged: 4 of 4 held-out samples are NaN or Inf" in (tmp_path / "report.md").read_text()
