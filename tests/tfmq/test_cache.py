"""Cache-based maintenance and the disturbance-aware choice."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.tfmq.common import SAMPLER, scheduler, tfmq_config
from torch.utils._python_dispatch import TorchDispatchMode

from tadq.registry import adapter_for
from tadq.tfmq import TemporalInformationBlock, TFMQCorrection, deployment_grid, temporal_features_per_step


def test_the_fp_cache_reproduces_fp_features_exactly_with_and_without_labels():
    # batches shaped like the cache's own computation (one t; all K labels in order), so float kernels match
    for labels in (None, torch.arange(3)):
        model = build_tiny_unet(num_class_embeds=None if labels is None else 3)
        adapter = adapter_for(model)
        timesteps = deployment_grid(scheduler(), SAMPLER)
        features = temporal_features_per_step(TemporalInformationBlock(model, adapter), timesteps)
        correction = TFMQCorrection(tfmq_config(maintenance="cache_fp"))
        correction.set_grid(SAMPLER.key, timesteps)
        correction.set_cache(features, "fp", 8, 0 if labels is None else 3)
        served = copy.deepcopy(model)
        correction.prepare(served, adapter)
        x = torch.randn(1 if labels is None else 3, 1, 8, 8)
        seen: dict[str, torch.Tensor] = {}
        for layer, _, _ in correction.cache_layers:  # runs after the cache hook: sees what the block receives
            served.get_submodule(layer).register_forward_hook(
                lambda _m, _a, out, layer=layer, seen=seen: seen.update({layer: out}))
        with torch.no_grad():
            for step, t in enumerate(timesteps.tolist()):
                batch_t = torch.full((x.shape[0],), t)
                with correction.at_step(step):
                    output = served(x, batch_t, class_labels=labels).sample
                assert torch.equal(output, model(x, batch_t, class_labels=labels).sample)
                for layer, values in features.items():
                    assert torch.equal(seen[layer], values[step].expand_as(seen[layer]))
        assert correction.cache_size_bytes() == 4 * sum(f.numel() for f in features.values())
        correction.release(served)
        assert all(len(served.get_submodule(layer)._forward_hooks) == 1 for layer in features)  # only the test's


def test_quantized_cache_is_smaller_and_close(build_tfmq):
    exact, quantized = build_tfmq(maintenance="cache_fp"), build_tfmq(maintenance="cache_quantized", cache_bits=4)
    fp_cache, q_cache = exact.corrections[0], quantized.corrections[0]
    values = sum(int(values.numel()) for values in fp_cache.cached_features().values())
    assert fp_cache.cache_size_bytes() == 4 * values
    assert q_cache.cache_size_bytes() == values // 2 + 8 * len(q_cache.cache_layers) * SAMPLER.num_steps
    for layer, served in q_cache.cached_features().items():
        reference = fp_cache.cached_features()[layer]
        step = (reference.amax(dim=1) - reference.amin(dim=1).clamp(max=0)) / 15  # Δ per step at 4 bits
        assert ((served - reference).abs() <= step[:, None] / 2 + 1e-6).all()


def test_selection_reports_both_strategies_and_follows_the_metric(build_tfmq):
    qmodel = build_tfmq(maintenance="select", cache_bits=2)
    correction = qmodel.corrections[0]
    report = correction.report["disturbance"]
    json.dumps(correction.report)  # JSON-ready
    features = TemporalInformationBlock(qmodel.model, qmodel.adapter).features
    assert set(report) == {feature.layer for feature in features}
    for layer, entry in report.items():
        better = entry["cache_quantized"]["cosine_distance"] < entry["tib"]["cosine_distance"]
        assert entry["choice"] == ("cache" if better else "tib")
        assert (layer in {name for name, _, _ in correction.cache_layers}) == better


def test_the_per_label_cache_reads_the_labels_of_a_positional_call_by_name():
    """``UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, class_labels)``: the label capture took
    the third positional argument as the labels (right for ``UNet2DModel`` only), so a positional call served rows
    picked by the text embedding's values instead of the class labels."""
    from tests.conftest import build_tiny_sd_unet

    model = build_tiny_sd_unet(num_class_embeds=3)
    adapter = adapter_for(model)
    timesteps = deployment_grid(scheduler(), SAMPLER)
    features = temporal_features_per_step(TemporalInformationBlock(model, adapter), timesteps)
    correction = TFMQCorrection(tfmq_config(maintenance="cache_fp"))
    correction.set_grid(SAMPLER.key, timesteps)
    correction.set_cache(features, "fp", 8, 3)
    served = copy.deepcopy(model)
    correction.prepare(served, adapter)
    generator = torch.Generator().manual_seed(0)
    x, text = torch.randn(3, 4, 8, 8, generator=generator), torch.rand(3, 2, 16, generator=generator)
    labels, step = torch.arange(3), 2  # the cache's own batch shape (all K labels), so float kernels match
    t = torch.full((3,), int(timesteps[step]))
    with torch.no_grad(), correction.at_step(step):
        expected = model(x, t, text, labels).sample
        assert torch.equal(served(x, t, text, labels).sample, expected)
        assert torch.equal(served(x, t, text, class_labels=labels).sample, expected)


