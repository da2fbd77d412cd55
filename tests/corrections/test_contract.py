"""The contract every registered correction meets (docs/architecture.md), parametrised over the registry."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tests.corrections.analytic import (
    SAMPLE_SHAPE,
    AnalyticDenoiser,
    InjectedError,
    analytic_scheduler,
    fit_context,
)

from tadq.config import config_from_dict, config_to_dict
from tadq.corrections import Correction, CorrectionStack, collect_trajectory_pair, fit_stack
from tadq.corrections.io import load_corrections, save_corrections
from tadq.registry import correction_for, registered_corrections
from tadq.sampling import IdentityHooks, NoiseStd, SamplerConfig, SamplingPlan, sample

CONFIG_TYPES = sorted(registered_corrections(), key=lambda klass: klass.__name__)
SAMPLER = SamplerConfig(kind="ddim", num_steps=6, eta=1.0)  # stochastic, so variance hooks act too
BITS = "W4A8"


def _config(config_type, **overrides):
    return dataclasses.replace(config_type(), **{"num_samples": 32, **overrides})


def _fit(config, *, error: bool = True, sampler: SamplerConfig = SAMPLER) -> Correction:
    correction = correction_for(config)
    request = correction.pair_request()
    if request is not None:
        scheduler = analytic_scheduler()
        fp = AnalyticDenoiser(scheduler)
        quantized = InjectedError(fp) if error else fp
        pair = collect_trajectory_pair(fit_context(fp, quantized, scheduler, sampler, bits=BITS),
                                       num_samples=request.num_samples, seed=request.seed, mode=request.mode)
        correction.fit(pair)
    return correction


def _steps(sampler: SamplerConfig = SAMPLER):
    return list(SamplingPlan.build(analytic_scheduler(), sampler).steps)


def _inputs(step):
    generator = torch.Generator().manual_seed(1000 + step.index)
    x = torch.randn((3, *SAMPLE_SHAPE), generator=generator)
    eps = torch.randn((3, *SAMPLE_SHAPE), generator=generator)
    return x, eps, torch.tensor(step.std_dev_t, dtype=torch.float32)


def _outputs(hooks, steps=None) -> list[torch.Tensor]:
    """Every hook's output at every step, on fixed inputs."""
    outputs = []
    for step in steps or _steps():
        x, eps, std = _inputs(step)
        outputs += [hooks.before_model(x, step), hooks.after_model(eps, x, step), _std(hooks.noise_std(std, step)),
                    hooks.after_step(x, step)]
    return outputs


def _std(value) -> torch.Tensor:
    """A noise_std result as one tensor (a ``NoiseStd`` stacks its noise- and direction-term stds)."""
    return torch.stack([value.noise, value.direction]) if isinstance(value, NoiseStd) else value


def _all_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_registry_holds_the_built_in_corrections():
    assert any(klass.__name__ == "PTQDConfig" for klass in CONFIG_TYPES)


