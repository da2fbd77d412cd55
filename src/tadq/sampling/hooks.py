"""The four places where a correction may act inside tadq's sampling loop.

Every hook defaults to the identity (docs/architecture.md, after diffusers' ``ModelHook``), so corrections that
touch different places stack, and a list of hooks is applied in list order at each place. Per step the loop runs

    x̃_t = before_model(x_t)          input / exposure-bias correction (TAC IBC); x̃_t is also the state the
                                        sampler update uses (TAC's [RECON] default, docs/methods/tac.md#ibc)
    ε   = after_model(denoiser(x̃_t, t), x̃_t)   noise-estimate correction (PTQD CNC/BC, TAC NER, TCEC)
    σ'  = noise_std(σ_t)               sampler variance (PTQD VSC)
    x_prev = after_step(step(x̃_t, ε, σ', z))   propagated-error correction (TCEC)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from tadq.sampling.context import StepContext

__all__ = [
    "HOOK_METHODS",
    "NoiseStd",
    "IdentityHooks",
    "SamplingHooks",
    "apply_after_model",
    "apply_after_step",
    "apply_before_model",
    "apply_noise_std",
    "check_hooks",
]

HOOK_METHODS: tuple[str, ...] = ("before_model", "after_model", "noise_std", "after_step")


@dataclass(frozen=True)
class NoiseStd:
    """A ``noise_std`` result that changes only the noise term of a DDIM step.

    A plain tensor σ' replaces σ_t in both the direction term √(1 − ᾱ_prev − σ²)·ε and the noise term σ·z
    (PTQD's full code); ``NoiseStd(noise=σ', direction=σ_t)`` keeps the direction term at ``direction``
    (PTQD's "key code" form). DDPM steps have no direction term and use ``noise`` only.
    """

    noise: Tensor
    direction: Tensor


@runtime_checkable
class SamplingHooks(Protocol):
    """What the sampling loop calls on each correction; see ``IdentityHooks`` for the meaning of each method."""

    def before_model(self, x: Tensor, step: StepContext) -> Tensor: ...

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor: ...

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor: ...

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor: ...


class IdentityHooks:
    """Base class with identity defaults: override only the hook points a correction uses."""

    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        """Correct the state x_t (B, C, H, W) before the denoiser sees it; the step also uses the result."""
        return x

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        """Correct the noise estimate ε (B, C, H, W); ``x`` is the model input it was predicted from."""
        return eps

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor:
        """Change the sampler's noise std σ_t (0-d tensor; may return (B, 1, 1, 1) for per-sample stds)."""
        return std

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor:
        """Correct the new state x_prev (B, C, H, W) after the sampler update."""
        return x_prev


def check_hooks(hooks: Sequence[object]) -> None:
    """Raise ``TypeError`` naming the missing methods when an object cannot act as ``SamplingHooks``."""
    for position, hook in enumerate(hooks):
        if not isinstance(hook, SamplingHooks):
            missing = [name for name in HOOK_METHODS if not callable(getattr(hook, name, None))]
            raise TypeError(
                f"hooks[{position}] ({type(hook).__name__}) lacks {missing}; subclass "
                "tadq.sampling.IdentityHooks to get identity defaults."
            )


def apply_before_model(hooks: Sequence[SamplingHooks], x: Tensor, step: StepContext) -> Tensor:
    """Apply every hook's ``before_model`` in order."""
    for hook in hooks:
        x = hook.before_model(x, step)
    return x


def apply_after_model(hooks: Sequence[SamplingHooks], eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
    """Apply every hook's ``after_model`` in order."""
    for hook in hooks:
        eps = hook.after_model(eps, x, step)
    return eps


def apply_noise_std(hooks: Sequence[SamplingHooks], std: Tensor, step: StepContext) -> Tensor | NoiseStd:
    """Apply every hook's ``noise_std`` in order.

    Each hook sees the current noise-term std; a ``NoiseStd`` returned by one hook fixes the direction-term std
    for the rest of the chain (later hooks may still change the noise term).
    """
    direction = None
    for hook in hooks:
        result = hook.noise_std(std, step)
        if isinstance(result, NoiseStd):
            direction = result.direction if direction is None else direction
            result = result.noise
        std = result
    return std if direction is None else NoiseStd(noise=std, direction=direction)


def apply_after_step(hooks: Sequence[SamplingHooks], x_prev: Tensor, step: StepContext) -> Tensor:
    """Apply every hook's ``after_step`` in order."""
    for hook in hooks:
        x_prev = hook.after_step(x_prev, step)
    return x_prev
