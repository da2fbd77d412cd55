"""Per-step divergence between a full-precision and a quantized sampling trajectory.

Quantization error is not constant over the denoising process: it enters at every step and is either damped or
amplified by later steps. Comparing x_t of both runs (same noise) at every step shows where it grows, which is what
timestep-aware corrections target.

States are stacked as (S + 1, N, C, H, W): the initial noise x_T followed by the state after each of S steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["as_state_stack", "per_step_cosine", "per_step_mse"]


def _check_states(fp_states: Tensor, q_states: Tensor) -> None:
    if fp_states.shape != q_states.shape:
        raise ValueError(f"fp_states and q_states must have equal shapes, got {tuple(fp_states.shape)} and "
                         f"{tuple(q_states.shape)}")
    if fp_states.ndim < 3:
        raise ValueError(f"states must be (S + 1, N, ...) with a feature axis, got {tuple(fp_states.shape)}")


def per_step_mse(fp_states: Tensor, q_states: Tensor) -> Tensor:
    """MSE (S + 1,) between full-precision and quantized x_t at each step, averaged over samples and pixels.

    Computed in float64 so tiny early-step differences are not lost to round-off.
    """
    _check_states(fp_states, q_states)
    diff = fp_states.detach().double() - q_states.detach().double()
    return diff.square().flatten(start_dim=1).mean(dim=1)


def per_step_cosine(fp_states: Tensor, q_states: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity (S + 1,) of each sample's flattened x_t between the two runs, averaged over samples.

    Scale-free companion to ``per_step_mse``: x_t shrinks in norm as noise is removed, so a constant MSE can hide a
    growing relative error. ``eps`` guards all-zero states (their cosine is reported as 0).
    """
    _check_states(fp_states, q_states)
    fp = fp_states.detach().double().flatten(start_dim=2)
    q = q_states.detach().double().flatten(start_dim=2)
    return F.cosine_similarity(fp, q, dim=2, eps=eps).mean(dim=1)


def as_state_stack(states: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Stack a list of S + 1 states (N, C, H, W), as a sampler loop collects them, into (S + 1, N, C, H, W)."""
    if len(states) == 0:
        raise ValueError("states is empty")
    return torch.stack([state.detach() for state in states])
