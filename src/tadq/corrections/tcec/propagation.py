"""How per-step noise-estimate error propagates through the sampler, in closed form (TCEC, methods.md §4 B1-B4).

For the linear update x_prev = A_n x_n + B_n ε + σ_n z shared by the FP and the quantized run (same z), with
δ_n = x̂_n − x_n the state error and e_n = ε̂(x̂_n) − ε_θ(x̂_n) the network's own error at step n (grid order, n = 0
the noisiest):

    δ_{n+1} = (A_n + B_n J_n) δ_n + B_n e_n                      (exact up to O(δ²), J_n = ∂ε_θ/∂x at x_n)
    δ_N    = Σ_s [Π_{r=s+1}^{N-1} (A_r + B_r J_r)] B_s e_s       (closed form, δ_0 = 0)

With J ≈ 0 (the paper's approximation) the chain is the scalar product Π A_r. ``predict_j0`` evaluates the closed
form; ``predict_recursive`` runs the recursion with a supplied Jacobian-vector product (measured on the network by
``tadq.analysis``). ``final_contributions`` splits the final error into each step's share. Clipping x_0 (a
scheduler's ``clip_sample``) makes the update non-linear, so predictions are then approximate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tadq.sampling import StepContext

__all__ = ["chain_factors", "final_contributions", "predict_j0", "predict_recursive"]


def _coefficients(steps: Sequence[StepContext]) -> tuple[Tensor, Tensor]:
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


def predict_recursive(errors: Tensor, steps: Sequence[StepContext],
                      jvp: Callable[[int, Tensor], Tensor] | None = None) -> Tensor:
    """δ_n by the recursion δ_{n+1} = A_n δ_n + B_n (e_n + J_n δ_n); ``jvp(n, δ)`` gives J_n δ (None: J = 0).

    Returns (S+1, N, ...) float64.
    """
    coef_x, coef_eps = _coefficients(steps)
    delta = torch.zeros_like(errors[0], dtype=torch.float64)
    states = [delta]
    for n in range(len(steps)):
        drive = errors[n].double()
        if jvp is not None:
            drive = drive + jvp(n, delta).double()
        delta = float(coef_x[n]) * delta + float(coef_eps[n]) * drive
        states.append(delta)
    return torch.stack(states)


def final_contributions(errors: Tensor, steps: Sequence[StepContext]) -> Tensor:
    """Mean squared size of each step's term in the J ≈ 0 final error, ‖(Π_{r>s} A_r) B_s e_s‖² / numel, (S,).

    The terms are not orthogonal, so they need not sum to the final MSE; they show which steps' errors dominate.
    """
    _, coef_eps = _coefficients(steps)
    factors = chain_factors(steps)[:, -1]  # (S,)
    scale = (factors * coef_eps).view(-1, *([1] * (errors.ndim - 1)))
    return (scale * errors.double()).square().flatten(1).mean(1)
