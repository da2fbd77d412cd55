"""TAC (IBC, NER) and TCEC on analytic denoisers with injected, known errors."""

from __future__ import annotations

import pytest
import torch
from tests.corrections.analytic import (
    SAMPLE_SHAPE,
    SCALE,
    SHIFT,
    AnalyticDenoiser,
    InjectedError,
    Scaled,
    Shifted,
    analytic_scheduler,
    fit_context,
)

from tadq.corrections import CorrectionStack, TACConfig, TCECConfig, fit_stack
from tadq.corrections.scaling import fit_channel_affine, fit_through_coefficient
from tadq.corrections.sequential import StepTargets, paired_final_error
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan

SAMPLER = SamplerConfig(kind="ddim", num_steps=10, eta=0.0)


def _fit(configs, quantized_factory, sampler=SAMPLER):
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    stack = CorrectionStack([correction_for(config) for config in configs])
    fit_stack(stack, fit_context(fp, quantized_factory(fp), scheduler, sampler))
    return stack, fp, scheduler


def test_closed_form_fit_recovers_a_scale_and_offset_and_is_exact_at_zero_error():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(64, 2, 4, 4, generator=generator)
    estimate = (target - SHIFT.view(1, -1, 1, 1)) / SCALE.view(1, -1, 1, 1)
    for weight in (0.0, 0.5, 1.0):
        fit = fit_channel_affine(estimate, target, relative_weight=weight, offset=True)
        assert torch.allclose(fit.scale, SCALE.double(), atol=1e-9)
        assert torch.allclose(fit.offset, SHIFT.double(), atol=1e-9)
    pixel_scale = 1.0 + torch.rand(2, 4, 4, generator=generator)
    per_element = fit_channel_affine(target / pixel_scale, target, relative_weight=0.5, per_element=True)
    assert per_element.scale.shape == (2, 4, 4) and torch.allclose(per_element.scale, pixel_scale.double(), atol=1e-9)
    identity = fit_channel_affine(target, target, relative_weight=0.5)
    assert torch.equal(identity.scale, torch.ones(2, dtype=torch.float64))
    with pytest.raises(ValueError):
        fit_channel_affine(estimate, target[:, :1])


def test_ner_recovers_an_injected_channel_scale():
    config = TACConfig(ibc=False, ner=True, ner_target="same_input", num_samples=16)
    stack, _, _ = _fit([config, TCECConfig(select=False, num_samples=16, seed=1)], Scaled)
    tac, tcec = stack[0], stack[1]
    assert torch.allclose(tac.scale, (1 / SCALE.double()).expand_as(tac.scale), rtol=1e-5)
    # TCEC is fitted behind NER, on its output (no double correction): nothing is left for it to find.
    assert float(tcec.k.abs().max()) < 1e-5


@pytest.mark.parametrize("resolution", ["channel", "full"])
@pytest.mark.parametrize("offset", [False, True])
def test_tcec_alone_finds_the_error_scale(resolution, offset):
    config = TCECConfig(select=False, num_samples=16, resolution=resolution, offset=offset)
    stack, _, _ = _fit([config], Scaled)
    k, b = stack[0].k, stack[0].b
    expected = (1 - 1 / SCALE.double()).view(1, -1, *([1] * (k.ndim - 2)))
    assert k.shape[:2] == (10, 2) and k.ndim == (2 if resolution == "channel" else 4)
    assert torch.allclose(k, expected.expand_as(k), rtol=1e-5, atol=1e-5)
    assert float(b.abs().max()) < 1e-5


@pytest.mark.parametrize("resolution", ["channel", "full"])
def test_tcec_offset_recovers_an_injected_output_bias(resolution):
    stack, _, _ = _fit([TCECConfig(select=False, num_samples=16, resolution=resolution, offset=True)], Shifted)
    k, b = stack[0].k, stack[0].b
    expected = SHIFT.double().view(1, -1, *([1] * (b.ndim - 2)))
    assert torch.allclose(b, expected.expand_as(b), atol=1e-5) and float(k.abs().max()) < 1e-5


def test_fit_through_coefficient_recovers_scale_and_offset_and_ignores_unmovable_elements():
    generator = torch.Generator().manual_seed(3)
    estimate = torch.randn(64, 2, 4, 4, generator=generator)
    coefficient = torch.rand(64, 2, 4, 4, generator=generator) + 0.1
    coefficient[:, :, 0, 0] = 0.0  # clipped elements ε cannot move
    error = SCALE.view(1, -1, 1, 1) * estimate + SHIFT.view(1, -1, 1, 1)
    residual = coefficient * error
    residual[:, :, 0, 0] = 5.0  # whatever sits there must not matter
    fit = fit_through_coefficient(estimate, coefficient, residual, offset=True)
    assert torch.allclose(fit.scale, SCALE.double(), atol=1e-6)
    assert torch.allclose(fit.offset, SHIFT.double(), atol=1e-6)
    per_element = fit_through_coefficient(estimate, coefficient, residual, per_element=True, offset=True)
    assert torch.equal(per_element.scale[:, 0, 0], torch.zeros(2, dtype=torch.float64))  # unconstrained: no change
    assert torch.allclose(per_element.scale[:, 1:, 1:], SCALE.double().view(-1, 1, 1).expand(2, 3, 3), atol=1e-6)


