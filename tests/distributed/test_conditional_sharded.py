"""Sharded sampling of a class-conditional model with guidance: each chunk is what any rank would compute alone
(labels and noise come from (seed, index)), and the run key holds the conditions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq.distributed.sampling import sample_sharded
from tadq.registry import adapter_for
from tadq.sampling import RandomClassLabels, SamplerConfig, SamplingPlan, sample

SAMPLER = SamplerConfig("ddim", num_steps=3, eta=0.5)
LABELS = RandomClassLabels(3, null_class=3)


def test_chunks_equal_what_a_lone_rank_samples_and_the_key_holds_the_conditions(tmp_path):
    model, scheduler = build_tiny_unet(num_class_embeds=4), DDPMScheduler()
    options = {"num_samples": 6, "seed": 3, "batch_size": 2, "chunk_size": 2, "progress": False,
               "conditions": LABELS, "guidance_scale": 2.0}
    images = sample_sharded(model, scheduler, SAMPLER, out_dir=tmp_path / "run", **options).run.read()
    adapter = adapter_for(model)
    plan = SamplingPlan.build(scheduler, SAMPLER, 2.0)
    for start in (4, 0, 2):  # any order, any "rank"
        alone = sample(lambda x, t, cond: adapter.predict_eps(model, x, t, cond), plan, indices=[start, start + 1],
                       seed=3, sample_shape=(1, 8, 8), batch_size=2, conditions=LABELS, progress=False)
        assert torch.equal(alone.images, images[start: start + 2])
    with pytest.raises(ValueError):
        sample_sharded(model, scheduler, SAMPLER, out_dir=tmp_path / "run", **(options | {"guidance_scale": 3.0}))


def test_the_cli_samples_and_measures_a_latent_class_conditional_artefact_as_tadq_evaluate_does(tmp_path):
    """`tadq sample-sharded` refused every conditional model (the library took conditions, the command had no flag)
    and measured latents as images. On the shipped DiT it now draws labels from (seed, index) with the artefact's
    guidance, decodes both runs with the folder's VAE for the image metrics, and gives `tadq evaluate`'s numbers
    for the same artefact, seed and batches."""
    import json

    from typer.testing import CliRunner

    from tadq.cli.app import app
    from tadq.zoo.dit import shipped_dit_path

    runner = CliRunner()
    dit, artefact = shipped_dit_path(), tmp_path / "w8a8"
    small = ["--num-samples", "4", "--batch-size", "2", "--threads", "1"]

    def ok(args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output

    ok(["quantize", dit, "--preset", "W8A8", "--steps", "4", "--calib-trajectories", "4", "--out", artefact,
        "--cache-dir", tmp_path / "cache", "--threads", "1"])
    ok(["sample-sharded", dit, "--steps", "4", *small, "--out-dir", tmp_path / "fp"])
    ok(["sample-sharded", artefact, *small, "--out-dir", tmp_path / "q", "--reference-dir", tmp_path / "fp"])
    ok(["evaluate", artefact, "--reference", dit, "--features", "digits", *small, "--out", tmp_path / "eval"])
    sharded = json.loads((tmp_path / "q" / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"][1]
    assert sharded["labels"] == json.loads((tmp_path / "fp" / "metrics.json").read_text())["labels"] is not None
    # the same samples and decoded images, scored per sample by the same functions: the means of 4 float32 values
    # may be summed in another order (at most 4 ulp relative), the final MSE in float64. FD reads classifier
    # features of batches of another composition (float32 round-off in every feature, through a covariance square
    # root): 1e-4 relative is some hundred ulp. One flipped label would move agreement by 1/4.
    eps = torch.finfo(torch.float32).eps
    for key, rel in (("psnr", 4 * eps), ("ssim", 4 * eps), ("final_mse", 4 * eps), ("fd_digits", 1e-4)):
        assert sharded["metrics"][key] == pytest.approx(evaluated[key], rel=rel), key
    assert sharded["metrics"]["agreement"] == evaluated["agreement"]
