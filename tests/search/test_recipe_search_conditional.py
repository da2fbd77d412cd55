"""``tadq recipe`` on conditional and latent models (``SearchConditions``): a class-conditional model is searched
with its labels and guidance in calibration, fits and held-out scoring; a model without the conditions it needs is
refused before any work; a decoder turns latents into the images that are scored. Tiny model, tiny settings."""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.search.tiny_search import SAMPLER, tiny_scheduler, tiny_space

from tadq.api import load
from tadq.corrections.ptqd.bitops import bit_operations
from tadq.sampling import RandomClassLabels
from tadq.search import Budget, SearchConditions, heldout_seed, plan_search, run_search
from tadq.search.evaluate import evaluate_candidates
from tadq.search.report import write_report
from tadq.search.score import final_samples, score_samples

LABELS = RandomClassLabels(num_classes=3, null_class=3)  # the tiny model embeds 4 labels: 3 is "no class"
GUIDANCE = 2.0


def _space(**changes):
    return tiny_space(**(dict(presets=("W8A8",), bases=("naive",), stacks=("none", "tac"), guidance_scale=GUIDANCE)
                         | changes))


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("conditional-search")
    model, scheduler = build_tiny_unet(num_class_embeds=4), tiny_scheduler()
    result = run_search(model, scheduler, _space(), Budget("gbitops", 1e6), out, heldout_trajectories=4,
                        progress=False, conditioning=SearchConditions(LABELS))
    write_report(result, out)
    return {"model": model, "scheduler": scheduler, "out": out, "result": result}


def test_a_conditional_model_without_conditions_is_refused_before_any_work(tmp_path):
    model = build_tiny_unet(num_class_embeds=4)
    with pytest.raises(ValueError, match="conditions"):
        run_search(model, tiny_scheduler(), _space(), Budget("gbitops", 1e6), tmp_path, progress=False)
    unconditional = build_tiny_unet()
    with pytest.raises(ValueError, match="unconditional but was given conditions"):
        run_search(unconditional, tiny_scheduler(), _space(guidance_scale=1.0), Budget("gbitops", 1e6), tmp_path,
                   progress=False, conditioning=SearchConditions(LABELS))
    assert not any(tmp_path.iterdir())


def test_the_plan_counts_a_conditional_models_bit_operations_like_the_built_model(searched):
    model = searched["model"]
    plan = plan_search(model, _space(), Budget("gbitops", 1e6))
    qmodel, _ = load(searched["out"] / searched["result"].record("naive-W8A8")["artefact"])
    assert plan.gbitops["naive-W8A8"] == pytest.approx(bit_operations(qmodel) * SAMPLER.num_steps / 1e9, rel=1e-12)


def test_candidates_are_built_and_scored_with_the_labels_and_the_guidance(searched):
    result, out, model, scheduler = searched["result"], searched["out"], searched["model"], searched["scheduler"]
    assert all(r["status"] == "scored" for r in result.records) and len(result.records) == 2
    tac, _ = load(out / result.record("naive+tac-W8A8")["artefact"])
    assert tac.recipe.guidance_scale == GUIDANCE and len(tac.corrections) == 1
    # the score is the one of samples drawn with the held-out seed's labels and the guidance: recomputed here
    seed = heldout_seed(0)
    options = SearchConditions(LABELS).options(GUIDANCE)
    reference = final_samples(model, scheduler, SAMPLER, num_samples=4, seed=seed, **options)
    images = final_samples(tac, scheduler, SAMPLER, num_samples=4, seed=seed, **options)
    assert result.record("naive+tac-W8A8")["score"] == score_samples(images, reference, seed).to_json()
    with pytest.raises(ValueError, match="guidance scale"):  # TAC's tables were fitted at the search's guidance
        final_samples(tac, scheduler, SAMPLER, num_samples=4, seed=seed, conditions=LABELS)
    unguided, guided = (final_samples(model, scheduler, SAMPLER, num_samples=4, seed=seed, conditions=LABELS,
                                      guidance_scale=scale) for scale in (1.0, GUIDANCE))
    assert torch.equal(guided, reference) and not torch.equal(unguided, reference)
    space = json.loads((out / "report.json").read_text())["settings"]["space"]
    assert space["guidance_scale"] == GUIDANCE and space["conditions"] == LABELS.key