def test_tcec_window_leaves_the_steps_before_start_alone():
    stack, _, scheduler = _fit([TCECConfig(select=False, num_samples=16, start=0.5)], Scaled)
    correction = stack[0]
    steps = SamplingPlan.build(scheduler, SAMPLER).steps
    assert correction.first_step == 5
    eps = torch.randn(3, *SAMPLE_SHAPE)
    assert torch.equal(correction.after_model(eps, eps, steps[4]), eps)
    assert not torch.allclose(correction.after_model(eps, eps, steps[5]), eps)


def test_ibc_recovers_the_injected_input_bias():
    stack, _, scheduler = _fit([TACConfig(ibc=True, ner=False, ibc_resolution="channel", num_samples=16)], Shifted)
    steps = SamplingPlan.build(scheduler, SAMPLER).steps
    bias = stack[0].input_bias  # (S, C)
    assert torch.equal(bias[0], torch.zeros(2, dtype=torch.float64))  # same x_T
    # Step n-1's bias was removed from the trajectory, so x̂_n − x_n is the last step's own B_{n-1} c.
    expected = torch.stack([steps[n - 1].coef_eps * SHIFT.double() for n in range(1, len(steps))])
    assert torch.allclose(bias[1:], expected, atol=1e-5)


@pytest.mark.parametrize("configs", [
    [TACConfig(ibc=True, ner=False)],
    [TACConfig(ibc=False, ner=True)],
    [TACConfig()],
    [TCECConfig()],
    [TACConfig(), TCECConfig(seed=1)],
], ids=["ibc", "ner", "tac", "tcec", "tac+tcec"])
def test_each_correction_lowers_the_final_error(configs):
    configs = [type(c)(**{**c.__dict__, "num_samples": 32}) for c in configs]
    sampler = SamplerConfig(kind="ddim", num_steps=10, eta=1.0)
    stack, fp, scheduler = _fit(configs, InjectedError, sampler)
    options = {"num_samples": 32, "seed": 777}
    plain = paired_final_error(fit_context(fp, InjectedError(fp, seed=5), scheduler, sampler), (), **options)
    corrected = paired_final_error(fit_context(fp, InjectedError(fp, seed=5), scheduler, sampler), tuple(stack),
                                   **options)
    assert corrected < 0.9 * plain


class TimeOnly:
    """ε_FP depends on t only (J = 0): the regime where TCEC's compensation is exact."""

    def __init__(self) -> None:
        self.pattern = torch.randn((1, *SAMPLE_SHAPE), generator=torch.Generator().manual_seed(1))

    def __call__(self, x, t, cond=None):
        return torch.cos(t.double() / 300).float().view(-1, 1, 1, 1) * self.pattern.expand(x.shape[0], -1, -1, -1)


_FITS = {"default": {}, "paper": {"resolution": "channel", "offset": False}, "state": {"error_space": "state"}}


# the next-state target already holds the propagated error, so only its immediate form cancels it
@pytest.mark.parametrize(("mix", "fit"), [(mix, fit) for mix in (1.0, 0.5, 0.0) for fit in _FITS.values()]
                         + [(1.0, {"target": "next_state"})],
                         ids=[f"{name}-{mix}" for mix in (1.0, 0.5, 0.0) for name in _FITS] + ["next_state-1.0"])
def test_tcec_cancels_the_cumulative_error_when_the_jacobian_is_zero(mix, fit):
    scheduler = analytic_scheduler()
    fp = TimeOnly()
    quantized = Scaled(fp)
    stack = CorrectionStack([correction_for(TCECConfig(select=False, mix=mix, num_samples=8, **fit))])
    ctx = fit_context(fp, quantized, scheduler, SAMPLER)
    fit_stack(stack, ctx)
    options = {"num_samples": 4, "seed": 9}
    plain = paired_final_error(ctx, (), **options)
    corrected = paired_final_error(ctx, tuple(stack), **options)
    assert plain > 1e-4 and corrected < 1e-9 * plain  # float32 rounding of the states only


def test_tcec_selection_keeps_the_best_held_out_candidate():
    stack, _, _ = _fit([TCECConfig(num_samples=16)], InjectedError)
    records = stack[0].selection_records
    assert len(records) == 5 * 4 + 1 and all(r["final_mse"] == r["final_mse"] for r in records)  # no NaN
    assert records[-1]["strength"] == 0.0  # the "no compensation" candidate is scored too
    best = min(records, key=lambda r: r["final_mse"])
    chosen = (float(stack[0].mix), float(stack[0].damping), float(stack[0].strength))
    assert chosen == (best["mix"], best["damping"], best["strength"])


