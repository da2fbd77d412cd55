"""How per-step noise-estimate error propagates through the sampler, in closed form (TCEC, docs/methods/tcec.md).

For the linear update x_prev = A_n x_n + B_n ε + σ_n z shared by the FP and the quantized run (same z), with
δ_n = x̂_n − x_n the state error and e_n = ε̂(x̂_n) − ε_θ(x̂_n) the network's own error at step n (grid order, n = 0
the noisiest):

    δ_{n+1} = (A_n + B_n J_n) δ_n + B_n e_n                      (exact up to O(δ²), J_n = ∂ε_θ/∂x at x_n)
    δ_N    = Σ_s [Π_{r=s+1}^{N-1} (A_r + B_r J_r)] B_s e_s       (closed form, δ_0 = 0)

With J ≈ 0 (the paper's approximation) the chain is the scalar product Π A_r. ``predict_j0`` evaluates the closed
form; ``predict_recursive`` runs the recursion with a supplied Jacobian-vector product (measured on the network by
``tadq.analysis``). ``final_contributions`` splits the final error into each step's share.

A multistep update (DPM-Solver++ 2M, ``StepContext.order == 2``) also reuses the previous step's state and ε through
x̂_0,before: x_prev = A_n x_n + B_n ε_n + C_n x_{n-1} + D_n ε_{n-1} (C_n = ``coef_prev_x``, D_n = ``coef_prev_eps``,
both 0 on one-step kinds), and the recursion becomes second order:

    δ_{n+1} = (A_n + B_n J_n) δ_n + B_n e_n + (C_n + D_n J_{n-1}) δ_{n-1} + D_n e_{n-1}

With J ≈ 0 it is a first-order chain over the stacked state (δ_n, δ_{n-1}) with transition [[A_n, C_n], [1, 0]]; an
error e_s then enters twice (B_s into δ_{s+1}, D_{s+1} into δ_{s+2}), so its weight on δ_n is
Φ[s, n] B_s + Φ[s+1, n] D_{s+1}, Φ[r, n] the response of δ_n to a unit error put into δ_{r+1} by step r
(``chain_factors``; Π A on one-step kinds). Every function accepts such steps; on one-step plans they compute
exactly what they did before (docs/methods/tcec.md#propagation-per-sampler).

Clipping x_0 (a scheduler's ``clip_sample``) changes the update element by element: where x̂_0 is clipped, DDIM's
x_prev = √ᾱ_prev·(±r) + √(1−ᾱ_prev−σ²)·ε no longer depends on x and passes ε with the direction coefficient instead
of B (≈ 4.6× larger at the first DDIM-50 step of a linear schedule). ``clip_aware_coefficients`` gives these
per-element (A, B) from the FP trajectory; every function takes them in place of the scalar ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tadq.device import wide_dtype
from tadq.sampling import StepContext

__all__ = ["Coefficients", "chain_factors", "clip_aware_coefficients", "error_weights", "final_contributions",
           "is_multistep", "predict_j0", "predict_recursive", "step_coefficients"]

# per step (A_n, B_n), or (A_n, B_n, C_n, D_n) for a multistep update; scalars or per element. A pair takes C_n, D_n
# from the step (coef_prev_x, coef_prev_eps).
Coefficients = Sequence[tuple[Tensor | float, ...]]


def clip_aware_coefficients(steps: Sequence[StepContext], states: Tensor, eps: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per-element (A_n, B_n) of the update linearised at (x_n, ε_n) of a trajectory, x_0 clipping included.

    Args:
        steps: The sampler steps.
        states: x_n per step, (S or S+1, N, C, H, W) (the last state is not used).
        eps: ε_n the trajectory used, (S, N, C, H, W).

    Returns:
        One (A, B) pair of float64 tensors (N, C, H, W) per step; a multistep step's C, D come from the step (the
        multistep kinds never clip x_0, so they are scalars).
    """
    return [step_coefficients(step, states[n], eps[n]) for n, step in enumerate(steps)]


