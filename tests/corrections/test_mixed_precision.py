"""PTQD's step-aware mixed precision: SNR rule, bit-operations, the step-switching denoiser (docs/methods/ptqd.md)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tests.conftest import build_tiny_unet, counting_forwards

from tadq import api
from tadq.config import CalibrationConfig, QuantConfig, config_from_dict, config_to_dict
from tadq.corrections import CorrectionStack, PTQDConfig, PTQDCorrection, TableKey
from tadq.corrections.attach import with_corrections
from tadq.corrections.ptqd.bitops import bit_operations, layer_macs
from tadq.corrections.ptqd.experiment import fit_ptqd
from tadq.corrections.ptqd.mixed_precision import (
    MixedPrecisionConfig,
    MixedPrecisionDenoiser,
    build_mixed_precision,
    snr_ratio,
    switch_index,
    tradeoff_curve,
)
from tadq.sampling import SamplerConfig, SamplingPlan

GRID = SamplerConfig(kind="ddim", num_steps=20, eta=0.0)


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def _synthetic_ptqd(sigma_q: torch.Tensor, sampler: SamplerConfig = GRID, bits: str = "W4A4") -> PTQDCorrection:
    """A PTQD correction whose tables are set by hand: k = 0, μ = 0 and the given σ_q profile (S,)."""
    steps = list(SamplingPlan.build(_scheduler(), sampler).steps)
    size = len(steps)
    correction = PTQDCorrection(PTQDConfig())
    correction.load_state_dict({
        "k": torch.zeros(size, dtype=torch.float64), "mu": torch.zeros(size, 1, dtype=torch.float64),
        "sigma_q": sigma_q.double(), "timesteps": torch.tensor([s.t for s in steps]),
        "alpha_prod": torch.tensor([s.alpha_prod_t for s in steps], dtype=torch.float64),
        "std_dev": torch.tensor([s.std_dev_t for s in steps], dtype=torch.float64),
        "coef_eps": torch.tensor([s.coef_eps for s in steps], dtype=torch.float64),
        "_extra_state": {"table_key": TableKey(sampler.key, size, 1.0, bits).to_json()},
    })
    return correction


def test_snr_rule_picks_low_bits_early_and_high_bits_late():
    index = torch.arange(GRID.num_steps, dtype=torch.float64)
    low = _synthetic_ptqd(0.02 + 0.3 * (index / GRID.num_steps) ** 2)  # quantization noise grows as t falls
    gamma = 0.995
    ratio = snr_ratio(low.alpha_prod, low.coef_eps, low.sigma_tilde)
    switch = switch_index(low, gamma)
    assert 0 < switch < GRID.num_steps
    assert bool((ratio[:switch] >= gamma).all()) and bool((ratio[switch:] < gamma).all())  # one clean switch
    assert switch_index(low, gamma, "final_failures") == switch


def test_gamma_extremes_give_all_low_or_all_high():
    low = _synthetic_ptqd(torch.full((GRID.num_steps,), 0.1))
    for rule in ("first_failure", "final_failures"):
        assert switch_index(low, 1e-6, rule) == GRID.num_steps
        assert switch_index(low, 2.0, rule) == 0
    exact = _synthetic_ptqd(torch.zeros(GRID.num_steps))
    assert switch_index(exact, 1.0) == GRID.num_steps  # σ̃ = 0 keeps the FP SNR exactly


def test_flat_noise_on_a_coarse_ddim_grid_fails_first_and_last():
    low = _synthetic_ptqd(torch.full((GRID.num_steps,), 0.3))
    ratio = snr_ratio(low.alpha_prod, low.coef_eps, low.sigma_tilde)
    gamma = 0.98
    passes = ratio >= gamma
    assert not bool(passes[0]) and bool(passes[GRID.num_steps // 2]) and not bool(passes[-1])
    assert switch_index(low, gamma, "first_failure") == 0
    assert 0 < switch_index(low, gamma, "final_failures") < GRID.num_steps


def test_config_validates_and_survives_json():
    config = MixedPrecisionConfig(gamma=0.99, switch_rule="final_failures")
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    for bad in ({"gamma": 0.0}, {"gamma": float("nan")}, {"switch_rule": "middle"}):
        with pytest.raises(ValueError):
            MixedPrecisionConfig(**bad)


# -- on the tiny UNet -----------------------------------------------------------------------------------------------
SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.fixture(scope="module")
def low_and_high():
    torch.set_num_threads(1)
    model, scheduler = build_tiny_unet(), _scheduler()
    fitted = []
    for name in ("W4A4", "W4A8"):
        base = api.quantize(model, scheduler, QuantConfig.from_preset(name, calibration=CALIB), progress=False)
        fitted.append(fit_ptqd(base, model, scheduler, SAMPLER, PTQDConfig(num_samples=8, seed=3)))
    return model, scheduler, fitted[0], fitted[1]


def test_bit_operations_order(low_and_high):
    model, scheduler, low, high = low_and_high
    macs = layer_macs(model, lambda x, t: model(x, t).sample, (1, 8, 8))
    assert macs["conv_in"] == 8 * 8 * 4 * 9  # Conv2d(1 → 4, 3×3) on 8×8: H·W·C_out·C_in·k²
    per_forward = {"W4A4": bit_operations(low), "W4A8": bit_operations(high), "FP": bit_operations(model, 32, 32)}
    assert per_forward["W4A4"] < per_forward["W4A8"] < per_forward["FP"] == 32 * 32 * sum(macs.values())
    mixed = MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=2)
    steps = SAMPLER.num_steps
    assert steps * per_forward["W4A4"] < mixed.bit_operations() < steps * per_forward["W4A8"]
    assert mixed.schedule() == ["W4A4", "W4A4", "W4A8", "W4A8"]


def test_mixed_denoiser_runs_low_then_high_with_their_corrections(low_and_high):
    _, scheduler, low, high = low_and_high

    def run(denoiser):
        return api.sample(denoiser, scheduler, SAMPLER, num_samples=4, seed=21, progress=False).images

    all_low = run(MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=SAMPLER.num_steps))
    all_high = run(MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=0))
    assert torch.equal(all_low, run(low)) and torch.equal(all_high, run(high))
    mixed = run(MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=2))
    assert not torch.equal(mixed, all_low) and not torch.equal(mixed, all_high)
    with pytest.raises(ValueError, match="not on the grid"):
        MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=2)(torch.zeros(1, 1, 8, 8), torch.tensor([3]))
    with pytest.raises(ValueError, match="switch"):
        MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=SAMPLER.num_steps + 1)


def test_tradeoff_curve_trades_bit_operations_for_steps(low_and_high):
    _, scheduler, low, high = low_and_high
    gammas = [1e-6, 0.5, 0.9, 0.99, 0.999, 0.9999, 2.0]
    for rule in ("first_failure", "final_failures"):
        points = tradeoff_curve(low, high, scheduler, SAMPLER, gammas, switch_rule=rule)
        assert [p.gamma for p in points] == gammas
        assert points[0].switch == SAMPLER.num_steps and points[0].switch_t is None
        assert points[-1].switch == 0 and points[-1].bit_operations == SAMPLER.num_steps * bit_operations(high)
        assert all(a.switch >= b.switch and a.bit_operations <= b.bit_operations
                   for a, b in zip(points, points[1:], strict=False))
    built = build_mixed_precision(low, high, scheduler, SAMPLER, MixedPrecisionConfig(gamma=2.0))
    assert built.switch == 0


def test_mixed_denoiser_follows_a_fractional_timestep_grid(low_and_high):
    """euler's linspace grid feeds fractional timesteps (832.5, ...) as float32; they were truncated to ints that
    matched no step, and every euler (or flow-euler) run was refused as off the grid."""
    model, scheduler, low, high = low_and_high
    sampler = SamplerConfig(kind="euler", num_steps=7)
    assert any(isinstance(step.t, float) for step in SamplingPlan.build(scheduler, sampler).steps)
    low, high = (fit_ptqd(with_corrections(base, CorrectionStack()), model, scheduler, sampler,
                          PTQDConfig(num_samples=4, seed=3)) for base in (low, high))

    def run(denoiser):
        return api.sample(denoiser, scheduler, sampler, num_samples=2, seed=21, progress=False).images

    assert torch.equal(run(MixedPrecisionDenoiser(low, high, scheduler, sampler, switch=sampler.num_steps)), run(low))
    assert torch.equal(run(MixedPrecisionDenoiser(low, high, scheduler, sampler, switch=0)), run(high))
    mixed = MixedPrecisionDenoiser(low, high, scheduler, sampler, switch=3)
    assert torch.isfinite(run(mixed)).all()
    with pytest.raises(ValueError, match="not on the grid"):
        mixed(torch.zeros(1, 1, 8, 8), torch.tensor([832.0]))  # between grid points


def test_mixed_denoiser_refuses_a_schedule_that_differs_at_a_late_step_before_any_forward(low_and_high):
    """Sampled with set_alpha_to_one=False (its PTQD tables were fitted with True), only the last step differs: the
    run was refused there, after the network had run every earlier step."""
    _, scheduler, low, high = low_and_high
    other = DDIMScheduler.from_config(scheduler.config, set_alpha_to_one=False)
    mixed = MixedPrecisionDenoiser(low, high, scheduler, SAMPLER, switch=2)
    with counting_forwards(low.model) as low_calls, counting_forwards(high.model) as high_calls, \
            pytest.raises(ValueError, match=f"at step {SAMPLER.num_steps - 1} of"):
        api.sample(mixed, other, SAMPLER, num_samples=2, seed=21, progress=False)
    assert low_calls[0] == high_calls[0] == 0
