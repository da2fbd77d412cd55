import pytest
import torch
from tests.conftest import build_tiny_unet

from tadq.calibration import CalibrationSet, collect_calibration_set, kept_steps
from tadq.config import CalibrationConfig
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig


def _config(**kw) -> CalibrationConfig:
    base = dict(sampler=SamplerConfig(kind="ddim", num_steps=10), num_trajectories=8, num_steps_kept=5,
                samples_per_step=4, seed=0, batch_size=8)
    base.update(kw)
    return CalibrationConfig(**base)


def test_kept_steps_are_uniform_and_cover_both_ends():
    assert kept_steps(50, 25)[0] == 0 and kept_steps(50, 25)[-1] == 49
    assert len(kept_steps(50, 25)) == 25
    gaps = {b - a for a, b in zip(kept_steps(100, 20), kept_steps(100, 20)[1:], strict=False)}
    assert gaps <= {5, 6}


def test_collection_is_one_trajectory_pass(tiny_unet, ddpm_scheduler):
    calls = []
    adapter = adapter_for(tiny_unet)
    handle = tiny_unet.register_forward_pre_hook(lambda *_: calls.append(1))
    calib = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(), progress=False)
    handle.remove()
    assert len(calls) == 10  # S model calls for one batch of 8 trajectories: O(S), not O(S^2)
    assert len(calib) == 5 * 4
    assert calib.x.shape == (20, 1, 8, 8) and calib.eps.shape == (20, 1, 8, 8)
    assert sorted(set(calib.step_index.tolist())) == kept_steps(10, 5)
    assert len(set(calib.t.tolist())) == 5


def test_cache_is_reused_and_mismatch_raises(tmp_path, tiny_unet, ddpm_scheduler):
    adapter = adapter_for(tiny_unet)
    first = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(), cache_dir=tmp_path,
                                    progress=False)
    files = list(tmp_path.glob("calibration-*.safetensors"))
    assert len(files) == 1
    again = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(), cache_dir=tmp_path,
                                    progress=False)
    assert torch.equal(first.x, again.x)
    with pytest.raises(ValueError, match="does not match"):
        CalibrationSet.load(files[0], expected_key="another-key")
    other = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(seed=5), cache_dir=tmp_path,
                                    progress=False)
    assert not torch.equal(first.x, other.x)
    assert len(list(tmp_path.glob("calibration-*.safetensors"))) == 2


def test_a_fresh_set_is_placed_on_the_models_device_as_a_cached_one_is(tmp_path, tiny_unet, ddpm_scheduler,
                                                                      monkeypatch):
    """The trajectory is recorded on the CPU: a fresh set stayed there while a cached one came back on the model's
    device, so on a GPU the first run fed CPU inputs to the model (quantize_tfmq's reconstruction raised) and
    TFMQMethod refused the fresh set as "on cpu, the model on cuda". Both are now placed on the model's device."""
    import tadq.calibration.data as data

    placed = []

    def on_device(calib, device):
        placed.append((calib.x.device, device))
        return real(calib, device)

    real = data._on_device
    monkeypatch.setattr(data, "_on_device", on_device)
    adapter = adapter_for(tiny_unet)
    fresh = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(), cache_dir=tmp_path,
                                    progress=False)
    cached = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, _config(), cache_dir=tmp_path,
                                     progress=False)
    model = next(tiny_unet.parameters()).device
    assert [target for _, target in placed] == [model, model]  # the fresh set, then the cached one
    assert fresh.x.device == cached.x.device == model and torch.equal(fresh.x, cached.x)


@pytest.mark.parametrize("kw", [{"samples_per_step": 9}, {"num_steps_kept": 11}, {"num_trajectories": 0}])
def test_bad_calibration_config_raises(kw):
    with pytest.raises(ValueError):
        _config(**kw)


def test_conditions_beyond_the_trajectories_are_named_as_unused(ddpm_scheduler, caplog):
    """Trajectory i takes condition i: a list longer than num_trajectories leaves its tail unseen, with a warning
    that says how many; a list of exactly num_trajectories rows says nothing."""
    from tests.conftest import build_tiny_unet

    from tadq.sampling import Conditioning, ConditioningList

    model = build_tiny_unet(num_class_embeds=3)
    for rows, warned in ((12, True), (8, False)):
        conditions = ConditioningList(Conditioning(class_labels=torch.arange(rows) % 3))
        caplog.clear()
        with caplog.at_level("WARNING", logger="tadq.calibration.data"):
            calib = collect_calibration_set(model, adapter_for(model), ddpm_scheduler.config,
                                            _config(num_steps_kept=2), progress=False, conditions=conditions)
        messages = [r.getMessage() for r in caplog.records]
        assert any("4 of the 12 calibration conditions are not used" in m for m in messages) == warned, messages
        assert len(calib) == 2 * 4


def test_a_model_left_in_training_mode_records_what_eval_mode_does(tmp_path, ddpm_scheduler):
    """nn.Module starts in training mode. Its dropout made the recorded trajectories depend on the global RNG, and
    the cache (keyed by the weights, not the mode) handed that random data to later eval-mode runs."""
    model = build_tiny_unet(dropout=0.5).train()
    config = _config(num_steps_kept=2)
    cached = collect_calibration_set(model, adapter_for(model), ddpm_scheduler.config, config, cache_dir=tmp_path,
                                     progress=False)
    assert model.training and model.down_blocks[0].resnets[0].dropout.training  # each module's mode given back
    model.eval()
    fresh = collect_calibration_set(model, adapter_for(model), ddpm_scheduler.config, config, progress=False)
    assert torch.equal(cached.x, fresh.x) and torch.equal(cached.eps, fresh.eps)
