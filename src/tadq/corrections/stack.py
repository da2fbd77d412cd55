"""``CorrectionStack``: corrections applied, fitted and saved in one order (docs/methods/composition.md).

Output correctors all estimate "quantized output → FP output" maps, so two of them double-correct unless the later
one is fitted on the output of the earlier one. ``fit_stack`` therefore fits correction i on a trajectory pair
collected with corrections 0..i-1 active, the order in which the sampling loop applies them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tadq.config import config_from_dict, config_to_dict
from tadq.corrections.base import Correction
from tadq.corrections.context import FitContext
from tadq.corrections.pair import collect_trajectory_pair
from tadq.corrections.sequential import SequentialCorrection, choose_candidate, fit_sequentially
from tadq.registry import correction_for
from tadq.sampling import IdentityHooks, NoiseStd, StepContext
from tadq.sampling.hooks import apply_after_model, apply_after_step, apply_before_model, apply_noise_std

__all__ = ["CorrectionStack", "fit_stack"]

logger = logging.getLogger(__name__)


class CorrectionStack(nn.Module, IdentityHooks):
    """Corrections in the order they act; itself a ``SamplingHooks`` applying its members in order.

    Args:
        corrections: The members, first applied first.
    """

    def __init__(self, corrections: Sequence[Correction] = ()) -> None:
        super().__init__()
        for position, correction in enumerate(corrections):
            if not isinstance(correction, Correction):
                raise TypeError(f"corrections[{position}] is a {type(correction).__name__}, not a Correction")
        self.members = nn.ModuleList(corrections)

    def __iter__(self) -> Iterator[Correction]:
        return iter(self.members)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, index: int) -> Correction:
        return self.members[index]  # type: ignore[return-value]

    def append(self, correction: Correction) -> CorrectionStack:
        """Add a correction that acts after the current members."""
        if not isinstance(correction, Correction):
            raise TypeError(f"can only append a Correction, got {type(correction).__name__}")
        self.members.append(correction)
        return self

    # -- (de)serialisation ------------------------------------------------------------------------------------------
    def configs(self) -> list[dict[str, Any]]:
        """The members' configs as ``config_to_dict`` payloads, in order (for ``tadq_config.json``)."""
        return [config_to_dict(member.config) for member in self]

    @classmethod
    def from_configs(cls, payloads: Sequence[dict[str, Any]]) -> CorrectionStack:
        """Fresh, unfitted members rebuilt through the registries; load a ``state_dict`` next."""
        return cls([correction_for(config_from_dict(payload)) for payload in payloads])

    def check_plan(self, steps: Sequence[StepContext]) -> None:
        """Every member's ``check_plan``: the whole grid checked before the first step runs."""
        for member in self:
            member.check_plan(steps)

    def check_model(self, bits: str, guidance_scale: float | None = None) -> None:
        """Raise ``ValueError`` if a member was fitted for another bit label or guidance scale."""
        for member in self:
            member.check_model(bits, guidance_scale)

    # -- hooks ------------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, adapter: Any) -> nn.Module:
        """Apply every member's structural ``prepare`` in order."""
        for member in self:
            model = member.prepare(model, adapter)
        return model

    # The sampling loop's own chaining, so a stack behaves exactly like its members passed as hooks
    # (including a member's NoiseStd result).
    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        return apply_before_model(list(self), x, step)

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        return apply_after_model(list(self), eps, x, step)

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor | NoiseStd:
        return apply_noise_std(list(self), std, step)

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor:
        return apply_after_step(list(self), x_prev, step)


def _check_condition_rows(stack: CorrectionStack, ctx: FitContext, num_samples: int | None, start: int) -> None:
    """Refuse, before any fit, a finite condition list (``ConditioningList``) with fewer rows than the fits and
    their held-out scores sample: it failed at the first batch past its end, after the walks before it had run."""
    check_indices = getattr(ctx.conditions, "check_indices", None)
    if check_indices is None:
        return
    needed = 0
    for member in tuple(stack)[start:]:
        request = member.pair_request()
        if request is None:
            continue
        needed = max(needed, request.num_samples if num_samples is None else num_samples)
        if len(member.candidates()) > 1:
            needed = max(needed, member.selection_noise()[1])
    if needed:
        try:
            check_indices(range(needed))
        except ValueError as error:
            raise ValueError(f"the correction fits walk {needed} samples (the configs' num_samples and "
                             f"selection_samples): {error}") from error


def fit_stack(
    stack: CorrectionStack,
    ctx: FitContext,
    *,
    num_samples: int | None = None,
    seed: int | None = None,
    start: int = 0,
) -> CorrectionStack:
    """Fit members ``start..`` in application order, each on a pair collected with the members before it active.

    Args:
        stack: The stack to fit in place (members before ``start`` must already be fitted).
        ctx: The FP and quantized (uncorrected) networks, the deployment plan (sampler, guidance), shape, bit
            label, conditions and batching.
        num_samples: Trajectories per pair; ``None`` uses each member's ``config.num_samples``.
        seed: Noise seed of every pair; ``None`` uses each member's ``config.seed`` (a calibration seed).
        start: First member to fit.

    Returns:
        ``stack``, fitted.
    """
    if not 0 <= start <= len(stack):
        raise ValueError(f"start={start} must lie in [0, {len(stack)}]")
    for member in tuple(stack)[:start]:  # the fitted members act in every walk: their tables must fit the whole plan
        member.check_plan(ctx.plan.steps)  # (a grid that differs at a late step was refused there, mid-walk)
    for member in tuple(stack)[start:]:  # every member refuses an unfittable plan before any member's fit runs
        member.check_fittable(ctx.plan.steps)
    _check_condition_rows(stack, ctx, num_samples, start)
    for index in range(start, len(stack)):
        member = stack[index]
        request = member.pair_request()
        if request is None:
            continue
        samples = request.num_samples if num_samples is None else num_samples
        pair_seed = request.seed if seed is None else seed
        earlier = tuple(stack)[:index]
        if isinstance(member, SequentialCorrection) and member.config.sequential:
            selection_seed, selection_samples = member.selection_noise()
            member.selection_records = fit_sequentially(
                member, ctx, hooks=earlier, num_samples=samples, seed=pair_seed, selection_seed=selection_seed,
                selection_samples=selection_samples)
            logger.info("fitted %s (%d of %d) sequentially", type(member).__name__, index + 1, len(stack))
            continue
        pair = collect_trajectory_pair(ctx, mode=request.mode, hooks=earlier, num_samples=samples, seed=pair_seed)
        with torch.no_grad():
            member.fit(pair)
        del pair
        logger.info("fitted %s (%d of %d) on a %s pair", type(member).__name__, index + 1, len(stack), request.mode)
        if len(member.candidates()) > 1:  # settings over the fitted tables, chosen on held-out noise
            selection_seed, selection_samples = member.selection_noise()
            member.selection_records = choose_candidate(member, ctx, hooks=earlier, seed=pair_seed,
                                                        selection_seed=selection_seed,
                                                        selection_samples=selection_samples)
    return stack
