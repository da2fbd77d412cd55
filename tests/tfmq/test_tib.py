"""The temporal information block: found from roles, label path included, equal to what the UNet computes."""

from __future__ import annotations

import torch
from tests.conftest import build_tiny_unet
from tests.tfmq.common import SAMPLER, scheduler

from tadq.registry import adapter_for
from tadq.tfmq import TemporalInformationBlock, deployment_grid, grid_inputs


def _features_in_forward(model, t, labels=None) -> dict[str, torch.Tensor]:
    """Each time projection's output during a real forward (hooks), keyed by layer name."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("time_emb_proj"):
            handles.append(module.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out)))
    x = torch.randn(len(t), 1, 8, 8)
    with torch.no_grad():
        model(x, t, class_labels=labels)
    for handle in handles:
        handle.remove()
    return seen


def test_tib_of_an_unconditional_unet():
    model = build_tiny_unet()
    tib = TemporalInformationBlock(model, adapter_for(model))
    projections = [n for n, _ in model.named_modules() if n.endswith("time_emb_proj")]
    assert tib.layer_names == ("time_embedding.linear_1", "time_embedding.linear_2", *projections)
    assert tib.projection_names == tuple(projections)
    assert [f.block for f in tib.features] == [p.rpartition(".")[0] for p in projections]
    assert tib.num_labels == 0
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        features = tib(t)
    reference = _features_in_forward(model, t)
    assert all(torch.equal(f, reference[feature.layer]) for f, feature in zip(features, tib.features, strict=True))


def test_tib_of_a_class_conditional_unet_includes_the_label_embedding():
    model = build_tiny_unet(num_class_embeds=3)
    tib = TemporalInformationBlock(model, adapter_for(model))
    assert tib.num_labels == 3
    assert any(module is model.class_embedding for module in tib.modules())
    t, labels = torch.tensor([700, 700, 700]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        features = tib(t, labels)
    reference = _features_in_forward(model, t, labels)
    assert all(torch.equal(f, reference[feature.layer]) for f, feature in zip(features, tib.features, strict=True))
    assert not torch.equal(features[0][0], features[0][1])  # the label changes the temporal feature
    try:
        tib(t)
    except ValueError as error:
        assert "class labels" in str(error)
    else:
        raise AssertionError("a class-conditional TIB must refuse to run without labels")


def test_grid_inputs_cover_every_step_and_label():
    timesteps = deployment_grid(scheduler(), SAMPLER)
    assert len(timesteps) == SAMPLER.num_steps and timesteps[0] > timesteps[-1]
    t, labels, steps = grid_inputs(timesteps, 3)
    assert len(t) == 3 * SAMPLER.num_steps
    assert torch.equal(t[steps == 2], timesteps[2].repeat(3)) and torch.equal(labels[steps == 2], torch.arange(3))
    assert grid_inputs(timesteps, 0)[1] is None


def test_tib_feeds_the_grid_made_on_the_cpu_to_a_network_on_another_device():
    """The grid's timesteps (the scheduler's) and label ranges are CPU tensors; the sinusoidal projection computes
    on its input's device, so a network on another device (CUDA; here the meta device stands in) got CPU features
    and failed in its first linear."""
    for labels in (None, torch.tensor([0, 2])):
        model = build_tiny_unet(num_class_embeds=3 if labels is not None else None)
        expected = [tuple(f.shape) for f in TemporalInformationBlock(model, adapter_for(model))(
            torch.tensor([999, 3]), labels)]
        model.to("meta")
        tib = TemporalInformationBlock(model, adapter_for(model))
        features = tib(torch.tensor([999, 3]), labels)
        assert [f.device.type for f in features] == ["meta"] * len(features)
        assert [tuple(f.shape) for f in features] == expected
        assert tib.embedding(torch.tensor([999, 3]), labels).device.type == "meta"