def step_coefficients(step: StepContext, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Per-element (A, B) of one update linearised at (x, ε), x_0 clipping included (float64, or float32 on MPS
    (``wide_dtype``), shaped like x)."""
    wide = wide_dtype(x.device)
    x, e = x.to(wide), eps.to(wide)
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


def is_multistep(steps: Sequence[StepContext]) -> bool:
    """Whether some step also uses the previous step's state and ε (dpmsolver++ 2M): the second-order recursion."""
    return any(step.order > 1 for step in steps)


def _coefficients(steps: Sequence[StepContext]) -> tuple[Tensor, Tensor]:
    coef_x = torch.tensor([step.coef_x for step in steps], dtype=torch.float64)
    coef_eps = torch.tensor([step.coef_eps for step in steps], dtype=torch.float64)
    return coef_x, coef_eps


def chain_factors(steps: Sequence[StepContext]) -> Tensor:
    """Φ[s, n]: how a unit error that step s puts into δ_{s+1} reaches δ_n under J ≈ 0 (0 for n ≤ s).

    One-step kinds: Π_{r=s+1}^{n-1} A_r. Multistep: Φ[s, s+1] = 1, Φ[s, n+1] = A_n Φ[s, n] + C_n Φ[s, n-1], the
    first row of the stacked chain Π [[A_r, C_r], [1, 0]]. Returns (S, S+1) float64.
    """
    count = len(steps)
    factors = torch.zeros(count, count + 1, dtype=torch.float64)
    if is_multistep(steps):
        for s in range(count):
            factors[s, s + 1] = 1.0
            for n in range(s + 1, count):
                factors[s, n + 1] = steps[n].coef_x * factors[s, n] + steps[n].coef_prev_x * factors[s, n - 1]
        return factors
    coef_x, _ = _coefficients(steps)
    for s in range(count):
        running = 1.0
        for n in range(s + 1, count + 1):
            factors[s, n] = running
            if n < count:
                running *= float(coef_x[n])
    return factors


def error_weights(steps: Sequence[StepContext]) -> Tensor:
    """W[s, n]: the weight of e_s in δ_n under J ≈ 0, Φ[s, n] B_s + Φ[s+1, n] D_{s+1} ((S, S+1) float64).

    The second term is the multistep update reusing ε_s one step later (0 on one-step kinds).
    """
    factors = chain_factors(steps)
    _, coef_eps = _coefficients(steps)
    weights = factors * coef_eps.view(-1, 1)
    for s in range(len(steps) - 1):
        weights[s] += factors[s + 1] * steps[s + 1].coef_prev_eps
    return weights


def predict_j0(errors: Tensor, steps: Sequence[StepContext]) -> Tensor:
    """δ_n for every n by the J ≈ 0 closed form: Σ_{s<n} (Π_{r=s+1}^{n-1} A_r) B_s e_s, or Σ_s W[s, n] e_s with
    ``error_weights`` on a multistep plan.

    Args:
        errors: e_s per step, (S, N, ...).
        steps: The sampler steps.

    Returns:
        (S+1, N, ...) float64, δ_0 = 0.
    """
    if errors.shape[0] != len(steps):
        raise ValueError(f"errors has {errors.shape[0]} steps, the sampler {len(steps)}")
    if is_multistep(steps):
        return torch.einsum("sn,s...->n...", error_weights(steps), errors.double())
    _, coef_eps = _coefficients(steps)
    weighted = errors.double() * coef_eps.view(-1, *([1] * (errors.ndim - 1)))  # B_s e_s
    factors = chain_factors(steps)  # (S, S+1)
    return torch.einsum("sn,s...->n...", factors, weighted)


def _scalar_pairs(steps: Sequence[StepContext]) -> list[tuple[float, float]]:
    return [(step.coef_x, step.coef_eps) for step in steps]


def _quadruples(steps: Sequence[StepContext], coefficients: Coefficients | None
                ) -> list[tuple[Tensor | float, Tensor | float, Tensor | float, Tensor | float]]:
    """(A_n, B_n, C_n, D_n) per step: the given ones, a given pair completed with the step's C_n and D_n."""
    given = _scalar_pairs(steps) if coefficients is None else coefficients
    if len(given) != len(steps):
        raise ValueError(f"{len(given)} coefficient tuples for {len(steps)} steps")
    quads = []
    for step, entry in zip(steps, given, strict=True):
        if len(entry) == 4:
            quads.append(tuple(entry))
        elif len(entry) == 2:
            quads.append((entry[0], entry[1], step.coef_prev_x, step.coef_prev_eps))
        else:
            raise ValueError(f"coefficients per step are (A, B) or (A, B, C, D), got {len(entry)} values")
    return quads  # type: ignore[return-value]


def predict_recursive(errors: Tensor, steps: Sequence[StepContext],
                      jvp: Callable[[int, Tensor], Tensor] | None = None,
                      coefficients: Coefficients | None = None) -> Tensor:
    """δ_n by the recursion δ_{n+1} = A_n δ_n + B_n (e_n + J_n δ_n); ``jvp(n, δ)`` gives J_n δ (None: J = 0).

    On a multistep plan also + C_n δ_{n-1} + D_n (e_{n-1} + J_{n-1} δ_{n-1}): the previous step's ε as the update
    reuses it. ``coefficients``: per-step (A_n, B_n) (or (A, B, C, D)), e.g. ``clip_aware_coefficients``; default the
    sampler's scalars. Returns (S+1, N, ...) float64.
    """
    if is_multistep(steps) or (coefficients is not None and any(len(entry) == 4 for entry in coefficients)):
        return _predict_second_order(errors, steps, jvp, _quadruples(steps, coefficients))
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


def _predict_second_order(errors: Tensor, steps: Sequence[StepContext], jvp: Callable[[int, Tensor], Tensor] | None,
                          quads: list) -> Tensor:
    """The multistep recursion; ``drive`` is the ε error e_n + J_n δ_n, kept because step n+1 reuses it."""
    delta = torch.zeros_like(errors[0], dtype=torch.float64)
    delta_before, drive_before = torch.zeros_like(delta), torch.zeros_like(delta)
    states = [delta]
    for n in range(len(steps)):
        drive = errors[n].double()
        if jvp is not None:
            drive = drive + jvp(n, delta).double()
        coef_x, coef_eps, prev_x, prev_eps = quads[n]
        delta, delta_before = (coef_x * delta + coef_eps * drive + prev_x * delta_before + prev_eps * drive_before,
                               delta)
        drive_before = drive
        states.append(delta)
    return torch.stack(states)


def final_contributions(errors: Tensor, steps: Sequence[StepContext],
                        coefficients: Coefficients | None = None) -> Tensor:
    """Mean squared size of each step's term in the J ≈ 0 final error, ‖W[s, S] e_s‖² / numel, (S,); W[s, S] is
    (Π_{r>s} A_r) B_s on one-step kinds (``error_weights``).

    The terms are not orthogonal, so they need not sum to the final MSE; they show which steps' errors dominate.
    ``coefficients`` as in ``predict_recursive``.
    """
    if is_multistep(steps) or (coefficients is not None and any(len(entry) == 4 for entry in coefficients)):
        return _second_order_contributions(errors, steps, _quadruples(steps, coefficients))
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


def _second_order_contributions(errors: Tensor, steps: Sequence[StepContext], quads: list) -> Tensor:
    """Shares on a multistep plan, per element: the final row Φ[·, S] by the adjoint of the stacked chain.

    g_S = (1, 0) and g_n = g_{n+1} [[A_n, C_n], [1, 0]]; Φ[r, S] = g_{r+1}[0], so W[s, S] = Φ[s, S] B_s
    + Φ[s+1, S] D_{s+1}.
    """
    count = len(steps)
    first = torch.ones_like(errors[0], dtype=torch.float64)  # g_{n+1}[0]
    second = torch.zeros_like(first)  # g_{n+1}[1]
    reach: list[Tensor] = [first] * count  # Φ[n, S]
    for n in reversed(range(count)):
        reach[n] = first
        coef_x, _, prev_x, _ = quads[n]
        first, second = first * coef_x + second, first * prev_x
    shares = []
    for s in range(count):
        weight = reach[s] * quads[s][1]
        if s + 1 < count:
            weight = weight + reach[s + 1] * quads[s + 1][3]
        shares.append((weight * errors[s].double()).square().mean())
    return torch.stack(shares)