@pytest.mark.parametrize("config_type", CONFIG_TYPES, ids=lambda klass: klass.__name__)
class TestCorrectionContract:
    def test_zero_error_fit_is_the_identity(self, config_type):
        correction = _fit(_config(config_type), error=False)
        for step in _steps():
            x, eps, std = _inputs(step)
            assert torch.equal(correction.before_model(x, step), x)
            assert torch.equal(correction.after_model(eps, x, step), eps)
            assert torch.equal(correction.noise_std(std, step), std)
            assert torch.equal(correction.after_step(x, step), x)

    def test_state_dict_round_trips_exactly(self, config_type, tmp_path):
        config = _config(config_type)
        fitted = _fit(config)
        if fitted.keyed:  # a structural correction (TFMQ) is not fitted on the pair and acts inside the network
            assert not _all_equal(_outputs(fitted), _outputs(IdentityHooks()))  # a real error gives a real correction
        fresh = correction_for(config)
        fresh.load_state_dict(fitted.state_dict())
        assert fresh.table_key == fitted.table_key
        assert _all_equal(_outputs(fresh), _outputs(fitted))
        configs = save_corrections(CorrectionStack([fitted]), tmp_path)
        loaded = load_corrections(tmp_path, json.loads(json.dumps(configs)))
        assert _all_equal(_outputs(loaded[0]), _outputs(fitted))

    def test_config_survives_json(self, config_type):
        config = _config(config_type, seed=7)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config

    def test_same_seed_gives_identical_output(self, config_type):
        first, second = _fit(_config(config_type, seed=4)), _fit(_config(config_type, seed=4))
        assert _all_equal(_outputs(first), _outputs(second))
        other = _fit(_config(config_type, seed=5))
        if first.table_names:
            assert not _all_equal(_outputs(first), _outputs(other))

    def test_bad_configs_raise(self, config_type):
        for bad in ({"num_samples": 0}, {"num_samples": 2.5}, {"seed": -1}, {"trajectory": "fp"}):
            with pytest.raises(ValueError):
                _config(config_type, **bad)

    def test_unfitted_or_mismatched_use_raises(self, config_type):
        config = _config(config_type)
        if not correction_for(config).keyed:
            pytest.skip("a correction without per-step tables has no key to mismatch")
        unfitted = correction_for(config)
        with pytest.raises(ValueError, match="not fitted"):
            _outputs(unfitted)
        fitted = _fit(config)
        other_eta = SamplerConfig(kind="ddim", num_steps=SAMPLER.num_steps, eta=0.0)
        other_steps = SamplerConfig(kind="ddim", num_steps=SAMPLER.num_steps + 2, eta=1.0)
        for sampler in (other_eta, other_steps, SamplerConfig(kind="ddpm", num_steps=SAMPLER.num_steps)):
            step = _steps(sampler)[0]
            x, eps, std = _inputs(step)
            for hook, args in (("before_model", (x,)), ("after_model", (eps, x)), ("noise_std", (std,)),
                               ("after_step", (x,))):
                with pytest.raises(ValueError, match="fitted for"):
                    getattr(fitted, hook)(*args, step)
        with pytest.raises(ValueError, match="W4A8"):
            fitted.check_model("W4A4")
        with pytest.raises(ValueError, match="guidance"):
            fitted.check_model(BITS, guidance_scale=3.0)

    def test_use_under_another_training_schedule_raises(self, config_type, tmp_path):
        """The sampler key (kind, S, η) does not hold the training schedule: tables fitted under linear betas over
        1000 steps were used under cosine betas or 500 steps without a word."""
        from diffusers import DDPMScheduler

        config = _config(config_type)
        if not correction_for(config).keyed:
            pytest.skip("a correction without per-step tables has no key to mismatch")
        fitted = _fit(config)
        assert _all_equal(_outputs(fitted), _outputs(fitted))  # the fitting schedule itself passes at every step
        configs = save_corrections(CorrectionStack([fitted]), tmp_path)
        loaded = load_corrections(tmp_path, json.loads(json.dumps(configs)))[0]
        assert loaded.table_key == fitted.table_key and loaded.table_key.schedule is not None
        others = (DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False),
                  DDPMScheduler(num_train_timesteps=500, beta_schedule="linear", clip_sample=False))
        for scheduler in others:
            step = list(SamplingPlan.build(scheduler, SAMPLER).steps)[1]
            x, eps, std = _inputs(step)
            for correction in (fitted, loaded):
                with pytest.raises(ValueError, match="another training schedule"):
                    correction.after_model(eps, x, step)

    def test_use_under_another_prediction_type_raises_and_old_keys_still_load(self, config_type, tmp_path):
        """(t, A_t, B_t), σ_t and clipping are those of the fitting schedule under v- or x₀-prediction too, yet the
        tables correct the ε the scheduler's prediction type reads from the output: a scheduler of another type
        was accepted. Keys saved before the type was recorded load and are not checked for it."""
        from diffusers import DDPMScheduler

        config = _config(config_type)
        if not correction_for(config).keyed:
            pytest.skip("a correction without per-step tables has no key to mismatch")
        fitted = _fit(config)
        assert fitted.table_key.prediction_type == analytic_scheduler().config.prediction_type
        configs = save_corrections(CorrectionStack([fitted]), tmp_path)
        loaded = load_corrections(tmp_path, json.loads(json.dumps(configs)))[0]
        assert loaded.table_key == fitted.table_key
        old = correction_for(config)
        old_key = {k: v for k, v in json.loads(fitted.table_key.to_json()).items() if k != "prediction_type"}
        old.load_state_dict({**fitted.state_dict(), "_extra_state": {"table_key": json.dumps(old_key)}})
        assert old.table_key.prediction_type is None
        for prediction_type in ("v_prediction", "sample"):
            scheduler = DDPMScheduler.from_config(analytic_scheduler().config, prediction_type=prediction_type)
            steps = list(SamplingPlan.build(scheduler, SAMPLER).steps)
            x, eps, std = _inputs(steps[1])
            for correction in (fitted, loaded):
                with pytest.raises(ValueError, match=f"'epsilon' but is used with '{prediction_type}'"):
                    correction.after_model(eps, x, steps[1])
            assert _all_equal(_outputs(old, steps), _outputs(fitted))  # unrecorded: not checked, as before

    def test_stacking_order_survives_save_and_load(self, config_type, tmp_path):
        scheduler = analytic_scheduler()
        fp = AnalyticDenoiser(scheduler)
        stack = CorrectionStack([correction_for(_config(config_type, seed=seed)) for seed in (1, 2, 3)])
        fit_stack(stack, fit_context(fp, InjectedError(fp), scheduler, SAMPLER, bits=BITS))
        configs = save_corrections(stack, tmp_path)
        loaded = load_corrections(tmp_path, json.loads(json.dumps(configs)))
        assert [member.config for member in loaded] == [member.config for member in stack]
        for original, restored in zip(stack, loaded, strict=True):
            assert restored.table_key == original.table_key
            assert _all_equal(_outputs(restored), _outputs(original))
        runs = [sample(InjectedError(fp, seed=9), SamplingPlan.build(scheduler, SAMPLER), num_samples=4, seed=8,
                       sample_shape=SAMPLE_SHAPE, hooks=tuple(hooks), progress=False).images
                for hooks in (stack, loaded)]
        assert torch.equal(runs[0], runs[1])
