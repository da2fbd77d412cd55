"""How per-step noise-estimate error propagates through the sampler, in closed form (TCEC, docs/methods/tcec.md).

For the linear update x_prev = A_n x_n + B_n ε + σ_n z shared by the FP and the quantized run (same z), with
δ_n = x̂_n − x_n the state error and e_n = ε̂(x̂_n) − ε_θ(x̂_n) the network's own error at step n (grid order, n = 0
the noisiest):

    δ_{n+1} = (A_n + B_n J_n) δ_n + B_n e_n                      (exact up to O(δ²), J_n = ∂ε_θ/∂x at x_n)
    δ_N    = Σ_s [Π_{r=s+1}^{N-1} (A_r + B_r J_r)] B_s e_s       (closed form, δ_0 = 0)

With J ≈ 0 (the paper's approximation) the chain is the scalar product Π A_r. ``predict_j0`` evaluates the closed
form; ``predict_recursive`` runs the recursion with a supplied Jacobian-vector product (measured on the network by
``tadq.analysis``). ``final_contributions`` splits the final error into each step's share.

Clipping x_0 (a scheduler's ``clip_sample``) changes the update element by element: where x̂_0 is clipped, DDIM's
x_prev = √ᾱ_prev·(±r) + √(1−ᾱ_prev−σ²)·ε no longer depends on x and passes ε with the direction coefficient instead
of B (≈ 4.6× larger at the first DDIM-50 step of a linear schedule). ``clip_aware_coefficients`` gives these
per-element (A, B) from the FP trajectory; every function takes them in place of the scalar ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tadq.sampling import StepContext, require_one_step

__all__ = ["Coefficients", "chain_factors", "clip_aware_coefficients", "final_contributions", "predict_j0",
           "predict_recursive", "step_coefficients"]

Coefficients = Sequence[tuple[Tensor | float, Tensor | float]]  # per step (A_n, B_n), scalars or per element


def clip_aware_coefficients(steps: Sequence[StepContext], states: Tensor, eps: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-element (A_n, B_n) of the update linearised at (x_n, ε_n) of a trajectory, x_0 clipping included.

    Args:
        steps: The sampler steps.
        states: x_n per step, (S or S+1, N, C, H, W) (the last state is not used).
        eps: ε_n the trajectory used, (S, N, C, H, W).

    Returns:
        One (A, B) pair of float64 tensors (N, C, H, W) per step.
    """
    _require_one_step(steps)
    return [step_coefficients(step, states[n], eps[n]) for n, step in enumerate(steps)]


