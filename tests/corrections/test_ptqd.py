"""PTQD on an analytic denoiser with a known injected error, and on a tiny quantized UNet (docs/methods/ptqd.md)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.corrections.analytic import (
    BIAS,
    NOISE_STD,
    SAMPLE_SHAPE,
    AnalyticDenoiser,
    InjectedError,
    analytic_scheduler,
    fit_context,
    injected_k,
)

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import CorrectionStack, PTQDConfig, PTQDCorrection, collect_trajectory_pair, fit_stack
from tadq.corrections.io import CORRECTIONS_FILE
from tadq.corrections.ptqd import ptqd_tables, vsc_report
from tadq.corrections.ptqd.experiment import fit_ptqd
from tadq.corrections.ptqd.plots import save_ptqd_tables_plot
from tadq.io.manifest import write_manifest
from tadq.metrics import per_step_mse
from tadq.sampling import NoiseStd, SamplerConfig, SamplingPlan, sample

NUM_SAMPLES, FIT_SEED, EVAL_SEED = 256, 1, 77
SAMPLERS = {
    "ddim-eta0": SamplerConfig(kind="ddim", num_steps=10, eta=0.0),
    "ddim-eta1": SamplerConfig(kind="ddim", num_steps=10, eta=1.0),
    "ddpm": SamplerConfig(kind="ddpm", num_steps=10),
}


def _fit(sampler: SamplerConfig, config: PTQDConfig | None = None, **error) -> tuple[PTQDCorrection, object]:
    config = PTQDConfig() if config is None else config
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    pair = collect_trajectory_pair(fit_context(fp, InjectedError(fp, **error), scheduler, sampler),
                                   num_samples=NUM_SAMPLES, seed=FIT_SEED, mode=config.trajectory)
    correction = PTQDCorrection(config)
    correction.fit(pair)
    return correction, pair


@pytest.mark.parametrize("name", ["ddim-eta0", "ddpm"])
def test_fit_recovers_k_bias_and_noise_std(name):
    correction, pair = _fit(SAMPLERS[name])
    n, c, h, w = pair.eps_fp.shape[1:]
    elements, per_sample = n * c * h * w, c * h * w
    bias = torch.tensor(BIAS, dtype=torch.float64)
    spread = bias.var(correction=0)  # var_c(b): PTQD's per-sample std over (C, H, W) includes it (B3)
    s = NOISE_STD
    for i, step in enumerate(pair.steps):
        k = float(injected_k(torch.tensor(step.t)))
        eps_std = float(pair.eps_fp[i].double().std())
        # OLS slope: (k̂ − k) = Σ e_c (b_c + s n) / Σ e_c², whose std is √(s² + var_c b) / (√M std ε).
        k_se = math.sqrt(s**2 + spread) / (math.sqrt(elements) * eps_std)
        assert abs(float(correction.k[i]) - k) < 5 * k_se, (i, float(correction.k[i]), k, k_se)
        # μ_c = mean over N·H·W elements of k ε + b_c + s n.
        mu_se = math.sqrt(k**2 * eps_std**2 + s**2) / math.sqrt(n * h * w)
        assert torch.all((correction.mu[i] - bias).abs() < 5 * mu_se), (i, correction.mu[i], mu_se)
        # Per-sample population std of b_c + s n over D elements: E σ̂² = var_c b + s² (D−1)/D; the std of σ̂² is
        # √(2 s⁴/D + 4 s² var_c b / D), that of σ̂ half of it over τ, averaged over N samples.
        tau = math.sqrt(spread + s**2 * (per_sample - 1) / per_sample)
        sigma_se = math.sqrt(2 * s**4 / per_sample + 4 * s**2 * spread / per_sample) / (2 * tau) / math.sqrt(n)
        assert abs(float(correction.sigma_q[i]) - tau) < 5 * sigma_se + s**2 / (per_sample * tau), (i, tau)


def test_negative_k_is_clamped_unless_asked():
    # The last step (t = 1) is left out of the sign checks: ε ≈ a_1 x is tiny there, so k̂ has a large standard error.
    sampler = SAMPLERS["ddim-eta0"]
    clamped, _ = _fit(sampler, k_scale=-1.0)
    assert bool((clamped.k[:-1] < 0).all()) and bool((clamped.k_applied == 0).all())
    raw, _ = _fit(sampler, PTQDConfig(clamp_negative_k=False), k_scale=-1.0)
    assert torch.equal(raw.k_applied, raw.k)
    off, _ = _fit(sampler, PTQDConfig(correlated=False))
    assert bool((off.k_applied == 0).all()) and bool((off.k[:-1] > 0).all())


def _trajectory(denoiser, sampler, hooks=()):
    scheduler = analytic_scheduler()
    result = sample(denoiser, SamplingPlan.build(scheduler, sampler), num_samples=128, seed=EVAL_SEED,
                    sample_shape=SAMPLE_SHAPE, hooks=hooks, record_trajectory=True, progress=False)
    return result.trajectory.states


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_correction_lowers_the_trajectory_error(name):
    sampler = SAMPLERS[name]
    correction, _ = _fit(sampler)
    fp = AnalyticDenoiser(analytic_scheduler())
    reference = _trajectory(fp, sampler)
    uncorrected = per_step_mse(reference, _trajectory(InjectedError(fp, seed=9), sampler))
    corrected = per_step_mse(reference, _trajectory(InjectedError(fp, seed=9), sampler, [correction]))
    assert float(corrected.sum()) < float(uncorrected.sum())
    assert float(corrected[-1]) < float(uncorrected[-1])


def test_vsc_lowers_sigma_only_where_there_is_noise():
    for name in ("ddim-eta1", "ddpm"):
        correction, pair = _fit(SAMPLERS[name])
        for step in pair.steps:
            std = torch.tensor(step.std_dev_t, dtype=torch.float32)
            new = correction.noise_std(std, step)
            if isinstance(new, NoiseStd):  # the default "noise_only" form keeps σ_t in the DDIM direction term
                assert torch.equal(new.direction, std)
                new = new.noise
            if step.std_dev_t > 0:
                assert correction.vsc_active(step) and float(new) < step.std_dev_t
                expected = math.sqrt(max(0.0, step.std_dev_t**2 - (step.coef_eps * float(correction.sigma_tilde[
                    step.index])) ** 2))
                assert float(new) == pytest.approx(expected, rel=1e-5, abs=1e-7)
            else:  # DDPM's last step adds no noise
                assert torch.equal(new, std) and not correction.vsc_active(step)
        assert "active" in vsc_report(correction)
    deterministic, pair = _fit(SAMPLERS["ddim-eta0"])
    zero = torch.tensor(0.0)
    assert all(torch.equal(deterministic.noise_std(zero, step), zero) for step in pair.steps)
    assert not any(deterministic.vsc_active(step) for step in pair.steps)
    assert "inactive" in vsc_report(deterministic) and "η = 0" in vsc_report(deterministic)


def test_ddpm_vsc_moves_the_sample_variance_back_to_fp():
    sampler = SAMPLERS["ddpm"]
    correction, _ = _fit(sampler, noise_std=0.2)
    without_vsc = PTQDCorrection(PTQDConfig(variance=False))
    without_vsc.load_state_dict(correction.state_dict())
    fp = AnalyticDenoiser(analytic_scheduler())
    variance = {label: float(_trajectory(den, sampler, hooks)[-1].double().var()) for label, den, hooks in (
        ("fp", fp, ()), ("vsc", InjectedError(fp, noise_std=0.2, seed=9), [correction]),
        ("cnc_bc", InjectedError(fp, noise_std=0.2, seed=9), [without_vsc]),
    )}
    assert abs(variance["vsc"] - variance["fp"]) < abs(variance["cnc_bc"] - variance["fp"]), variance


def test_quantized_trajectory_mode_fits_on_the_quantized_states():
    sampler = SAMPLERS["ddim-eta0"]
    forced, forced_pair = _fit(sampler, bias=(0.0, 0.0))
    own, own_pair = _fit(sampler, PTQDConfig(trajectory="quantized"), bias=(0.0, 0.0))
    assert own_pair.mode == "quantized" and not torch.equal(own_pair.states, forced_pair.states)
    # Without a bias the injected error does not depend on the state, so both modes find the same k.
    assert torch.allclose(own.k[:-1], forced.k[:-1], atol=0.005)
    # With a per-channel bias the quantized states drift per channel, so ε's channel means correlate with b_c and
    # the pooled single-intercept slope absorbs part of the bias: k is confounded off the FP trajectory.
    biased, _ = _fit(sampler, PTQDConfig(trajectory="quantized"))
    assert float((biased.k[:-1] - injected_k(biased.timesteps[:-1])).abs().max()) > 0.05


def test_a_later_corrector_is_fitted_on_the_output_of_the_earlier_one():
    scheduler, sampler = analytic_scheduler(), SAMPLERS["ddim-eta0"]
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([PTQDCorrection(PTQDConfig(seed=FIT_SEED)), PTQDCorrection(PTQDConfig(seed=FIT_SEED))])
    fit_stack(stack, fit_context(fp, InjectedError(fp), scheduler, sampler), num_samples=NUM_SAMPLES)
    first, second = stack[0], stack[1]
    assert float(first.k[:-1].min()) > 0.04 and float(first.mu[:, 0].min()) > 0.07
    # The second sees ε̃ ≈ ε + s n / (1 + k): nothing correlated and no bias left to fit.
    assert float(second.k[:-1].abs().max()) < 0.005 and float(second.mu.abs().max()) < 0.005
    assert float(second.sigma_q.max()) < float(first.sigma_q.min())


def test_bad_configs_raise():
    for bad in ({"correlated": "yes"}, {"variance": 1}, {"num_samples": 0}, {"trajectory": "fp"}, {"seed": -1}):
        with pytest.raises(ValueError):
            PTQDConfig(**bad)


def test_tables_report_and_plot(tmp_path):
    correction, _ = _fit(SAMPLERS["ddim-eta1"])
    tables = ptqd_tables(correction)
    assert len(tables["k"]) == len(tables["t"]) == len(tables["sigma_q"]) == 10 and len(tables["mu"][0]) == 2
    assert tables["sampler"] == SAMPLERS["ddim-eta1"].key and tables["bits"] == "W4A8"
    path = save_ptqd_tables_plot({"W4A8": tables, "W4A4": tables}, tmp_path / "ptqd.png")
    assert path.is_file() and path.stat().st_size > 1000


# -- on a tiny quantized UNet ---------------------------------------------------------------------------------------
TINY_SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
TINY_CALIB = CalibrationConfig(sampler=TINY_SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4,
                               batch_size=8)


@pytest.fixture
def corrected_unet(tiny_unet, ddpm_scheduler):
    base = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=TINY_CALIB),
                        progress=False)
    return base, fit_ptqd(base, tiny_unet, ddpm_scheduler, TINY_SAMPLER, PTQDConfig(num_samples=16, seed=3))


def test_fit_ptqd_attaches_a_fitted_stack_and_leaves_the_base_alone(corrected_unet, ddpm_scheduler):
    base, corrected = corrected_unet
    assert len(base.corrections) == 0 and len(corrected.corrections) == 1
    assert corrected.model is base.model and corrected.corrections[0].table_key.bits == "W4A8"
    run = {name: api.sample(model, ddpm_scheduler, TINY_SAMPLER, num_samples=4, seed=11, progress=False).images
           for name, model in (("base", base), ("ptqd", corrected))}
    assert not torch.equal(run["base"], run["ptqd"])
    with pytest.raises(ValueError, match="fitted for"):
        api.sample(corrected, ddpm_scheduler, SamplerConfig(kind="ddim", num_steps=5, eta=1.0), num_samples=2, seed=0,
                   progress=False)


def test_saved_ptqd_model_samples_bit_identically(corrected_unet, ddpm_scheduler, tmp_path):
    _, corrected = corrected_unet
    corrected.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    assert [type(c) for c in loaded.corrections] == [PTQDCorrection]
    assert loaded.corrections[0].table_key == corrected.corrections[0].table_key
    runs = [api.sample(model, scheduler, TINY_SAMPLER, num_samples=6, seed=5, progress=False).images
            for model in (corrected, loaded)]
    assert torch.equal(runs[0], runs[1])

    tables = load_file(tmp_path / "q" / CORRECTIONS_FILE)
    del tables["members.0.sigma_q"]
    save_file(tables, tmp_path / "q" / CORRECTIONS_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="corrections.safetensors has"):  # the manifest sees the change first
        tadq.load(tmp_path / "q")
    write_manifest(tmp_path / "q")  # a consistent artefact whose tables lack one: the message names the owner
    with pytest.raises(ValueError, match="PTQDCorrection"):
        tadq.load(tmp_path / "q")


def test_an_int64_timesteps_table_saved_before_loads_as_float64(corrected_unet, ddpm_scheduler, tmp_path):
    """Older tadq saved PTQD's ``timesteps`` as int64 (which truncated fractional grids); such a table still loads,
    exactly, into the float64 table."""
    _, corrected = corrected_unet
    corrected.save_pretrained(tmp_path / "q", ddpm_scheduler)
    tables = load_file(tmp_path / "q" / CORRECTIONS_FILE)
    tables["members.0.timesteps"] = tables["members.0.timesteps"].long()
    with safe_open(tmp_path / "q" / CORRECTIONS_FILE, framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tables, tmp_path / "q" / CORRECTIONS_FILE, metadata=metadata)
    write_manifest(tmp_path / "q")
    loaded, _ = tadq.load(tmp_path / "q")
    timesteps = loaded.corrections[0].timesteps
    assert timesteps.dtype == torch.float64 and torch.equal(timesteps, corrected.corrections[0].timesteps)


def test_step_contexts_of_the_fit_are_the_sampler_steps(corrected_unet, ddpm_scheduler):
    _, corrected = corrected_unet
    steps = list(SamplingPlan.build(ddpm_scheduler, TINY_SAMPLER).steps)
    assert corrected.corrections[0].timesteps.tolist() == [step.t for step in steps]


def test_ddim_noise_only_vsc_moves_the_variance_back_and_full_code_form_does_not():
    sampler = SAMPLERS["ddim-eta1"]
    correction, _ = _fit(sampler, noise_std=0.2)
    variants = {}
    for label, config in (("cnc_bc", PTQDConfig(variance=False)), ("full_code", PTQDConfig(vsc_form="full_code")),
                          ("noise_only", PTQDConfig(vsc_form="noise_only"))):
        variant = PTQDCorrection(config)
        variant.load_state_dict(correction.state_dict())
        variants[label] = variant
    fp = AnalyticDenoiser(analytic_scheduler())
    variance = {"fp": float(_trajectory(fp, sampler, ())[-1].double().var())}
    for label, variant in variants.items():
        states = _trajectory(InjectedError(fp, noise_std=0.2, seed=9), sampler, [variant])
        variance[label] = float(states[-1].double().var())
    gap = {label: abs(variance[label] - variance["fp"]) for label in variants}
    assert gap["noise_only"] < gap["cnc_bc"] < gap["full_code"], variance


def test_tables_fitted_with_clipping_refuse_a_sampler_without_it():
    """The sampler key leaves x̂₀ clipping out (it comes from the scheduler config); the table key records it."""
    clipped = SamplerConfig(kind="ddim", num_steps=10, eta=0.0, clip_sample=True)
    correction, _ = _fit(clipped)
    assert correction.table_key.clip_sample_range == 1.0 and correction.table_key.clip_recorded
    fp = AnalyticDenoiser(analytic_scheduler())
    with pytest.raises(ValueError, match=r"fitted with x̂₀ clipped to ±1.0 but is used without x̂₀ clipping"):
        _trajectory(fp, SamplerConfig(kind="ddim", num_steps=10, eta=0.0), [correction])
    _trajectory(fp, clipped, [correction])  # the same clipping is accepted
    unclipped, _ = _fit(SAMPLERS["ddim-eta0"])
    with pytest.raises(ValueError, match="clip_sample"):
        _trajectory(fp, clipped, [unclipped])


def _guarded_stack(monkeypatch=None, score=None, selection_score="final_mse"):
    scheduler, sampler = analytic_scheduler(), SAMPLERS["ddim-eta0"]
    fp = AnalyticDenoiser(scheduler)
    if score is not None:
        import tadq.corrections.sequential as sequential

        monkeypatch.setattr(sequential, "paired_final_error", score)
    stack = CorrectionStack([PTQDCorrection(PTQDConfig(num_samples=64, seed=FIT_SEED, select=True,
                                                       selection_samples=32, selection_score=selection_score))])
    fit_stack(stack, fit_context(fp, InjectedError(fp), scheduler, sampler))
    plain = CorrectionStack([PTQDCorrection(PTQDConfig(num_samples=64, seed=FIT_SEED))])
    fit_stack(plain, fit_context(fp, InjectedError(fp), scheduler, sampler))  # same pair: same injected noise
    return stack[0], plain[0]


def test_held_out_guard_keeps_cnc_and_bc_where_they_fix_the_injected_error():
    guarded, plain = _guarded_stack()
    records = guarded.selection_records
    assert [(r["cnc"], r["bc"]) for r in records] == [(True, True), (False, True), (True, False), (False, False)]
    scores = {(r["cnc"], r["bc"]): r["final_mse"] for r in records}
    assert min(scores, key=scores.get) == (True, True)  # both parts of the injected error are real
    assert scores[(True, True)] < scores[(False, False)] / 2
    assert torch.equal(guarded.k, plain.k) and torch.equal(guarded.mu, plain.mu)  # kept as fitted
    assert not hasattr(plain, "selection_records")  # no guard unless asked


def test_held_out_guard_zeroes_what_it_switches_off_and_saves_the_choice(monkeypatch, tmp_path):
    def score(ctx, hooks, *, num_samples, seed, score):  # stands in for the held-out error: prefers BC alone
        assert seed == 100000 + FIT_SEED and num_samples == 32  # the held-out seed, never the fitting one
        assert score == "final_mse"
        ptqd = hooks[-1]
        return float(ptqd.k.abs().sum() > 0) + 2.0 * float(ptqd.mu.abs().sum() == 0)

    guarded, plain = _guarded_stack(monkeypatch, score)
    assert [r["final_mse"] for r in guarded.selection_records] == [1.0, 0.0, 3.0, 2.0]
    assert torch.equal(guarded.k, torch.zeros_like(plain.k)) and torch.equal(guarded.mu, plain.mu)
    path = tmp_path / "ptqd.safetensors"
    save_file({name: getattr(guarded, name) for name in guarded.table_names}, path)
    loaded = load_file(path)
    assert torch.equal(loaded["k"], guarded.k) and torch.equal(loaded["mu"], plain.mu)


def test_held_out_guard_config_is_checked():
    with pytest.raises(ValueError, match="selection_seed"):
        PTQDConfig(select=True, seed=3, selection_seed=3)
    with pytest.raises(ValueError, match="selection_samples"):
        PTQDConfig(select=True, selection_samples=0)
    with pytest.raises(ValueError, match="needs correlated or bias"):
        PTQDConfig(select=True, correlated=False, bias=False)


def test_log_mse_ranks_like_mean_psnr_where_the_pooled_mse_follows_one_trajectory():
    from tadq.corrections.sequential import final_state_score
    from tadq.metrics.image import psnr_per_sample

    x_fp = torch.zeros(4, 1, 4, 4)
    one_bad = x_fp.clone()
    one_bad[0] += 0.5  # three exact trajectories, one far off
    all_fair = x_fp + 0.05  # every trajectory a little off
    pooled = {name: final_state_score(x_fp, x, "final_mse") for name, x in (("one_bad", one_bad),
                                                                             ("all_fair", all_fair))}
    logged = {name: final_state_score(x_fp, x, "log_mse") for name, x in (("one_bad", one_bad),
                                                                           ("all_fair", all_fair))}
    assert pooled["all_fair"] < pooled["one_bad"] and logged["one_bad"] < logged["all_fair"]
    psnr = {name: float(psnr_per_sample(x, x_fp).mean()) for name, x in (("one_bad", one_bad),
                                                                          ("all_fair", all_fair))}
    assert psnr["one_bad"] > psnr["all_fair"]  # the ranking the README's mean PSNR gives
    with pytest.raises(ValueError, match="unknown selection score"):
        final_state_score(x_fp, one_bad, "median")


def test_held_out_guard_passes_its_score_and_records_under_its_name(monkeypatch):
    seen = []

    def score(ctx, hooks, *, num_samples, seed, score):
        seen.append(score)
        ptqd = hooks[-1]
        return -float(ptqd.mu.abs().sum() > 0)  # prefers any candidate with BC

    guarded, _ = _guarded_stack(monkeypatch, score, selection_score="log_mse")
    assert seen == ["log_mse"] * 4 and all("log_mse" in r and "final_mse" not in r for r in guarded.selection_records)
    with pytest.raises(ValueError, match="selection_score"):
        PTQDConfig(select=True, selection_score="median")
