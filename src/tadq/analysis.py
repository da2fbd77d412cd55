"""``tadq analyze``: where a quantized model's error comes from — measured cumulative state error per step next to
TCEC's closed-form prediction (docs/methods/tcec.md#propagation).

One quantized-mode trajectory pair gives, at every step n, the quantized state x̂_n, the FP state x_n from the same
noise and the network's own error e_n = ε̂(x̂_n) − ε_θ(x̂_n). The measured δ_n = x̂_n − x_n is compared with

* the J ≈ 0 closed form Σ_s (Π A_r) B_s e_s (``tadq.corrections.tcec.propagation.predict_j0``; with x_0 clipping
  the per-element A, B of ``clip_aware_coefficients``), and
* the recursion with a measured Jacobian-vector term J_n δ̂_n, a forward difference of the FP network on the FP
  trajectory (one more FP call per step and sample),

and the final error is split into each step's share, so users see which steps make it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from tadq.corrections.pair import FitContext, collect_trajectory_pair  # noqa: E402
from tadq.corrections.tcec.propagation import (  # noqa: E402
    clip_aware_coefficients,
    final_contributions,
    predict_j0,
    predict_recursive,
)
from tadq.report.figures import gap_note, plot_positive  # noqa: E402
from tadq.sampling import ConditionSource, Denoiser, SamplerConfig, SamplingPlan, StepContext  # noqa: E402
from tadq.utils import save_figure  # noqa: E402

__all__ = ["PropagationReport", "analyze_propagation", "save_propagation_plot"]

JVP_RELATIVE_STEP = 1e-3  # forward-difference step: ‖h δ‖_rms = 1e-3 · ‖x‖_rms (linear regime, far above fp32 noise)


@dataclass
class PropagationReport:
    """Per-state MSE (index 0 = x_T) of the measured and predicted state error, and each step's share of the end.

    Args:
        measured: MSE(x̂_n, x_n), (S+1) values.
        predicted_j0: MSE of the J ≈ 0 closed-form δ_n.
        predicted_jvp: MSE of the recursion with the measured J δ (``None`` when not measured).
        step_error: MSE of e_n per step (S values).
        final_share: ‖(Π A) B_s e_s‖² / numel per step s (S values), the J ≈ 0 terms of the final error.
        relative_error_j0: ‖δ̂ − δ‖ / ‖δ‖ at the final state, J ≈ 0 (0 when both are 0; inf when only δ is).
        relative_error_jvp: The same with the measured J δ term.
        sampler: ``SamplerConfig.key``.
        clip_sample: Whether x_0 clipping made the update non-linear (predictions then approximate).
        num_samples: Trajectories.
        seed: Noise seed.
    """

    measured: list[float]
    predicted_j0: list[float]
    predicted_jvp: list[float] | None
    step_error: list[float]
    final_share: list[float]
    relative_error_j0: float
    relative_error_jvp: float | None
    sampler: str
    clip_sample: bool
    num_samples: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mse_per_state(delta: Tensor) -> list[float]:
    return delta.double().square().flatten(1).mean(1).tolist()


def _relative(predicted: Tensor, measured: Tensor) -> float:
    """‖predicted − measured‖ / ‖measured‖; with no measured error, 0 when the prediction is exact too (it was
    0/0 = nan, drawn as "nan" in the figure's legend), else inf (no finite ratio; null in analysis.json)."""
    norm = float(measured.double().norm())
    difference = float((predicted.double() - measured.double()).norm())
    if norm > 0:
        return difference / norm
    return 0.0 if difference == 0 else math.inf


def _relative_label(value: float) -> str:
    """The legend's final relative error: two decimals, or what an infinite one means."""
    return f"{value:.2f}" if math.isfinite(value) else "∞: none measured, some predicted"


def _measured_jvp(ctx: FitContext, fp_states: Tensor, fp_eps: Tensor, steps: list[StepContext], seed: int):
    """J_n δ by a forward difference of the FP network at the FP state x_n; ε_θ(x_n) is the pair's recorded
    ``eps_fp_trajectory``, so each step costs one FP call, not two.

    The pair's states are on the CPU: each shifted batch goes to the networks' device and its ε comes back. The
    network is called as the sampler calls it (``Walker.predict``): at the timestep it fed (on a fractional grid,
    euler or flow, a long ``t`` called the network at another time than ε_θ(x_n) was recorded at, and the difference
    quotient measured that instead), with each sample's conditions and, for a guided plan, both branches mixed at
    the plan's scale, so J is the Jacobian of the guided ε the error propagates through."""
    walker = ctx.walker()
    conditions = [batch.cond for batch in ctx.batches(seed, fp_states.shape[1])]  # the pair's rows, in its batches
    device = torch.device(ctx.device)

    def jvp(n: int, delta: Tensor) -> Tensor:
        x = fp_states[n]
        scale = float(delta.square().mean().sqrt())
        if scale == 0.0:
            return torch.zeros_like(delta)
        h = JVP_RELATIVE_STEP * float(x.double().square().mean().sqrt()) / scale
        outputs = []
        with torch.no_grad():
            for cond, start in zip(conditions, range(0, x.shape[0], ctx.batch_size), strict=True):
                base = x[start: start + ctx.batch_size]
                shifted = (base.double() + h * delta[start: start + ctx.batch_size]).to(device=device,
                                                                                       dtype=base.dtype)
                at_x = fp_eps[n][start: start + ctx.batch_size].double()
                eps, _ = walker.predict(ctx.fp_denoiser, shifted, steps[n], cond)
                outputs.append((eps.to(at_x.device).double() - at_x) / h)  # widened on the host: MPS has no float64
        return torch.cat(outputs)

    return jvp


def analyze_propagation(
    q_denoiser: Denoiser,
    fp_denoiser: Denoiser,
    scheduler,
    sampler: SamplerConfig,
    *,
    num_samples: int = 64,
    seed: int = 1000,
    measure_jacobian: bool = True,
    batch_size: int = 128,
    sample_shape: tuple[int, int, int] | None = None,
    bits: str | None = None,
    conditions: ConditionSource | None = None,
    guidance_scale: float = 1.0,
) -> PropagationReport:
    """Measured vs predicted cumulative error of ``q_denoiser`` (the network without corrections) along ``sampler``;
    a conditional model with its per-sample ``conditions`` (labels or prompts, drawn from ``seed`` as ``tadq.sample``
    draws them) and classifier-free guidance at ``guidance_scale``: the error is that of the guided ε."""
    ctx = FitContext.of(fp_denoiser, q_denoiser, SamplingPlan.build(scheduler, sampler, guidance_scale),
                        sample_shape=sample_shape, bits=bits, batch_size=batch_size, conditions=conditions)
    pair = collect_trajectory_pair(ctx, num_samples=num_samples, seed=seed, mode="quantized")
    steps = list(pair.steps)
    errors = pair.eps_q.double() - pair.eps_fp.double()  # e_n at the quantized state, (S, N, C, H, W)
    measured = pair.states.double() - pair.fp_states.double()  # δ_n, (S+1, N, C, H, W)
    # linearised where the FP trajectory goes, clipping of x_0 included (scalar A, B when the sampler does not clip)
    pairs = clip_aware_coefficients(steps, pair.fp_states, pair.eps_fp_trajectory)
    j0 = predict_j0(errors, steps) if steps[0].clip_sample_range is None else predict_recursive(
        errors, steps, coefficients=pairs)
    jvp = None
    if measure_jacobian:
        jvp = predict_recursive(errors, steps, _measured_jvp(ctx, pair.fp_states, pair.eps_fp_trajectory, steps,
                                                              seed), coefficients=pairs)
    return PropagationReport(
        measured=_mse_per_state(measured), predicted_j0=_mse_per_state(j0),
        predicted_jvp=None if jvp is None else _mse_per_state(jvp),
        step_error=errors.square().flatten(1).mean(1).tolist(),
        final_share=final_contributions(errors, steps, pairs).tolist(),
        relative_error_j0=_relative(j0[-1], measured[-1]),
        relative_error_jvp=None if jvp is None else _relative(jvp[-1], measured[-1]),
        sampler=sampler.key, clip_sample=steps[0].clip_sample_range is not None, num_samples=num_samples, seed=seed,
    )


def save_propagation_plot(report: PropagationReport, path: str | Path, title: str = "") -> Path:
    """Left: measured vs predicted MSE(δ_n) per state; right: each step's share of the final error.

    Zeros (x_T, which the FP and quantized runs share, or a step that adds nothing) are left out of the log axes
    and said: they were drawn at 1e-14, a value nobody measured, which also stretched the axis over ten decades
    below the curves."""
    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    curves = [(report.measured, "measured", {"color": "k", "linestyle": "-", "linewidth": 2}),
              (report.predicted_j0, f"closed form, J≈0 (final rel. err {_relative_label(report.relative_error_j0)})",
               {"color": "tab:blue", "linestyle": "--"})]
    if report.predicted_jvp is not None:
        curves.append((report.predicted_jvp, f"recursion with measured Jδ (final rel. err "
                                             f"{_relative_label(report.relative_error_jvp)})",
                       {"color": "tab:orange", "linestyle": ":", "linewidth": 2}))
    for values, label, look in curves:
        values = np.asarray(values, dtype=np.float64)
        plot_positive(left, values, label + gap_note(values, "0 at every state"), look)
    left.set_yscale("log")
    left.set_xlabel("state (0 = x_T)")
    left.set_ylabel("MSE(x̂_n − x_n)")
    left.set_title("cumulative state error" + (" (A, B linearised with x_0 clipping)" if report.clip_sample
                                                else ""), fontsize=9)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    share = np.asarray(report.final_share, dtype=np.float64)
    drawn = np.isfinite(share) & (share > 0)
    if drawn.any():  # matplotlib refuses a log axis over bars of height 0 only
        right.bar(np.flatnonzero(drawn), share[drawn], color="tab:orange")
    right.set_xlim(-0.6, max(len(share), 1) - 0.4)
    right.set_yscale("log")
    right.set_xlabel("step s (0 = noisiest)")
    right.set_ylabel("‖(Π A) B_s e_s‖² / numel")
    missing = len(share) - int(drawn.sum())
    right.set_title("each step's share of the final error (J≈0)"
                    + (f"; {missing} of {len(share)} steps 0 or not finite: no bar" if missing else ""), fontsize=9)
    right.grid(True, which="both", alpha=0.3)
    fig.suptitle(title or f"error propagation, {report.sampler}, {report.num_samples} samples")
    fig.tight_layout()
    return save_figure(fig, path)