def step_coefficients(step: StepContext, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element (A, B) of one update linearised at (x, ε), x_0 clipping included (float64, shaped like x)."""
    x, e = x.double(), eps.double()
    a_t, a_prev = step.alpha_prod_t, step.alpha_prod_t_prev
    unclipped_a, unclipped_b = torch.full_like(x, step.coef_x), torch.full_like(x, step.coef_eps)
    if step.clip_sample_range is None:
        return unclipped_a, unclipped_b
    clipped = ((x - (1 - a_t) ** 0.5 * e) / a_t**0.5).abs() > step.clip_sample_range
    if step.kind == "ddim":  # clipped: √ᾱ_prev·(±r) + √(1−ᾱ_prev−σ²)·ε
        clipped_a, clipped_b = 0.0, max(1.0 - a_prev - step.std_dev_t**2, 0.0) ** 0.5
    else:  # DDPM: c_0·(±r) + c_x·x, with c_x = √α_t (1−ᾱ_prev)/(1−ᾱ_t)
        clipped_a, clipped_b = (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t), 0.0
    return torch.where(clipped, clipped_a, unclipped_a), torch.where(clipped, clipped_b, unclipped_b)


def _require_one_step(steps: Sequence[StepContext]) -> None:
    require_one_step(steps, "TCEC's error propagation", "δ_{n+1} then also depends on δ_{n-1} and e_{n-1} "
                     "(through coef_prev_x and coef_prev_eps), which this one-step recursion leaves out")


def _coefficients(steps: Sequence[StepContext]) -> tuple[Tensor, Tensor]:
    _require_one_step(steps)
    coef_x = torch.tensor([step.coef_x for step in steps], dtype=torch.float64)
    coef_eps = torch.tensor([step.coef_eps for step in steps], dtype=torch.float64)
    return coef_x, coef_eps


def chain_factors(steps: Sequence[StepContext]) -> Tensor:
    """P[s, n] = Π_{r=s+1}^{n-1} A_r for s < n (0 elsewhere): how step s's error scales on its way to state n.

    Returns (S, S+1) float64.
    """
    coef_x, _ = _coefficients(steps)
    count = len(steps)
    factors = torch.zeros(count, count + 1, dtype=torch.float64)
    for s in range(count):
        running = 1.0
        for n in range(s + 1, count + 1):
            factors[s, n] = running
            if n < count:
                running *= float(coef_x[n])
    return factors


def predict_j0(errors: Tensor, steps: Sequence[StepContext]) -> Tensor:
    """δ_n for every n by the J ≈ 0 closed form: Σ_{s<n} (Π_{r=s+1}^{n-1} A_r) B_s e_s.

    Args:
        errors: e_s per step, (S, N, ...).
        steps: The sampler steps.

    Returns:
        (S+1, N, ...) float64, δ_0 = 0.
    """
    if errors.shape[0] != len(steps):
        raise ValueError(f"errors has {errors.shape[0]} steps, the sampler {len(steps)}")
    _, coef_eps = _coefficients(steps)
    weighted = errors.double() * coef_eps.view(-1, *([1] * (errors.ndim - 1)))  # B_s e_s
    factors = chain_factors(steps)  # (S, S+1)
    return torch.einsum("sn,s...->n...", factors, weighted)


def _scalar_pairs(steps: Sequence[StepContext]) -> list[tuple[float, float]]:
    _require_one_step(steps)
    return [(step.coef_x, step.coef_eps) for step in steps]


def predict_recursive(errors: Tensor, steps: Sequence[StepContext],
                      jvp: Callable[[int, Tensor], Tensor] | None = None,
                      coefficients: Coefficients | None = None) -> Tensor:
    """δ_n by the recursion δ_{n+1} = A_n δ_n + B_n (e_n + J_n δ_n); ``jvp(n, δ)`` gives J_n δ (None: J = 0).

    ``coefficients``: per-step (A_n, B_n), e.g. ``clip_aware_coefficients``; default the sampler's scalars.
    Returns (S+1, N, ...) float64.
    """
    _require_one_step(steps)
    pairs = _scalar_pairs(steps) if coefficients is None else coefficients
    delta = torch.zeros_like(errors[0], dtype=torch.float64)
    states = [delta]
    for n in range(len(steps)):
        drive = errors[n].double()
        if jvp is not None:
            drive = drive + jvp(n, delta).double()
        coef_x, coef_eps = pairs[n]
        delta = coef_x * delta + coef_eps * drive
        states.append(delta)
    return torch.stack(states)


def final_contributions(errors: Tensor, steps: Sequence[StepContext],
                        coefficients: Coefficients | None = None) -> Tensor:
    """Mean squared size of each step's term in the J ≈ 0 final error, ‖(Π_{r>s} A_r) B_s e_s‖² / numel, (S,).

    The terms are not orthogonal, so they need not sum to the final MSE; they show which steps' errors dominate.
    ``coefficients`` as in ``predict_recursive``.
    """
    _require_one_step(steps)
    if coefficients is not None:
        shares, carried = [], torch.ones_like(errors[0], dtype=torch.float64)  # Π_{r>s} A_r, built backwards
        for s in reversed(range(len(steps))):
            coef_x, coef_eps = coefficients[s]
            shares.append((carried * coef_eps * errors[s].double()).square().mean())
            carried = carried * coef_x
        return torch.stack(shares[::-1])
    _, coef_eps = _coefficients(steps)
    factors = chain_factors(steps)[:, -1]  # (S,)
    scale = (factors * coef_eps).view(-1, *([1] * (errors.ndim - 1)))
    return (scale * errors.double()).square().flatten(1).mean(1)
