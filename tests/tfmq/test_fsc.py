"""Finite-set calibration: one range per step, selected by the step index, keyed to the sampler grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.tfmq.common import SAMPLER, scheduler

from tadq import api
from tadq.quant.fake_quant import scale_and_zero_point
from tadq.quant.quantizer import quantizers_bypassed
from tadq.sampling import SamplerConfig, SamplingPlan
from tadq.tfmq import TemporalInformationBlock, deployment_grid
from tadq.tfmq.fsc import StepQuantizer


@pytest.fixture(scope="module")
def models(build_tfmq):
    return {fsc: build_tfmq(fsc=fsc) for fsc in ("tib", "model")}


def test_tib_ranges_are_the_exact_range_of_each_step(models):
    qmodel = models["tib"]
    correction = qmodel.corrections[0]
    tib = TemporalInformationBlock(qmodel.model, qmodel.adapter)
    assert set(correction.fsc_quantizers) == set(tib.activation_quantizers())
    column = correction.fsc_quantizers.index(f"{tib.features[0].layer}.input_quantizer")
    timesteps = deployment_grid(scheduler(), SAMPLER)
    for step in range(SAMPLER.num_steps):  # the projection's input is SiLU(emb) of that step alone, observed with
        with torch.no_grad(), quantizers_bypassed(qmodel.model, "activation"):  # FP activations as in Calibrate
            emb = tib.embedding(timesteps[step: step + 1])
        values = torch.nn.functional.silu(emb)
        scale, zero_point = scale_and_zero_point(values.min().reshape(1), values.max().reshape(1), 8, False)
        assert torch.equal(correction.fsc_scale[step, column], scale[0])
        assert torch.equal(correction.fsc_zero_point[step, column], zero_point[0])
    assert correction.fsc_scale[:, column].unique().numel() > 1  # the activation's range moves with t


def test_model_wide_ranges_move_with_the_noise_level(models):
    qmodel = models["model"]
    correction = qmodel.corrections[0]
    quantizers = {n for n, m in qmodel.model.named_modules() if isinstance(m, StepQuantizer)}
    assert quantizers == set(correction.fsc_quantizers) and len(quantizers) > 20
    conv_in = correction.fsc_quantizers.index("conv_in.input_quantizer")
    scales = correction.fsc_scale[:, conv_in]
    assert scales.unique().numel() == SAMPLER.num_steps  # x_t's range differs at every noise level
    assert scales[0] > scales[-1]  # x_T (unit Gaussian) spans more than x_0 in [-1, 1]
    # the per-row softmax quantizers (the default P granularity) compute their step per tensor: left dynamic
    softmax = [n for n, m in qmodel.model.named_modules() if n.endswith("softmax_quantizer")]
    assert softmax and not set(softmax) & quantizers


def test_the_network_refuses_to_run_without_a_step(models):
    qmodel = models["tib"]
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 999)
    with pytest.raises(RuntimeError, match="sampler step"):
        qmodel(x, t)
    api.sample(qmodel, scheduler(), SAMPLER, num_samples=2, seed=1, progress=False)
    with pytest.raises(RuntimeError, match="sampler step"):  # the hook clears the step after every model call
        qmodel(x, t)
    with qmodel.corrections[0].at_step(0):
        assert qmodel(x, t).shape == x.shape


def test_steps_select_their_own_ranges(models):
    qmodel = models["model"]
    correction = qmodel.corrections[0]
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), int(correction.grid_timesteps[3]))
    with torch.no_grad():
        outputs = []
        for step in (3, 4):
            with correction.at_step(step):
                outputs.append(qmodel(x, t))
    assert not torch.equal(*outputs)  # same input, other step: other ranges


@pytest.mark.parametrize("sampler", [SamplerConfig(kind="ddim", num_steps=6), SamplerConfig(kind="ddim", num_steps=8,
                                                                                           eta=1.0)])
def test_a_mismatched_grid_raises(models, sampler):
    with pytest.raises(ValueError, match="calibrated for ddim-8-eta0.0.*tadq.tfmq.apply_tfmq"):  # a real function
        api.sample(models["tib"], scheduler(), sampler, num_samples=2, seed=1, progress=False)


def test_a_mismatched_timestep_raises(models):
    correction = models["tib"].corrections[0]
    step = SamplingPlan.build(scheduler(), SAMPLER).steps[2]
    correction.check_grid(step)
    with pytest.raises(ValueError, match="timestep"):
        correction.check_grid(dataclasses.replace(step, t=step.t + 1))


def test_a_grid_that_differs_only_after_its_first_step_is_refused_before_any_forward(tiny_setup):
    """'trailing' and 'linspace' DDIM grids share their first timestep (999) and part ways at step 1: sampling
    with the other spacing ran step 0 on tables built for another grid before the walker refused step 1."""
    from diffusers import DDIMScheduler
    from tests.conftest import counting_forwards

    from tadq.config import CalibrationConfig
    from tadq.recipe import Deployment, Recipe
    from tadq.tfmq import TFMQConfig, TFMQMethod

    model, _, _ = tiny_setup
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    built_for, other = (DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
                        for spacing in ("trailing", "linspace"))
    grids = [SamplingPlan.build(s, sampler).timesteps() for s in (built_for, other)]
    assert grids[0][0] == grids[1][0] and not torch.equal(*grids)
    method = TFMQMethod(base="naive", tfmq=TFMQConfig(tiar_iters=2, maintenance="cache_fp"))
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=2)
    qmodel = api.quantize(model, built_for, Recipe.from_preset("W8A8", method=method, calibration=calibration,
                                                               deployments=(Deployment(sampler),)), progress=False)
    with counting_forwards(qmodel.model) as calls, pytest.raises(ValueError, match="built for timestep"):
        api.sample(qmodel, other, sampler, num_samples=1, seed=1, progress=False)
    assert calls[0] == 0
    api.sample(qmodel, built_for, sampler, num_samples=1, seed=1, progress=False)  # its own grid still samples


def test_a_base_reused_with_another_spacing_gets_tables_for_that_grid(tiny_setup):
    """``quantize(..., base=)`` returned a TFMQ base unchanged when its sampler key matched the recipe's, but the
    key names no timestep spacing: the base's tables, built on a 'leading' grid, were handed back for a 'trailing'
    scheduler, whose very first sampling step was then refused. Tables rebuilt for another grid are built on a
    copy: they were rebuilt inside the caller's base, which then refused its own grid."""
    from diffusers import DDIMScheduler

    from tadq.config import CalibrationConfig
    from tadq.recipe import Deployment, Recipe
    from tadq.tfmq import TFMQConfig, TFMQMethod

    model, _, _ = tiny_setup
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    leading, trailing = (DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
                         for spacing in ("leading", "trailing"))
    method = TFMQMethod(base="naive", tfmq=TFMQConfig(tiar_iters=2, maintenance="cache_fp"))
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=2)
    recipe = Recipe.from_preset("W8A8", method=method, calibration=calibration, deployments=(Deployment(sampler),))
    base = api.quantize(model, leading, recipe, progress=False)
    before = api.sample(base, leading, sampler, num_samples=1, seed=1, progress=False).images
    assert api.quantize(model, leading, recipe, base=base, progress=False) is base  # its own grid: reused as is
    reused = api.quantize(model, trailing, recipe, base=base, progress=False)
    assert torch.equal(reused.corrections[0].grid_timesteps, deployment_grid(trailing, sampler))
    assert torch.isfinite(api.sample(reused, trailing, sampler, num_samples=1, seed=1, progress=False).images).all()
    assert torch.equal(base.corrections[0].grid_timesteps, deployment_grid(leading, sampler))
    assert torch.equal(api.sample(base, leading, sampler, num_samples=1, seed=1, progress=False).images, before)


