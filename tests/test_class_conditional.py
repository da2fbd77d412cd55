"""Class labels and classifier-free guidance end to end on a tiny class-conditional UNet: calibrate, quantize
(naive and a short Q-Diffusion), fit PTQD, TAC and TCEC at a guidance scale, sample, save and load."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

import tadq
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.registry import adapter_for
from tadq.sampling import Conditioning, RandomClassLabels, SamplerConfig

NUM_CLASSES = 3
NULL = NUM_CLASSES  # the extra embedding row is the unconditional branch
LABELS = RandomClassLabels(NUM_CLASSES, null_class=NULL)
GUIDANCE = 2.5
SAMPLER = SamplerConfig("ddim", num_steps=4, eta=0.5)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
CORRECTIONS = [PTQDConfig(num_samples=8, seed=1), TACConfig(num_samples=8, seed=2),
               TCECConfig(num_samples=8, seed=3, select=False)]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_tiny_unet(num_class_embeds=NUM_CLASSES + 1)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False,
                                    conditions=LABELS, guidance_scale=GUIDANCE)
    return model, scheduler, calib


def _sample(denoiser, scheduler, guidance=GUIDANCE, **kwargs):
    options = {"num_samples": 5, "seed": 11, "batch_size": 3, "progress": False, "conditions": LABELS,
               "guidance_scale": guidance}
    return api.sample(denoiser, scheduler, SAMPLER, **(options | kwargs)).images


def test_the_adapter_declares_labels_and_refuses_calls_without_them(setup):
    model, _, _ = setup
    adapter = adapter_for(model)
    assert adapter.conditioning_inputs(model) == ("class_labels",)
    assert adapter.conditioning_inputs(build_tiny_unet()) == ()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with pytest.raises(ValueError, match="class-conditional"):
        adapter.predict_eps(model, x, t)
    with pytest.raises(ValueError, match="unconditional"):
        adapter.predict_eps(build_tiny_unet(), x, t, Conditioning(class_labels=torch.zeros(2, dtype=torch.long)))


def test_calibration_records_both_branches(setup):
    _, _, calib = setup
    half = len(calib) // 2
    assert calib.cond is not None and calib.cond.batch_size == len(calib)
    assert torch.equal(calib.x[:half], calib.x[half:])
    assert int(calib.cond.class_labels[:half].max()) < NUM_CLASSES
    assert torch.equal(calib.cond.class_labels[half:], torch.full((half,), NULL))


def test_labels_change_samples_and_guidance_needs_the_null_class(setup):
    model, scheduler, _ = setup
    guided = _sample(model, scheduler)
    assert torch.isfinite(guided).all() and not torch.equal(guided, _sample(model, scheduler, guidance=1.0))
    with pytest.raises(ValueError, match="unconditional branch"):
        _sample(model, scheduler, conditions=RandomClassLabels(NUM_CLASSES))
    with pytest.raises(ValueError, match="class-conditional"):
        _sample(model, scheduler, guidance=1.0, conditions=None)


def test_samples_are_batch_and_shard_invariant(setup):
    model, scheduler, _ = setup
    whole = _sample(model, scheduler, num_samples=6, batch_size=3)
    shard = api.sample(model, scheduler, SAMPLER, num_samples=3, seed=11, batch_size=3, progress=False,
                       conditions=LABELS, guidance_scale=GUIDANCE)
    assert torch.equal(shard.images, whole[:3])  # a worker's chunk equals the same rows of a single run


@pytest.mark.parametrize("method", ["naive", "qdiffusion"])
def test_quantize_correct_sample_save_load(setup, method, tmp_path):
    model, scheduler, calib = setup
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, method=method)
    config = dataclasses.replace(config, reconstruction=dataclasses.replace(
        config.reconstruction, weight_iters=4, activation_iters=4, batch_size=4))
    qmodel = api.quantize(model, scheduler, config, calibration=calib, progress=False)
    corrected = fit_corrections(qmodel, model, scheduler, SAMPLER, CORRECTIONS, batch_size=4, conditions=LABELS,
                                guidance_scale=GUIDANCE)
    assert [member.table_key.guidance_scale for member in corrected.corrections] == [GUIDANCE] * 3
    images = _sample(corrected, scheduler)
    assert torch.isfinite(images).all() and not torch.equal(images, _sample(qmodel, scheduler))

    with pytest.raises(ValueError, match="guidance scale"):
        _sample(corrected, scheduler, guidance=1.0)
    with pytest.raises(ValueError, match="guidance scale"):
        _sample(corrected, scheduler, guidance=4.0)

    corrected.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler), images)
    with pytest.raises(ValueError, match="guidance scale"):
        _sample(loaded, loaded_scheduler, guidance=1.0)


def test_recipe_with_guidance_calibrates_and_fits_through_the_public_api(setup):
    """``tadq.quantize(..., conditions=)`` samples calibration and fits at the recipe's deployment guidance; the
    result equals the same steps run by hand (calibration set → quantize → fit_corrections)."""
    model, scheduler, calib = setup
    recipe = tadq.Recipe(method=tadq.NaiveMethod(), calibration=CALIB, corrections=tuple(CORRECTIONS[:2]),
                         deployments=(tadq.Deployment(SAMPLER, guidance_scale=GUIDANCE),))
    through_api = api.quantize(model, scheduler, recipe, conditions=LABELS, progress=False, fit_batch_size=4)
    assert [member.table_key.guidance_scale for member in through_api.corrections] == [GUIDANCE] * 2
    by_hand = fit_corrections(api.quantize(model, scheduler, recipe.quant_config(), calibration=calib,
                                           progress=False),
                              model, scheduler, SAMPLER, CORRECTIONS[:2], batch_size=4, conditions=LABELS,
                              guidance_scale=GUIDANCE)
    assert torch.equal(_sample(through_api, scheduler), _sample(by_hand, scheduler))


def test_quantize_refuses_missing_or_unusable_conditions_before_any_work(setup):
    model, scheduler, _ = setup
    recipe = tadq.Recipe(method=tadq.NaiveMethod(), calibration=CALIB,
                         deployments=(tadq.Deployment(SAMPLER, guidance_scale=GUIDANCE),))
    with pytest.raises(ValueError, match="is conditional"):
        api.quantize(model, scheduler, recipe, progress=False)
    with pytest.raises(ValueError, match="unconditional branch"):
        api.quantize(model, scheduler, recipe, conditions=RandomClassLabels(NUM_CLASSES), progress=False)
    with pytest.raises(ValueError, match="unconditional but was given"):
        api.quantize(build_tiny_unet(), scheduler, recipe, conditions=LABELS, progress=False)


def test_tfmq_calibrates_a_class_conditional_model_with_guidance(setup):
    """TFMQ-DM's finite set is (t, label); its model-wide FSC ranges come from guided trajectories with labels."""
    from tadq.tfmq import TFMQConfig, TFMQMethod

    model, scheduler, _ = setup
    settings = TFMQConfig(num_samples=4, seed=5, fsc="model", fsc_samples_per_step=4, tiar=False,
                          freeze_time_projections=False)
    recipe = tadq.Recipe.from_preset("W4A8", method=TFMQMethod(base="naive", tfmq=settings), calibration=CALIB,
                                     deployments=(tadq.Deployment(SAMPLER, guidance_scale=GUIDANCE),))
    qmodel = api.quantize(model, scheduler, recipe, conditions=LABELS, progress=False)
    images = _sample(qmodel, scheduler)
    assert torch.isfinite(images).all()
    assert qmodel.corrections[0].sampler_key == SAMPLER.key


def test_svdquant_cost_runs_a_class_conditional_model(setup):
    """The cost probe runs one forward: a conditional network needs placeholder labels there (the DiT run broke)."""
    from tadq.config import QScheme
    from tadq.corrections.ptqd.bitops import bit_operations
    from tadq.recipe import Deployment
    from tadq.svdquant import SVDQuantMethod
    from tadq.svdquant.cost import cost_summary

    model, scheduler, calib = setup
    recipe = tadq.Recipe(method=SVDQuantMethod(alpha_grid=(0.5,), search_samples=4),
                         weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=2),
                         activations=QScheme(bits=4, granularity="per_group", group_size=4, smoothing=True),
                         calibration=CALIB, deployments=(Deployment(SAMPLER, GUIDANCE),))
    qmodel = api.quantize(model, scheduler, recipe, calibration=calib, conditions=LABELS, progress=False)
    summary = cost_summary(qmodel, steps=SAMPLER.num_steps)
    assert summary["bitops_quantized_gemms"] == SAMPLER.num_steps * bit_operations(qmodel) > 0
    assert summary["branch_macs"] > 0
