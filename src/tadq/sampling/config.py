"""Which sampler tadq runs, and how to build the matching diffusers scheduler.

Corrections fit per-step tables that are only valid for one (sampler, number of steps, eta) grid
(docs/methods/composition.md#table-keys), so the sampler is a typed, frozen config with a stable ``key``
that those tables are stored under.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin

__all__ = ["PREDICTION_TYPES", "SAMPLER_KINDS", "SUPPORTED_SCHEDULERS", "SamplerConfig", "check_drivable",
           "make_scheduler"]

SamplerKind = Literal["ddim", "ddpm"]
SAMPLER_KINDS: tuple[str, ...] = ("ddim", "ddpm")

_SCHEDULER_CLASSES: dict[str, type[DDIMScheduler] | type[DDPMScheduler]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
}
# Training schedulers whose config tadq's DDIM/DDPM steps reproduce (a discrete ᾱ_t schedule). Everything else
# (DPM-Solver, Euler, Heun, PNDM, LMS, UniPC, flow matching, score SDEs...) is refused by name: sampling it with
# DDIM/DDPM steps would silently change the sampler, or, for flow matching and score SDEs, the maths.
SUPPORTED_SCHEDULERS: tuple[str, ...] = ("DDPMScheduler", "DDIMScheduler")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
# Config keys that only schedulers tadq cannot drive have: a bare config mapping carrying one is refused.
_FOREIGN_KEYS: tuple[str, ...] = (
    "solver_order", "algorithm_type", "solver_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "shift", "use_dynamic_shifting", "sigma_min", "sigma_max", "snr", "skip_prk_steps",
    "predict_x0", "lower_order_final", "interpolation_type",
)


@dataclass(frozen=True)
class SamplerConfig:
    """The deployment sampler: kind, grid size and stochasticity.

    Args:
        kind: ``"ddim"`` (Song et al. 2021, eq. 12) or ``"ddpm"`` (Ho et al. 2020, ancestral sampling).
        num_steps: Number S of sampler steps on the training grid of ``num_train_timesteps``.
        eta: DDIM's noise weight: 0 gives the deterministic sampler, 1 the DDPM-like variance
            (DDIM eq. 16). Must be 0 for ``"ddpm"``, whose variance is fixed by the scheduler's ``variance_type``.
        clip_sample: Whether the predicted x_0 is clipped to ``[-clip_sample_range, clip_sample_range]``;
            ``None`` keeps the value in the model's scheduler config.
    """

    kind: SamplerKind
    num_steps: int = 50
    eta: float = 0.0
    clip_sample: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"SamplerConfig.kind={self.kind!r} is not supported; accepted values: {SAMPLER_KINDS}.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps must be a positive int, got {self.num_steps!r}.")
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)) or not math.isfinite(self.eta):
            raise ValueError(f"SamplerConfig.eta must be a finite float in [0, 1], got {self.eta!r}.")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"SamplerConfig.eta must lie in [0, 1] (0 = deterministic DDIM), got {self.eta}.")
        if self.kind == "ddpm" and self.eta != 0.0:
            raise ValueError(
                f"SamplerConfig.eta={self.eta} only applies to kind='ddim'; DDPM's noise is set by the scheduler's "
                "variance_type. Use eta=0.0 with kind='ddpm', or kind='ddim' with eta=1.0 for DDPM-like noise."
            )
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise ValueError(f"SamplerConfig.clip_sample must be True, False or None, got {self.clip_sample!r}.")
        object.__setattr__(self, "eta", float(self.eta))

    @property
    def key(self) -> str:
        """Stable name of this sampling grid, e.g. ``"ddim-50-eta0.0"`` or ``"ddpm-1000"``.

        Per-step correction tables are stored under this key so that loading them for another grid fails
        loudly instead of silently reading the wrong step (PTQD pitfall 1, docs/methods/ptqd.md#pitfalls).
        """
        if self.kind == "ddim":
            return f"ddim-{self.num_steps}-eta{self.eta}"
        return f"ddpm-{self.num_steps}"


def make_scheduler(
    train_scheduler_or_config: ConfigMixin | Mapping[str, Any], sampler: SamplerConfig
) -> DDIMScheduler | DDPMScheduler:
    """Build the diffusers scheduler for ``sampler`` from the model's training-scheduler config.

    The beta schedule, prediction type and timestep spacing come from the model's own scheduler, so a DDPM-trained
    model sampled with DDIM keeps its noise schedule. Keys one scheduler class does not know (e.g. DDPM's
    ``variance_type`` for DDIM) are ignored by diffusers; ones it lacks take diffusers' defaults (DDIM's
    ``set_alpha_to_one=True`` when starting from a DDPM config).

    Args:
        train_scheduler_or_config: A diffusers scheduler, or its ``config`` mapping.
        sampler: The sampler to configure.

    Returns:
        A fresh ``DDIMScheduler`` or ``DDPMScheduler`` with ``set_timesteps(sampler.num_steps)`` already called.

    Raises:
        NotImplementedError: The training scheduler is not a DDPM/DDIM one (``check_drivable``).
    """
    if isinstance(train_scheduler_or_config, ConfigMixin):
        config: Mapping[str, Any] = train_scheduler_or_config.config
        check_drivable(type(train_scheduler_or_config).__name__, config)
    elif isinstance(train_scheduler_or_config, Mapping):
        config = train_scheduler_or_config
        check_drivable(config.get("_class_name"), config)
    else:
        raise TypeError(
            "make_scheduler expects a diffusers scheduler or its config mapping, "
            f"got {type(train_scheduler_or_config).__name__}."
        )
    overrides: dict[str, Any] = {}
    if sampler.clip_sample is not None:
        overrides["clip_sample"] = sampler.clip_sample
    scheduler = _SCHEDULER_CLASSES[sampler.kind].from_config(dict(config), **overrides)
    scheduler.set_timesteps(sampler.num_steps)
    return scheduler


def check_drivable(class_name: str | None, config: Mapping[str, Any]) -> None:
    """Raise ``NotImplementedError`` naming the scheduler class (or config keys) tadq's DDIM/DDPM cannot drive.

    ``class_name`` is the scheduler's class (``_class_name`` of a saved config); a bare mapping without one is
    accepted only without the keys that mark another scheduler family.
    """
    supported = f"tadq samples with DDIM or DDPM steps from a {' or '.join(SUPPORTED_SCHEDULERS)} training config"
    if class_name is not None and class_name not in SUPPORTED_SCHEDULERS:
        family = ("flow matching" if "FlowMatch" in class_name else
                  "a score SDE" if "ScoreSde" in class_name else "another sampler")
        raise NotImplementedError(
            f"scheduler class {class_name} ({family}) cannot be driven by tadq: {supported}. It is refused rather "
            "than silently replaced by DDPM/DDIM; flow-matching and score-SDE models are not supported yet.")
    foreign = sorted(key for key in config if key in _FOREIGN_KEYS)
    if class_name is None and foreign:
        raise NotImplementedError(f"the scheduler config has {foreign}, keys of a scheduler tadq cannot drive; "
                                  f"{supported}.")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise NotImplementedError(f"prediction_type={prediction!r} is not supported; tadq converts "
                                  f"{PREDICTION_TYPES} to ε (flow-matching 'flow_prediction' is not supported yet).")