def test_model_wide_fsc_with_more_inputs_per_step_than_trajectories_is_refused_before_calibration(tiny_setup):
    """Model-wide FSC keeps ``fsc_samples_per_step`` inputs of ``num_samples`` FP trajectories at each step; more
    inputs than trajectories was accepted by ``TFMQConfig`` and failed in ``apply_tfmq``, after the calibration
    run, TIAR and the block reconstruction."""
    from tests.conftest import counting_forwards

    from tadq.config import CalibrationConfig
    from tadq.recipe import Deployment, Recipe
    from tadq.tfmq import TFMQConfig, TFMQMethod

    with pytest.raises(ValueError, match=r"fsc_samples_per_step \(8\).*num_samples \(4\)"):
        TFMQConfig(fsc="model", num_samples=4, fsc_samples_per_step=8)
    TFMQConfig(fsc="tib", num_samples=4, fsc_samples_per_step=8)  # unused without model-wide FSC
    settings = TFMQConfig(tiar_iters=2, num_samples=4, fsc_samples_per_step=4)
    with pytest.raises(ValueError, match="fsc_samples_per_step"):  # a replace goes through the same check
        dataclasses.replace(settings, fsc="model", num_samples=2)
    model, _, _ = tiny_setup
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    method = TFMQMethod(base="naive", tfmq=dataclasses.replace(settings, fsc="model"))
    recipe = Recipe.from_preset("W8A8", method=method,
                                calibration=CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2,
                                                              samples_per_step=2, batch_size=2),
                                deployments=(Deployment(sampler),))
    with counting_forwards(model) as calls:
        qmodel = api.quantize(model, scheduler(), recipe, progress=False)  # the limit itself is accepted
    assert calls[0] > 0 and len(qmodel.corrections[0].fsc_quantizers) > 0


