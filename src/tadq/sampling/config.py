"""Which sampler tadq runs, and how to build the matching diffusers scheduler.

Corrections fit per-step tables that are only valid for one (sampler, number of steps, eta) grid
(docs/methods/composition.md#table-keys), so the sampler is a typed, frozen config with a stable ``key``
that those tables are stored under.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.configuration_utils import ConfigMixin

from tadq.names import SAMPLER_KINDS, check_eta
from tadq.safefiles import finite_float

__all__ = ["DEFAULT_SAMPLER_KINDS", "DISCRETE_SCHEDULERS", "FLOW_KINDS", "FLOW_PREDICTION", "FLOW_SCHEDULERS",
           "PREDICTION_TYPES", "SAMPLER_KINDS", "SUPPORTED_SCHEDULERS", "SamplerConfig", "check_drivable",
           "check_sampler_pairing",
           "command_sampler_kind", "default_sampler", "make_scheduler", "scheduler_config_key", "walk_differences",
           "DEFAULTED_KEYS"]

SamplerKind = Literal["ddim", "ddpm", "euler", "euler-ancestral", "dpmsolver++", "flow-euler"]
# Kinds that integrate the flow-matching ODE x_t = (1-σ) x_0 + σ ε on a velocity v = ε - x_0; every other kind
# works on the discrete ᾱ_t (variance-preserving) schedule with ε.
FLOW_KINDS: tuple[str, ...] = ("flow-euler",)
# flow-euler grids besides the scheduler's own (SamplerConfig.flow_sigmas)
FLOW_SIGMA_GRIDS: tuple[str, ...] = ("uniform",)
FLOW_PREDICTION = "flow_prediction"

_SCHEDULER_CLASSES: dict[str, type[ConfigMixin]] = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "flow-euler": FlowMatchEulerDiscreteScheduler,
}
# Training schedulers whose config is a discrete ᾱ_t schedule (betas over num_train_timesteps) that every ε kind
# (ddim, ddpm, euler, euler-ancestral, dpmsolver++) can be built on: the class only names the sampler it ships with.
DISCRETE_SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler", "PNDMScheduler", "LMSDiscreteScheduler",
)
# Training schedulers of a rectified-flow / flow-matching model (velocity prediction): only FLOW_KINDS drive them.
FLOW_SCHEDULERS: tuple[str, ...] = ("FlowMatchEulerDiscreteScheduler",)
SUPPORTED_SCHEDULERS: tuple[str, ...] = DISCRETE_SCHEDULERS + FLOW_SCHEDULERS
# The sampler a folder ships with, per training class; a class absent here (PNDM, LMS) has no
# tadq sampler of its own, so the user names one (``default_sampler`` refuses rather than picking another).
DEFAULT_SAMPLER_KINDS: dict[str, str] = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler-ancestral", "DPMSolverMultistepScheduler": "dpmsolver++",
    "FlowMatchEulerDiscreteScheduler": "flow-euler",
}
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
# Config keys that only schedulers tadq cannot drive have: a bare config mapping carrying one is refused.
_FOREIGN_KEYS: tuple[str, ...] = (
    "solver_order", "algorithm_type", "solver_type", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "shift", "use_dynamic_shifting", "sigma_min", "sigma_max", "snr", "skip_prk_steps",
    "predict_x0", "lower_order_final", "interpolation_type",
)

# Types of the scheduler config keys tadq's steps (or the diffusers class it builds) read; a saved config with a
# value of another type (``"clip_sample": "yes"``, ``"num_train_timesteps": "1000"``) is refused naming the key,
# instead of being read by truthiness or failing inside torch.linspace. ``None`` is accepted (diffusers' default).
_BOOL_KEYS: tuple[str, ...] = (
    "clip_sample", "set_alpha_to_one", "thresholding", "rescale_betas_zero_snr", "use_karras_sigmas",
    "use_exponential_sigmas", "use_beta_sigmas", "lower_order_final", "euler_at_final", "use_dynamic_shifting",
    "stochastic_sampling", "invert_sigmas", "use_flow_sigmas", "use_lu_lambdas", "skip_prk_steps",
)
_NUMBER_KEYS: tuple[str, ...] = ("beta_start", "beta_end", "clip_sample_range", "sample_max_value", "shift")
_STRING_KEYS: tuple[str, ...] = ("beta_schedule", "timestep_spacing", "variance_type", "algorithm_type",
                                 "solver_type", "final_sigmas_type", "timestep_type", "interpolation_type")


def _check_config_types(config: Mapping[str, Any]) -> None:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    wrong = []
    for key, value in config.items():
        if value is None:
            continue
        if key == "num_train_timesteps":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        elif key == "steps_offset":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        elif key in _BOOL_KEYS:
            ok = isinstance(value, bool)
        elif key in _NUMBER_KEYS:
            ok = number(value) and math.isfinite(value)
        elif key in _STRING_KEYS:
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            wrong.append(f"{key}={value!r}")
    if wrong:
        raise ValueError(f"the scheduler config has values of the wrong type: {', '.join(wrong)} (num_train_timesteps "
                         "and steps_offset are ints, flags true/false, betas and ranges numbers, the others strings); "
                         "fix scheduler_config.json")
    _check_trained_betas(config)


def _check_trained_betas(config: Mapping[str, Any]) -> None:
    """``trained_betas`` (the schedule itself, replacing beta_start/beta_end) is a list of one β in (0, 1) per
    training step: a string failed inside ``torch.tensor`` while building the scheduler, and a list shorter than
    ``num_train_timesteps`` was indexed past its end at the first late timestep."""
    betas = config.get("trained_betas")
    if betas is None:
        return
    steps = config.get("num_train_timesteps", 1000)
    try:  # a JSON list, or the numpy array of a scheduler built in Python
        values = None if isinstance(betas, (str, bytes, bool)) else torch.as_tensor(betas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is None or values.ndim != 1 or not len(values) or not bool(((values > 0) & (values < 1)).all()):
        raise ValueError(f"the scheduler config's trained_betas must be a list of numbers in (0, 1), one per training "
                         f"step, or null; got {str(betas)[:80]}: fix scheduler_config.json")
    if len(values) != steps:
        raise ValueError(f"the scheduler config's trained_betas holds {len(values)} betas, but num_train_timesteps "
                         f"is {steps}: one beta per training step; fix scheduler_config.json")


@dataclass(frozen=True)
class SamplerConfig:
    """The deployment sampler: kind, grid size and stochasticity.

    Args:
        kind: ``"ddim"`` (Song et al. 2021, eq. 12), ``"ddpm"`` (Ho et al. 2020, ancestral sampling), ``"euler"``
            (Karras et al. 2022 Euler on σ = √((1-ᾱ)/ᾱ), as ``EulerDiscreteScheduler``), ``"euler-ancestral"``
            (the same with ancestral noise, as ``EulerAncestralDiscreteScheduler``), ``"dpmsolver++"``
            (Lu et al. 2022 multistep, as ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``) or
            ``"flow-euler"`` (rectified flow, x' = x + (σ' - σ) v, as ``FlowMatchEulerDiscreteScheduler``).
        num_steps: Number S of sampler steps on the training grid of ``num_train_timesteps``.
        eta: DDIM's noise weight: 0 gives the deterministic sampler, 1 the DDPM-like variance
            (DDIM eq. 16). Must be 0 for every other kind (DDPM's variance is the scheduler's ``variance_type``,
            euler-ancestral's is σ_up; euler, dpmsolver++ and flow-euler are deterministic ODE solvers).
        clip_sample: Whether the predicted x_0 is clipped to ``[-clip_sample_range, clip_sample_range]``;
            ``None`` keeps the value in the model's scheduler config. DDIM/DDPM only.
        order: DPM-Solver++'s order, 1 (≡ DDIM on its grid) or 2 (2M, uses the previous step's x̂_0);
            ``None``: 2 for ``"dpmsolver++"``. Other kinds are first order and take ``None`` (or 1).
        shift: flow-euler's timestep shift σ ↦ sσ/(1 + (s-1)σ); ``None`` keeps the model's scheduler config.
        flow_sigmas: flow-euler's grid before the shift: ``None``, the scheduler's own ``set_timesteps(S)``
            (σ from 1 to the scheduler's σ_min, the grid ``StableDiffusion3Pipeline`` uses); ``"uniform"``,
            σ = 1, 1 − 1/S, ..., 1/S (``FluxPipeline``'s ``np.linspace(1, 1/S, S)``).
    """

    kind: SamplerKind
    num_steps: int = 50
    eta: float = 0.0
    clip_sample: bool | None = None
    order: int | None = None
    shift: float | None = None
    flow_sigmas: str | None = None

    # written to JSON only when set, so every payload and key of a sampler without it is what it was before it
    # existed (tadq.config.config_to_dict)
    written_when_set = ("flow_sigmas",)

    def __post_init__(self) -> None:
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"SamplerConfig.kind={self.kind!r} is not supported; accepted values: {SAMPLER_KINDS}.")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps must be a positive int, got {self.num_steps!r}.")
        check_eta(self.eta, self.kind)
        if self.clip_sample is not None and not isinstance(self.clip_sample, bool):
            raise ValueError(f"SamplerConfig.clip_sample must be True, False or None, got {self.clip_sample!r}.")
        if self.clip_sample and self.kind not in ("ddim", "ddpm"):
            raise ValueError(f"SamplerConfig.clip_sample=True only applies to ddim/ddpm; {self.kind} never clips x_0.")
        self._check_order()
        self._check_shift()
        if self.flow_sigmas is not None:
            if self.flow_sigmas not in FLOW_SIGMA_GRIDS:
                raise ValueError(f"SamplerConfig.flow_sigmas={self.flow_sigmas!r}; accepted: None (the scheduler's "
                                 f"grid) or one of {FLOW_SIGMA_GRIDS}.")
            if self.kind not in FLOW_KINDS:
                raise ValueError(f"SamplerConfig.flow_sigmas only applies to {FLOW_KINDS}, not {self.kind!r}.")
        object.__setattr__(self, "eta", float(self.eta))

    def _check_order(self) -> None:
        order = self.order
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise ValueError(f"SamplerConfig.order must be an int or None, got {order!r}.")
        if self.kind == "dpmsolver++":
            if order not in (None, 1, 2):
                raise ValueError(f"SamplerConfig.order={order} for dpmsolver++: tadq implements orders 1 and 2.")
            object.__setattr__(self, "order", 2 if order is None else order)
        elif order not in (None, 1):
            raise ValueError(f"SamplerConfig.order={order}: {self.kind} is a first-order sampler (order only "
                             "applies to dpmsolver++).")
        else:
            object.__setattr__(self, "order", None)  # one spelling of "first order", so equal configs compare equal

    def _check_shift(self) -> None:
        if self.shift is None:
            return
        if self.kind not in FLOW_KINDS:
            raise ValueError(f"SamplerConfig.shift only applies to {FLOW_KINDS}, not {self.kind!r}.")
        if not finite_float(self.shift) \
                or self.shift <= 0:
            raise ValueError(f"SamplerConfig.shift must be a finite float > 0, got {self.shift!r}.")
        object.__setattr__(self, "shift", float(self.shift))

    @property
    def key(self) -> str:
        """Stable name of this sampling grid, e.g. ``"ddim-50-eta0.0"``, ``"ddpm-1000"``, ``"euler-30"``,
        ``"euler-ancestral-30"``,
        ``"dpmsolver++2-20"`` or ``"flow-euler-28-shift3.0"``.

        Per-step correction tables are stored under this key so that loading them for another grid fails
        loudly instead of silently reading the wrong step (PTQD pitfall 1, docs/methods/ptqd.md#pitfalls).
        """
        if self.kind == "ddim":
            return f"ddim-{self.num_steps}-eta{self.eta}"
        if self.kind == "dpmsolver++":
            return f"dpmsolver++{self.order}-{self.num_steps}"
        if self.kind == "flow-euler":
            return (f"flow-euler-{self.num_steps}" + ("" if self.shift is None else f"-shift{self.shift}")
                    + ("" if self.flow_sigmas is None else f"-{self.flow_sigmas}"))
        return f"{self.kind}-{self.num_steps}"

    @property
    def is_flow(self) -> bool:
        """Whether this kind integrates a flow-matching ODE on a velocity (not ε on a ᾱ_t schedule)."""
        return self.kind in FLOW_KINDS


DEFAULTED_KEYS = "_use_default_values"
"""diffusers' list of the config keys a scheduler's constructor was not given (left at its class defaults). It
changes the sampler: ``from_config`` into another class gives those keys that class's defaults (``DDPMScheduler()``
sampled as Euler takes Euler's "linspace" spacing, not DDPM's "leading"), as a user's
``EulerDiscreteScheduler.from_config(pipe.scheduler.config)`` does. diffusers drops the list when it saves a config,
so tadq saves schedulers without the defaulted keys instead (``tadq.io``), and the list comes back on loading."""


def scheduler_config_key(config: Mapping[str, Any]) -> dict[str, Any]:
    """A scheduler config as cache and run keys hold it: ``DEFAULTED_KEYS`` sorted, since diffusers builds that list
    in set order, which differs between processes (the key of the same scheduler would change from run to run)."""
    values = dict(config)
    if DEFAULTED_KEYS in values:
        values[DEFAULTED_KEYS] = sorted(values[DEFAULTED_KEYS])
    return values


def _config_of(train_scheduler_or_config: ConfigMixin | Mapping[str, Any]) -> tuple[str | None, Mapping[str, Any]]:
    if isinstance(train_scheduler_or_config, ConfigMixin):
        return type(train_scheduler_or_config).__name__, train_scheduler_or_config.config
    if isinstance(train_scheduler_or_config, Mapping):
        return train_scheduler_or_config.get("_class_name"), train_scheduler_or_config
    raise TypeError(
        "make_scheduler expects a diffusers scheduler or its config mapping, "
        f"got {type(train_scheduler_or_config).__name__}."
    )


def make_scheduler(train_scheduler_or_config: ConfigMixin | Mapping[str, Any], sampler: SamplerConfig) -> Any:
    """Build the diffusers scheduler for ``sampler`` from the model's training-scheduler config.

    The beta schedule, prediction type and timestep spacing come from the model's own scheduler, so a DDPM-trained
    model sampled with DDIM keeps its noise schedule. Keys one scheduler class does not know (e.g. DDPM's
    ``variance_type`` for DDIM) are ignored by diffusers; ones it lacks take diffusers' defaults (DDIM's
    ``set_alpha_to_one=True`` when starting from a DDPM config). The sampler's kind decides the class; the
    folder's class never replaces it (``check_drivable`` refuses a pair that cannot work, e.g. DDIM on a flow
    model). DPM-Solver++ is built with ``algorithm_type="dpmsolver++"`` and the sampler's order; flow-euler with
    the sampler's shift when it has one.

    Args:
        train_scheduler_or_config: A diffusers scheduler, or its ``config`` mapping.
        sampler: The sampler to configure.

    Returns:
        A fresh diffusers scheduler of the sampler's kind with ``set_timesteps(sampler.num_steps)`` already called.

    Raises:
        NotImplementedError: The training scheduler, or its pairing with the sampler, is not drivable
            (``check_drivable``).
    """
    class_name, config = _config_of(train_scheduler_or_config)
    check_drivable(class_name, config, sampler)
    overrides: dict[str, Any] = {}
    if sampler.clip_sample is not None:
        overrides["clip_sample"] = sampler.clip_sample
    if sampler.kind == "dpmsolver++":
        overrides.update(algorithm_type="dpmsolver++", solver_order=sampler.order)
    dynamic = sampler.kind == "flow-euler" and bool(config.get("use_dynamic_shifting"))
    if sampler.kind == "flow-euler" and sampler.shift is not None and not dynamic:
        overrides.update(shift=sampler.shift)
    scheduler = _SCHEDULER_CLASSES[sampler.kind].from_config(dict(config), **overrides)
    # a resolution-dependent scheduler keeps its unshifted σ range and shifts the grid once by μ, as the pipelines
    # call it: the sampler's shift s is exp(μ) ("exponential" time_shift_type) or μ itself ("linear")
    options: dict[str, Any] = {}
    if dynamic:
        linear = config.get("time_shift_type", "exponential") == "linear"
        options["mu"] = sampler.shift if linear else math.log(sampler.shift)
    if sampler.flow_sigmas == "uniform":  # FluxPipeline's grid; the scheduler shifts it as it shifts its own
        scheduler.set_timesteps(sigmas=[1.0 - i / sampler.num_steps for i in range(sampler.num_steps)], **options)
    else:
        scheduler.set_timesteps(sampler.num_steps, **options)
    return scheduler


def walk_differences(first: ConfigMixin | Mapping[str, Any], second: ConfigMixin | Mapping[str, Any],
                     sampler: SamplerConfig) -> dict[str, tuple[Any, Any]]:
    """The fields at which ``sampler`` built on the training schedule ``first`` differs from it built on ``second``
    (``make_scheduler``): {field: (first's value, second's)}, empty when both walk the same grid and read the
    network's output alike. The fields are the built scheduler's public config (prediction type, betas and their
    schedule, training timesteps, timestep spacing and offset, clipping, a flow model's shift...), so a field the
    sampler does not use (a PNDM-only key, one training class rather than another with the same schedule) is no
    difference, and one the sampler's class fills with its default is compared at that default.

    Raises ``NotImplementedError`` (``check_drivable``) when either schedule cannot be driven by ``sampler``."""
    built = [make_scheduler(scheduler, sampler).config for scheduler in (first, second)]
    # the sampler class's own parameters: from_config also keeps the keys of compatible classes (DDPM's
    # variance_type on a DDIM built from it), which this class never reads
    used = set(inspect.signature(_SCHEDULER_CLASSES[sampler.kind].__init__).parameters) - {"self"}
    mine, theirs = ({key: value for key, value in config.items() if key in used} for config in built)
    return {key: (mine.get(key), theirs.get(key)) for key in sorted(set(mine) | set(theirs))
            if _comparable(mine.get(key)) != _comparable(theirs.get(key))}


def _comparable(value: Any) -> str:
    """A config value as JSON text (a tuple and a list alike, an array of trained betas as its list)."""
    return json.dumps(value, sort_keys=True, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))


def _family(class_name: str) -> str:
    return ("flow matching" if "FlowMatch" in class_name else
            "a score SDE" if "ScoreSde" in class_name else "another sampler")


def check_drivable(class_name: str | None, config: Mapping[str, Any], sampler: SamplerConfig | None = None) -> None:
    """Raise ``NotImplementedError`` naming what tadq cannot drive: the scheduler class, config keys, the prediction
    type, or (with ``sampler``) the pairing of the training schedule with the sampler kind; ``ValueError`` naming
    the keys whose values have the wrong type (``_check_config_types``).

    ``class_name`` is the scheduler's class (``_class_name`` of a saved config); a bare mapping without one is
    accepted only without the keys that mark another scheduler family. A flow-matching schedule (velocity
    prediction) is driven only by a flow kind, and a discrete ᾱ_t schedule only by an ε kind: sampling one as
    the other would silently change the maths.
    """
    _check_config_types(config)
    supported = (f"tadq drives a discrete ᾱ_t training schedule ({', '.join(DISCRETE_SCHEDULERS)}) with "
                 f"ddim/ddpm/euler/euler-ancestral/dpmsolver++, or a flow-matching one ({', '.join(FLOW_SCHEDULERS)}) "
                 "with flow-euler")
    if class_name is not None and class_name not in SUPPORTED_SCHEDULERS:
        raise NotImplementedError(
            f"scheduler class {class_name} ({_family(class_name)}) cannot be driven by tadq: {supported}. It is "
            "refused rather than silently replaced by another sampler; score-SDE models, UniPC, Heun, DEIS and "
            "single-step DPM-Solver training configs are not supported.")
    foreign = sorted(key for key in config if key in _FOREIGN_KEYS)
    if class_name is None and foreign:
        raise NotImplementedError(f"the scheduler config has {foreign}, keys of a scheduler family tadq cannot "
                                  f"identify without its _class_name; {supported}.")
    if class_name == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas"):
        raise NotImplementedError("DPMSolverMultistepScheduler with use_flow_sigmas=True (a flow-matching model "
                                  "sampled by DPM-Solver) is not supported; only FlowMatchEulerDiscreteScheduler "
                                  "flow models are.")
    flow = class_name in FLOW_SCHEDULERS
    prediction = config.get("prediction_type", FLOW_PREDICTION if flow else "epsilon")
    if flow and prediction != FLOW_PREDICTION:
        raise NotImplementedError(f"{class_name} with prediction_type={prediction!r}: a flow-matching model predicts "
                                  f"the velocity ({FLOW_PREDICTION!r}).")
    if not flow and prediction == FLOW_PREDICTION:
        raise NotImplementedError(f"prediction_type={FLOW_PREDICTION!r} on a {class_name or 'bare'} config: tadq "
                                  "drives flow-matching models only from a FlowMatchEulerDiscreteScheduler config.")
    if prediction not in PREDICTION_TYPES + (FLOW_PREDICTION,):
        raise NotImplementedError(f"prediction_type={prediction!r} is not supported; tadq converts "
                                  f"{PREDICTION_TYPES} to ε and drives {FLOW_PREDICTION!r} with flow-euler.")
    shift = config.get("shift", 1.0)
    if flow and (not finite_float(shift)
                 or shift <= 0):  # 0 gives NaN latents, a negative shift a grid outside [0, 1]
        raise ValueError(f"{class_name} shift={shift!r}: the timestep shift σ ↦ sσ/(1 + (s-1)σ) needs a finite "
                         "s > 0; fix scheduler_config.json")
    if sampler is None:
        return
    check_sampler_pairing(class_name, sampler)
    _check_sampler_options(sampler, config)


def check_sampler_pairing(class_name: str | None, sampler: SamplerConfig, where: str | None = None) -> None:
    """Raise ``NotImplementedError`` when ``sampler`` is of the other family than the training schedule of class
    ``class_name``: a flow kind on a discrete ᾱ_t (ε-family) one, an ε kind on a flow-matching one. The one pairing
    rule: ``check_drivable`` applies it, and the commands apply it to a folder's scheduler config before loading
    (``where``: the folder, named in the message)."""
    flow = class_name in FLOW_SCHEDULERS
    if flow != sampler.is_flow:
        what = "a flow-matching model (velocity prediction)" if flow else "a discrete ᾱ_t (ε-family) model"
        use = "flow-euler" if flow else "ddim, ddpm, euler, euler-ancestral or dpmsolver++"
        raise NotImplementedError(f"sampler {sampler.kind!r} cannot drive {'' if where is None else f'{where}, '}"
                                  f"{what} ({class_name or 'bare config'}): its update assumes the other "
                                  f"parametrisation; use {use}.")


# Config options that change the grid (σ's, timesteps) or the timestep the network is fed, with the values that do:
# diffusers' from_config drops a key the sampler's class has no parameter for, so the sampler would walk another
# grid (a continuous-time v-model would get integer timesteps) without a word; such a pairing is refused.
_GRID_OPTIONS: dict[str, Callable[[Any, Mapping[str, Any]], bool]] = {
    "use_karras_sigmas": lambda value, config: value is True,
    "use_exponential_sigmas": lambda value, config: value is True,
    "use_beta_sigmas": lambda value, config: value is True,
    "use_lu_lambdas": lambda value, config: value is True,
    "final_sigmas_type": lambda value, config: value == "sigma_min",
    "interpolation_type": lambda value, config: value == "log_linear",
    "timestep_type": lambda value, config: value == "continuous" and config.get("prediction_type") == "v_prediction",
}


def _takes(kind: str, key: str) -> bool:
    """Whether the diffusers class of ``kind`` has a constructor parameter ``key`` (else from_config drops it)."""
    return key in inspect.signature(_SCHEDULER_CLASSES[kind].__init__).parameters


def _check_grid_options(sampler: SamplerConfig, config: Mapping[str, Any]) -> None:
    """Refuse a grid option of the folder's config that the sampler's diffusers class cannot honour."""
    for key, changes in _GRID_OPTIONS.items():
        value = config.get(key)
        if value is None or not changes(value, config) or _takes(sampler.kind, key):
            continue
        family = FLOW_KINDS if sampler.is_flow else tuple(kind for kind in SAMPLER_KINDS if kind not in FLOW_KINDS)
        honour = [kind for kind in family if _takes(kind, key)]
        use = f"sample with a kind that honours it ({', '.join(honour)}), or" if honour else "no tadq kind honours it:"
        raise NotImplementedError(
            f"the scheduler config sets {key}={value!r}, which {_SCHEDULER_CLASSES[sampler.kind].__name__} "
            f"({sampler.kind}) does not have: {sampler.kind} would " + ("feed the network other timesteps" if key
                                                                       == "timestep_type" else "walk another grid")
            + f" than the config asks for, without a word; {use} set {key} to its default in the config.")


@cache
def _builds_schedule(kind: str, beta_schedule: str) -> bool:
    """Whether the diffusers class of ``kind`` computes ``beta_schedule`` (DDPM alone has 'sigmoid' and 'laplace';
    the others raise ``NotImplementedError`` from ``from_config``)."""
    try:
        _SCHEDULER_CLASSES[kind](beta_schedule=beta_schedule)
    except NotImplementedError:
        return False
    return True


def _check_beta_schedule(sampler: SamplerConfig, config: Mapping[str, Any]) -> None:
    """Refuse a ``beta_schedule`` the sampler's diffusers class cannot compute, naming the kinds that can: the
    class's own error named a scheduler the user never chose ('sigmoid is not implemented for DDIMScheduler' for
    a DDPM folder sampled with the commands' default, ddim). ``trained_betas`` overrides the schedule."""
    schedule = config.get("beta_schedule")
    if not isinstance(schedule, str) or config.get("trained_betas") is not None or sampler.is_flow \
            or _builds_schedule(sampler.kind, schedule):
        return
    honour = [kind for kind in SAMPLER_KINDS if kind not in FLOW_KINDS and _builds_schedule(kind, schedule)]
    use = f"sample it with {', '.join(honour)}" if honour else "no tadq sampler kind computes it"
    raise NotImplementedError(
        f"the scheduler config has beta_schedule={schedule!r}, which {_SCHEDULER_CLASSES[sampler.kind].__name__} "
        f"({sampler.kind}) does not implement: {use} (tadq's commands default to ddim; pass --sampler), or give "
        "the schedule as trained_betas.")


def _check_sampler_options(sampler: SamplerConfig, config: Mapping[str, Any]) -> None:
    """Options of the training config that would change the update tadq's steps implement are refused, a beta
    schedule the sampler's class cannot compute (``_check_beta_schedule``) and grid options that class would drop
    (``_check_grid_options``)."""
    _check_beta_schedule(sampler, config)
    _check_grid_options(sampler, config)
    if sampler.kind == "dpmsolver++":
        if config.get("thresholding"):
            raise NotImplementedError("DPM-Solver++ with thresholding=True (dynamic thresholding of x̂_0) is not "
                                      "implemented in tadq's step; set thresholding=False.")
        if config.get("solver_type", "midpoint") != "midpoint":
            raise NotImplementedError(f"DPM-Solver++ solver_type={config.get('solver_type')!r}: tadq implements the "
                                      "'midpoint' 2M update only.")
    if sampler.kind == "flow-euler":
        for key in ("stochastic_sampling", "invert_sigmas"):
            if config.get(key):
                raise NotImplementedError(f"FlowMatchEulerDiscreteScheduler with {key}=True is not implemented in "
                                          "tadq's flow-euler step.")
        if config.get("use_dynamic_shifting") and sampler.shift is None:
            raise NotImplementedError(
                "the flow scheduler uses a resolution-dependent shift (use_dynamic_shifting=True, e.g. Flux): pass "
                "it explicitly, SamplerConfig('flow-euler', shift=exp(mu)) for the image's mu (shift=mu with "
                "time_shift_type 'linear'); a pipeline folder computes it as its pipeline does.")


def command_sampler_kind(train_scheduler: ConfigMixin) -> str:
    """The sampler kind tadq's commands use when none is named: ``ddim`` (every table's sampler) on a discrete ᾱ_t
    schedule, ``flow-euler`` on a flow-matching one, which DDIM cannot drive. Unlike ``default_sampler`` it does
    not follow the folder's own class (the shipped DDPM-trained models are tabulated with DDIM)."""
    return "flow-euler" if type(train_scheduler).__name__ in FLOW_SCHEDULERS else "ddim"


def default_sampler(train_scheduler_or_config: ConfigMixin | Mapping[str, Any], num_steps: int = 50) -> SamplerConfig:
    """The sampler a folder ships with (its scheduler class): DDPM -> ddpm, DDIM -> ddim, Euler -> euler, Euler
    ancestral -> euler-ancestral, DPM-Solver multistep -> dpmsolver++ (its ``solver_order`` if 1 or 2),
    FlowMatchEuler -> flow-euler.

    Raises ``NotImplementedError`` for a class with no tadq sampler of its own (PNDM, LMS), or a DPM-Solver
    config of another algorithm (``sde-dpmsolver++``, ``dpmsolver``...): the caller names one instead of tadq
    picking another in its place.
    """
    class_name, config = _config_of(train_scheduler_or_config)
    check_drivable(class_name, config)
    kind = DEFAULT_SAMPLER_KINDS.get(str(class_name))
    if kind is None:
        raise NotImplementedError(f"{class_name} has no tadq sampler of its own; choose one explicitly "
                                  f"({', '.join(SAMPLER_KINDS)}).")
    if kind == "dpmsolver++":
        algorithm = config.get("algorithm_type", "dpmsolver++")
        if algorithm != "dpmsolver++":  # sde-dpmsolver++ adds noise, dpmsolver predicts ε: another sampler
            raise NotImplementedError(f"{class_name} ships with algorithm_type={algorithm!r}; tadq implements "
                                      "DPM-Solver++ (algorithm_type='dpmsolver++') only: choose a sampler "
                                      "explicitly.")
        order = int(config.get("solver_order", 2))
        if order not in (1, 2):
            raise NotImplementedError(f"{class_name} ships with solver_order={order}; tadq implements DPM-Solver++ "
                                      "orders 1 and 2: choose one explicitly.")
        return SamplerConfig(kind, num_steps=num_steps, order=order)
    return SamplerConfig(kind, num_steps=num_steps)  # type: ignore[arg-type]