def test_the_evaluation_samples_the_evaluation_seeds_labels(searched):
    result, model, scheduler = searched["result"], searched["model"], searched["scheduler"]
    evaluation = evaluate_candidates(result, model, scheduler, searched["out"], num_samples=4,
                                     conditioning=SearchConditions(LABELS))
    qmodel, _ = load(searched["out"] / result.record("naive-W8A8")["artefact"])
    options = SearchConditions(LABELS).options(GUIDANCE)
    reference = final_samples(model, scheduler, SAMPLER, num_samples=4, seed=1000, **options)
    images = final_samples(qmodel, scheduler, SAMPLER, num_samples=4, seed=1000, **options)
    expected = score_samples(images, reference, 1000)
    assert evaluation["rows"]["naive-W8A8"]["median_psnr"] == pytest.approx(expected.median_psnr, abs=1e-9)


def test_a_decoder_turns_samples_into_the_images_that_are_scored(tmp_path):
    model, scheduler = build_tiny_unet(), tiny_scheduler()

    def decoder(latents):  # a stand-in for a VAE: any fixed map of the samples
        return torch.tanh(2.0 * latents.flip(-1))

    conditioning = SearchConditions(decoder=decoder, decoder_key="tanh-flip")
    space = _space(stacks=("none",), guidance_scale=1.0)
    result = run_search(model, scheduler, space, Budget("gbitops", 1e6), tmp_path, heldout_trajectories=4,
                        progress=False, conditioning=conditioning)
    qmodel, _ = load(tmp_path / result.record("naive-W8A8")["artefact"])
    seed = heldout_seed(0)
    raw = [final_samples(m, scheduler, SAMPLER, num_samples=4, seed=seed) for m in (qmodel, model)]
    decoded = score_samples(decoder(raw[0]), decoder(raw[1]), seed).to_json()
    assert result.record("naive-W8A8")["score"] == decoded
    assert decoded != score_samples(raw[0], raw[1], seed).to_json()


def test_a_decoder_needs_its_cache_key():
    with pytest.raises(ValueError, match="decoder_key"):
        SearchConditions(decoder=lambda x: x)
    with pytest.raises(ValueError, match="decoder_key"):
        SearchConditions(decoder_key="vae")


def test_the_cli_searches_a_class_conditional_folder_with_its_labels_and_guidance(tmp_path, ddpm_scheduler):
    from diffusers import DDPMPipeline
    from typer.testing import CliRunner

    from tadq.cli.app import app

    folder = tmp_path / "class-ddpm"
    DDPMPipeline(unet=build_tiny_unet(num_class_embeds=4), scheduler=ddpm_scheduler).save_pretrained(folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "recipe", str(folder), "--out", str(out), "--steps", "4", "--calib-trajectories", "8", "--fit-trajectories",
        "4", "--selection-samples", "4", "--heldout", "4", "--threads", "1", "--budget-bits", "W8A8", "--presets",
        "W8A8", "--bases", "naive", "--stacks", "none,tac", "--labels", "random", "--null-class", "3",
        "--guidance-scale", "2", "--evaluate", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["space"]["guidance_scale"] == 2.0
    assert report["settings"]["space"]["conditions"] == LABELS.key  # random labels over 3 classes, null class 3
    assert {c["status"] for c in report["candidates"]} == {"scored"}
    assert set(report["evaluation"]["rows"]) == {c["name"] for c in report["candidates"]}
    qmodel, _ = load(out / "model")
    assert qmodel.recipe.guidance_scale == 2.0


def test_the_cli_refuses_prompts_for_a_model_without_a_text_encoder_before_any_work(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from tadq.cli.app import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a seven\n")
    result = CliRunner().invoke(app, ["recipe", str(tiny_model_dir), "--out", str(tmp_path / "out"),
                                      "--budget-bits", "W8A8", "--calib-prompts", str(prompts)])
    assert result.exit_code == 2 and "takes no prompts" in " ".join(result.output.split())
    assert not (tmp_path / "out" / "cache").exists()