def test_model_wide_fsc_reads_a_lower_precision_reference_in_the_networks_dtype(tiny_setup, build_tfmq):
    """An SVDQuant base quantized with ``dtype=bfloat16`` hands ``apply_tfmq`` its bfloat16 reference; model-wide
    FSC fed that reference's bfloat16 trajectory states to the float32 network ("Input type (c10::BFloat16) and
    bias type (float) should be the same"), after the whole base quantization had run."""
    import copy

    from tests.tfmq.common import tfmq_config

    from tadq.tfmq import apply_tfmq

    model, sched, _ = tiny_setup
    config = tfmq_config(fsc="model")
    reference = copy.deepcopy(model).to(torch.bfloat16)
    qmodel = apply_tfmq(copy.deepcopy(build_tfmq()), reference, sched, config, SAMPLER, progress=False)
    correction = qmodel.corrections[0]
    assert len(correction.fsc_quantizers) > 20 and next(qmodel.model.parameters()).dtype is torch.float32
    assert bool(torch.isfinite(correction.fsc_scale).all()) and bool((correction.fsc_scale > 0).all())
    assert torch.isfinite(api.sample(qmodel, sched, SAMPLER, num_samples=2, seed=1, progress=False).images).all()


def test_per_step_quantizers_are_installed_and_removed_on_the_networks_device(models):
    """``apply_tfmq`` builds the FSC tables on the CPU and installs them into the network where it runs: on a GPU the
    StepQuantizers (their tables and their single range, loaded into a fresh CPU quantizer) stayed on the CPU, and so
    did the plain quantizers ``release`` put back. The meta device stands for the GPU here."""
    import copy

    qmodel = copy.deepcopy(models["model"])
    correction = qmodel.corrections[0]
    assert correction.fsc_scale.device.type == "cpu"  # as apply_tfmq leaves them
    network = correction.release(qmodel.model).to("meta")
    correction.prepare(network, qmodel.adapter)
    installed = [m for m in network.modules() if isinstance(m, StepQuantizer)]
    assert len(installed) == len(correction.fsc_quantizers)
    assert {b.device.type for m in installed for b in m.buffers()} == {"meta"}
    correction.release(network)
    assert not any(isinstance(m, StepQuantizer) for m in network.modules())
    assert {b.device.type for b in network.buffers()} == {"meta"}


def test_fsc_refuses_fp8_activations_before_calibrating(monkeypatch):
    """FSC tabulates integer (Δ, z) per step; on fp8 activations it is refused before any calibration, and TIAR with
    the feature cache alone (fsc='off') is accepted."""
    from tadq.config import QuantConfig
    from tadq.tfmq import pipeline
    from tadq.tfmq.config import TFMQConfig

    monkeypatch.setattr(pipeline, "adapter_for", lambda *_: pytest.fail("reached the model before refusing"))
    config = QuantConfig.from_preset("W4A8-FP8")
    with pytest.raises(ValueError, match="FSC.*fp8_e4m3.*fsc='off'"):
        pipeline.quantize_tfmq(torch.nn.Linear(1, 1), scheduler(), config, TFMQConfig(), SAMPLER)
    pipeline.check_fsc_format(config, TFMQConfig(fsc="off"))
    pipeline.check_fsc_format(QuantConfig.from_preset("W4A8"), TFMQConfig())


def test_a_tfmq_recipe_with_fsc_on_fp8_activations_is_refused_when_made():
    from tadq.recipe import Recipe
    from tadq.tfmq import TFMQConfig, TFMQMethod

    with pytest.raises(ValueError, match="FSC.*fp8_e4m3"):
        Recipe.from_preset("W4A8-FP8", method=TFMQMethod(tfmq=TFMQConfig()))
    recipe = Recipe.from_preset("W4A8-FP8", method=TFMQMethod(tfmq=TFMQConfig(fsc="off")))
    assert recipe.label == "W4A8-FP8"