@pytest.mark.parametrize("maintenance", ["select", "cache_fp"])
def test_apply_tfmq_holds_a_few_steps_of_features_and_builds_the_whole_grids_tables(monkeypatch, maintenance):
    """apply_tfmq held every step's FP and quantized temporal features at once (≈ 39 GB each for DiT-XL/2); it
    now computes them a chunk of steps at a time, with the tables and report of the whole grid at once."""
    import tadq.tfmq.pipeline as pipeline
    from tadq import api
    from tadq.config import CalibrationConfig, QuantConfig
    from tadq.sampling import RandomClassLabels, SamplerConfig

    torch.set_num_threads(1)
    model, sched, sampler = build_tiny_unet(num_class_embeds=3), scheduler(), SamplerConfig(kind="ddim", num_steps=5)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=2)
    qmodel = api.quantize(model, sched, QuantConfig.from_preset("W4A8", calibration=calibration),
                          conditions=RandomClassLabels(3), progress=False)
    config = tfmq_config(maintenance=maintenance, cache_bits=8, fsc="off")
    held = []
    whole = pipeline.temporal_features_per_step

    def counted(tib, timesteps, correction=None, steps=None):
        features = whole(tib, timesteps, correction, **({} if steps is None else {"steps": steps}))
        held.append(next(iter(features.values())).shape[0])
        return features

    monkeypatch.setattr(pipeline, "temporal_features_per_step", counted)
    tables = {}
    for chunk in (2, sampler.num_steps):  # 2, 2, 1 steps; the whole grid at once
        monkeypatch.setattr(pipeline, "FEATURE_CHUNK_STEPS", chunk)
        held.clear()
        built = pipeline.apply_tfmq(copy.deepcopy(qmodel), model, sched, config, sampler, progress=False)
        assert max(held) == chunk
        correction = built.corrections[0]
        tables[chunk] = (correction.report, correction.cache_layers,
                         {name: buffer for name, buffer in correction.named_buffers()})
    (report, layers, buffers), (whole_report, whole_layers, whole_buffers) = tables.values()
    assert report == whole_report and layers == whole_layers and layers  # something is cached
    assert buffers.keys() == whole_buffers.keys()
    assert all(torch.equal(buffers[name], whole_buffers[name]) for name in buffers)


class _CopiesToMeta(TorchDispatchMode):
    """Counts the copies of CPU tensors onto the meta device (stand-in for a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and result.is_meta:
            self.count += 1
        return result


def test_a_cached_feature_crosses_to_the_networks_device_once():
    """A network moved after ``prepare`` (quantize on a GPU, ``.to``) left the cache table on the CPU: every call
    copied its row to the device, and a per-label cache copied the device's labels to the host (a sync each). The
    table is copied to the output's device once (again after an in-place change of it), and rows are read there."""
    from tadq.tfmq.cache import CachedFeature
    from tadq.tfmq.fsc import StepState

    state = StepState(4)
    for values, labels in ((torch.randn(4, 5), None), (torch.randn(4, 3, 5), torch.tensor([2, 0]))):
        hook = CachedFeature(values, state)
        state.labels = None if labels is None else labels.to("meta")
        output = torch.empty(2, 5, device="meta")
        with _CopiesToMeta() as copies:
            for step in (0, 1, 3, 1):
                with state.at(step):
                    served = hook(None, (), output)
                assert served.is_meta and served.shape == output.shape
        assert copies.count == 1
        values.add_(1.0)  # a table changed in place (load_state_dict): copied again
        with _CopiesToMeta() as copies, state.at(2):
            hook(None, (), output)
        assert copies.count == 1