def test_delayed_tcec_refuses_out_of_order_steps():
    stack, _, scheduler = _fit([TCECConfig(select=False, mix=0.0, num_samples=8)], Scaled)
    steps = SamplingPlan.build(scheduler, SAMPLER).steps
    x = torch.randn(2, *SAMPLE_SHAPE)
    with pytest.raises(RuntimeError, match="in order"):
        stack[0].after_model(x, x, steps[3])


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="quantized"):
        TACConfig(trajectory="teacher_forced")
    with pytest.raises(ValueError, match="corrects nothing"):
        TACConfig(ibc=False, ner=False)
    with pytest.raises(ValueError):
        TCECConfig(mix_candidates=(1.5,))
    with pytest.raises(ValueError):
        TCECConfig(seed=3, selection_seed=3)


def test_ner_held_out_switch_keeps_ner_where_it_helps_and_records_both_candidates():
    config = TACConfig(ibc=True, ner=True, ner_resolution="channel", num_samples=16, select_ner=True,
                       selection_samples=8)
    stack, _, _ = _fit([config], Scaled)
    tac = stack[0]
    records = {record["ner"]: record["final_mse"] for record in tac.selection_records}
    assert set(records) == {True, False} and all(value == value for value in records.values())  # both scored
    assert records[True] < records[False]  # an injected scale: the rescale is what removes it
    expected_k = (1.0 / SCALE).double()
    assert torch.allclose(tac.scale[1:].mean(dim=0), expected_k, atol=0.05)  # NER's tables were kept


def test_when_ner_off_wins_the_held_out_score_the_rescale_is_identity(monkeypatch):
    """The selection wiring: the candidate with the lower held-out score keeps its tables (here forced to be NER
    off, by scoring it lower), and NER off means K = 1 everywhere."""
    import tadq.corrections.sequential as sequential

    scores = iter([2.0, 1.0])  # NER on, then NER off
    monkeypatch.setattr(sequential, "paired_final_error", lambda *args, **kwargs: next(scores))
    stack, _, _ = _fit([TACConfig(ibc=True, ner=True, num_samples=8, select_ner=True, selection_samples=4)], Scaled)
    tac = stack[0]
    assert [record["ner"] for record in tac.selection_records] == [True, False]
    assert torch.equal(tac.scale, torch.ones_like(tac.scale))
    assert tac.input_bias.abs().sum() > 0  # IBC stays fitted
    with pytest.raises(ValueError, match="select_ner"):
        TACConfig(ner=False, select_ner=True)


def test_tcec_on_target_keeps_the_estimate_fit_where_the_estimate_does_not_follow_the_target():
    """error_model="on_target" inverts ε̂ ≈ s ε + d; where s ≤ 0 there is no inverse. The slope was clamped to 1e-6,
    so K = 1 − 10⁶ and the samples diverged. There the on-estimate fit (the default error model) is kept."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(64, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = 0.1 * torch.randn(target.shape, generator=generator, dtype=torch.float64)
    eps_hat = torch.stack([1.25 * target[:, 0] + 0.1, -0.5 * target[:, 1]], dim=1) + noise  # channel 1: s < 0
    correction = correction_for(TCECConfig(select=False, error_model="on_target", resolution="channel"))
    steps = SamplingPlan.build(analytic_scheduler(), SAMPLER).steps
    correction.reset_tables(steps, tuple(target.shape[1:]))
    correction.fit_output_row(0, eps_hat, StepTargets(target, target, target, target), steps[0])
    on_target = fit_channel_affine(target, eps_hat, relative_weight=0.0, offset=True)
    on_estimate = fit_channel_affine(eps_hat, target, relative_weight=0.0, offset=True)
    assert float(on_target.scale[0]) > 0 > float(on_target.scale[1])
    assert torch.allclose(correction.k[0], torch.stack([1 - 1 / on_target.scale[0], 1 - on_estimate.scale[1]]))
    assert torch.allclose(correction.b[0], torch.stack([on_target.offset[0] / on_target.scale[0],
                                                        -on_estimate.offset[1]]))


def test_tcec_on_target_does_not_diverge_where_the_last_steps_noise_hides_the_target():
    """At DDIM's last step the analytic ε (≈ 0.02) is below the injected quantization noise (0.05): fitted through
    the origin the on-target slope of that step is ≤ 0 and the samples diverged (final MSE ~10⁵ × the uncorrected)."""
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    ctx = fit_context(fp, InjectedError(fp), scheduler, SamplerConfig("ddim", 5), batch_size=16)
    stack = CorrectionStack([correction_for(TCECConfig(num_samples=16, select=False, error_model="on_target",
                                                       resolution="channel", offset=False))])
    fit_stack(stack, ctx)
    options = {"num_samples": 16, "seed": 9}
    assert paired_final_error(ctx, tuple(stack), **options) < paired_final_error(ctx, (), **options)

