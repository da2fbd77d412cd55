"""Separate activation ranges for the unconditional guidance branch (``QuantConfig.branch_ranges``): rows are
marked when both branches share a batch, each branch is calibrated on its own rows and quantized with its own
ranges, and the second set travels with the artefact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

import tadq
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig
from tadq.guidance_ranges import BranchRanges, branch_quantizers
from tadq.quant import QScheme
from tadq.quant.modules import QuantLinear
from tadq.registry import adapter_for
from tadq.sampling import Conditioning, RandomClassLabels, SamplerConfig

NUM_CLASSES, GUIDANCE = 3, 3.0
LABELS = RandomClassLabels(NUM_CLASSES, null_class=NUM_CLASSES)
SAMPLER = SamplerConfig("ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=8, batch_size=8)


def _recipe(branch_ranges: bool, guidance: float = GUIDANCE, **fields) -> tadq.Recipe:
    return tadq.Recipe.from_preset("W4A8", calibration=CALIB, branch_ranges=branch_ranges,
                                   deployments=(tadq.Deployment(SAMPLER, guidance_scale=guidance),), **fields)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny_unet(num_class_embeds=NUM_CLASSES + 1)


def test_guided_batches_mark_their_rows_and_models_never_see_the_marks():
    uncond = Conditioning(class_labels=torch.tensor([3, 3]))
    cond = Conditioning(class_labels=torch.tensor([0, 1]), unconditional=uncond)
    guided = cond.guidance_batch()
    assert guided.unconditional_rows.tolist() == [True, True, False, False]
    assert guided.class_labels.tolist() == [3, 3, 0, 1]
    stacked = cond.stacked_branches()
    assert stacked.unconditional_rows.tolist() == [False, False, True, True]
    assert stacked.class_labels.tolist() == [0, 1, 3, 3]
    assert "unconditional_rows" not in guided.describe() and guided.without_markers().unconditional_rows is None
    assert guided.rows([1, 2]).unconditional_rows.tolist() == [True, False]


def test_each_branch_is_calibrated_on_its_own_rows(model):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False,
                                    conditions=LABELS, guidance_scale=GUIDANCE)
    marks = calib.cond.unconditional_rows
    assert marks is not None and int(marks.sum()) == len(calib) // 2
    split = api.quantize(model, scheduler, _recipe(True), calibration=calib, progress=False)
    shared = api.quantize(model, scheduler, _recipe(False), calibration=calib, progress=False)

    def only(rows):  # a plain model calibrated on the chosen rows alone
        subset = dataclasses.replace(calib, x=calib.x[rows], t=calib.t[rows], step_index=calib.step_index[rows],
                                     eps=calib.eps[rows], cond=calib.cond.rows(rows))
        return api.quantize(model, scheduler, _recipe(False), calibration=subset, progress=False)

    conditional, unconditional = only((~marks).nonzero().squeeze(1)), only(marks.nonzero().squeeze(1))
    names = split.branch_ranges.names
    assert names == list(branch_quantizers(split.model)) and names
    main = branch_quantizers(split.model)
    for index, name in enumerate(names):
        assert torch.equal(main[name].scale, branch_quantizers(conditional.model)[name].scale)
        assert float(split.branch_ranges.scale[index]) == float(branch_quantizers(unconditional.model)[name].scale)
    differing = sum(float(split.branch_ranges.scale[i]) != float(main[n].scale) for i, n in enumerate(names))
    assert differing > 0  # the branches do differ on this model, so the test can tell them apart
    # a guided call runs each branch's rows with its ranges: the same as each model on its own rows
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500)
    cond = Conditioning(class_labels=torch.tensor([0, 2]), unconditional=Conditioning(
        class_labels=torch.full((2,), NUM_CLASSES))).guidance_batch()
    with torch.no_grad():
        out = split(x, t, cond)
        assert torch.equal(out[2:], conditional(x[2:], t[2:], cond.rows([2, 3]).without_markers()))
        assert torch.equal(out[:2], unconditional(x[:2], t[:2], cond.rows([0, 1]).without_markers()))
        assert not torch.equal(out, shared(x, t, cond))


def test_branch_ranges_sample_save_and_load(model, tmp_path):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    qmodel = api.quantize(model, scheduler, _recipe(True), conditions=LABELS, progress=False)
    images = api.sample(qmodel, scheduler, SAMPLER, num_samples=3, seed=4, conditions=LABELS,
                        guidance_scale=GUIDANCE, progress=False).images
    qmodel.save_pretrained(tmp_path / "art", scheduler)
    loaded, _ = tadq.load(tmp_path / "art")
    assert loaded.config.branch_ranges and torch.equal(loaded.branch_ranges.scale, qmodel.branch_ranges.scale)
    assert torch.equal(api.sample(loaded, scheduler, SAMPLER, num_samples=3, seed=4, conditions=LABELS,
                                  guidance_scale=GUIDANCE, progress=False).images, images)


def test_branch_ranges_need_guided_calibration(model):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        api.quantize(model, scheduler, _recipe(True, guidance=1.0), conditions=LABELS, progress=False)


def test_reconstruction_moves_the_branch_ranges_with_the_main_ones(model):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    reconstruction = dataclasses.replace(tadq.ReconstructionConfig(), weight_iters=2, activation_iters=3,
                                         batch_size=4)
    naive = api.quantize(model, scheduler, _recipe(True), conditions=LABELS, progress=False)
    recon = api.quantize(model, scheduler, _recipe(True, method=tadq.QDiffusionMethod(reconstruction)),
                         conditions=LABELS, progress=False)
    main_before, main_after = branch_quantizers(naive.model), branch_quantizers(recon.model)
    for index, name in enumerate(recon.branch_ranges.names):
        ratio = float(main_after[name].scale) / float(main_before[name].scale)
        expected = float(naive.branch_ranges.scale[index]) * ratio
        assert float(recon.branch_ranges.scale[index]) == pytest.approx(expected, rel=2 ** -22)


HOST_READS = ("__bool__", "__float__", "__int__", "item", "tolist", "cpu", "numpy")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_to_the_unconditional_ranges_reads_nothing_back_to_the_host(dtype, monkeypatch):
    """``active`` runs around every guided call: it copies each range device-side (it read every value back to
    the host, a device sync per quantizer and call on a GPU), with the values the host read gave, in the
    quantizers' own dtype too."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*(QuantLinear.from_module(torch.nn.Linear(4, 4), QScheme(bits=4), QScheme(bits=8))
                                   for _ in range(3))).to(dtype)
    for index, layer in enumerate(layers):
        layer.input_quantizer.set_range(torch.tensor([-1.0 - index]), torch.tensor([2.0]))
    ranges = BranchRanges.for_model(layers)
    ranges.scale.copy_(torch.tensor([0.013, 0.021, 0.034]))
    ranges.zero_point.copy_(torch.tensor([3.0, -7.0, 0.0]))
    quantizers = list(branch_quantizers(layers).values())
    main = [(q.scale.clone(), q.zero_point.clone()) for q in quantizers]
    reads = []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda tensor, *args, _name=method, _original=original, **kwargs:
                            reads.append(_name) or _original(tensor, *args, **kwargs))
    with ranges.active(layers):
        switched = [(q.scale.clone(), q.zero_point.clone()) for q in quantizers]
    monkeypatch.undo()
    assert reads == []
    for index, (scale, zero_point) in enumerate(switched):
        assert scale.dtype == dtype
        assert torch.equal(scale, torch.full_like(scale, float(ranges.scale[index])))
        assert torch.equal(zero_point, torch.full_like(zero_point, float(ranges.zero_point[index])))
    for quantizer, (scale, zero_point) in zip(quantizers, main, strict=True):
        assert torch.equal(quantizer.scale, scale) and torch.equal(quantizer.zero_point, zero_point)
