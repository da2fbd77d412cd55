"""``tadq.analysis``: the propagation report and its figure."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from tests.corrections.analytic import SAMPLE_SHAPE, AnalyticDenoiser, analytic_scheduler
from tests.device_standins import OnDeviceWithoutFloat64

from tadq.analysis import analyze_propagation, save_propagation_plot
from tadq.sampling import SamplerConfig


def test_an_exact_network_reports_zero_relative_error_not_nan(tmp_path, monkeypatch):
    """A quantized network equal to the FP one has zero measured and predicted error: the relative error is 0 (it
    was 0/0 = nan, written as null and drawn as "final rel. err nan" in the legend)."""
    torch.set_num_threads(1)
    scheduler = analytic_scheduler()
    fp = AnalyticDenoiser(scheduler)
    report = analyze_propagation(fp, fp, scheduler, SamplerConfig("ddim", 4), num_samples=4, seed=1000,
                                 sample_shape=tuple(SAMPLE_SHAPE), bits="W4A8")
    assert max(report.measured) == 0.0
    assert report.relative_error_j0 == 0.0 and report.relative_error_jvp == 0.0
    legends = []
    original = plt.Figure.savefig

    def spy(figure, *args, **kwargs):
        legends.extend(text.get_text() for axis in figure.axes if axis.get_legend()
                       for text in axis.get_legend().get_texts())
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    save_propagation_plot(report, tmp_path / "propagation.png")
    assert legends and not any("nan" in text for text in legends)
    assert any("final rel. err 0.00" in text for text in legends)
    assert not math.isnan(report.relative_error_j0)


def test_a_predicted_error_where_none_was_measured_is_infinite_and_labelled():
    from tadq.analysis import _relative, _relative_label

    zero = torch.zeros(3)
    assert _relative(torch.ones(3), zero) == math.inf and _relative(zero, zero) == 0.0
    assert "nan" not in _relative_label(math.inf) and _relative_label(0.0) == "0.00"


def test_zero_errors_are_left_out_of_the_log_axes_and_said(tmp_path, monkeypatch):
    """Every zero (x_T, shared by both runs; a step adding nothing) was drawn at 1e-14: a value nobody measured,
    which stretched the left axis over ten decades below the curves and drew a bar for a step with no share."""
    from tadq.analysis import PropagationReport

    measured = [0.0, 1e-5, 3e-5, 1e-4]
    report = PropagationReport(measured=measured, predicted_j0=[0.0, 1.1e-5, 2.9e-5, 1.2e-4], predicted_jvp=None,
                               step_error=[1e-3] * 3, final_share=[1e-6, 0.0, 3e-5], relative_error_j0=0.1,
                               relative_error_jvp=None, sampler="ddim-3", clip_sample=False, num_samples=4,
                               seed=1000)
    figures = []
    original = plt.Figure.savefig

    def spy(figure, *args, **kwargs):
        figures.append(figure)
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    save_propagation_plot(report, tmp_path / "propagation.png")
    left, right = figures[0].axes
    smallest = min(value for value in measured if value > 0)
    assert left.get_ylim()[0] > smallest / 10  # the axis spans the curves, not 1e-14
    heights = [bar.get_height() for bar in right.patches]
    assert sorted(heights) == sorted(value for value in report.final_share if value > 0)
    assert "1 of 3 steps 0" in right.get_title()


def test_the_measured_jacobian_calls_the_network_at_the_samplers_own_timesteps():
    """On a fractional grid (euler with 3 steps over 1000: t = 999, 499.5, 0) the forward difference called the FP
    network with a long t (499 instead of 499.5), so J δ measured the change of t as well as the one of δ."""
    from diffusers import DDPMScheduler
    from tests.conftest import build_tiny_unet

    from tadq.corrections.attach import as_denoiser
    from tadq.sampling import SamplingPlan

    torch.set_num_threads(1)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    sampler = SamplerConfig("euler", 3)
    grid = {step.t for step in SamplingPlan.build(scheduler, sampler).steps}
    assert any(not float(t).is_integer() for t in grid)  # the case: a timestep between two integers
    fp, seen = as_denoiser(build_tiny_unet()), []

    def recording(x, t, cond=None):
        seen.append((t.dtype, t.device == x.device, *t.tolist()))
        return fp(x, t, cond)

    analyze_propagation(as_denoiser(build_tiny_unet(1)), recording, scheduler, sampler, num_samples=2, seed=1000,
                        sample_shape=(1, 8, 8), bits="W4A8", batch_size=2)
    assert len(seen) > len(grid)  # the sampled pair's calls and the Jacobian's
    assert all(dtype == torch.float32 and same_device for dtype, same_device, *_ in seen)
    assert {t for _, _, *times in seen for t in times} == grid


def test_the_measured_jacobian_widens_the_networks_output_on_the_host():
    """J δ cast the network's ε to float64 before bringing it to the pair's CPU (``.double().to(...)``): on MPS,
    which has no float64, ``tadq analyze`` raised at its first step. It is brought back first (the same values)."""
    from diffusers import DDIMScheduler

    from tadq.analysis import _measured_jvp
    from tadq.corrections.pair import FitContext
    from tadq.sampling import SamplingPlan

    plan = SamplingPlan.build(DDIMScheduler(num_train_timesteps=1000), SamplerConfig("ddim", 2))
    states, eps = torch.randn(3, 2, 1, 4, 4), torch.randn(2, 2, 1, 4, 4)

    def network(x, t, cond=None):
        return (2.0 * x).as_subclass(OnDeviceWithoutFloat64)

    def jvp_of(denoiser):
        ctx = FitContext.of(denoiser, denoiser, plan, sample_shape=(1, 4, 4), bits="W8A8", batch_size=2)
        return _measured_jvp(ctx, states, eps, list(plan.steps), seed=0)

    delta = torch.randn(2, 1, 4, 4)
    assert torch.equal(jvp_of(network)(0, delta), jvp_of(lambda x, t, cond=None: 2.0 * x)(0, delta))
