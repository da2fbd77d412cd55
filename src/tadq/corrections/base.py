"""The one interface every timestep-aware correction implements (docs/architecture.md#corrections).

A correction is an ``nn.Module`` with identity-default hooks, so corrections acting at different places stack:

    prepare(model, adapter) -> model     structural change of the network (TFMQ)
    fit(pair)                            per-step tables from a ``TrajectoryPair``
    before_model(x, step)                input correction (TAC IBC)
    after_model(eps, x, step)            noise-estimate correction (PTQD CNC/BC, TAC NER, TCEC)
    noise_std(std, step)                 sampler variance (PTQD VSC)
    after_step(x_prev, step)             propagated-error correction

Per-step tables are registered buffers shaped (S, ...) and indexed by ``step.index``, so ``state_dict`` round-trips.
A table is only valid for what it was fitted on (docs/methods/composition.md#table-keys): the sampler (kind, S, η),
the guidance scale and the quantized model's bit-width. That ``TableKey`` travels in the module's extra state, and
every hook of a fitted correction checks it against the ``StepContext``; using an unfitted correction, or a fitted
one on another grid, raises ``ValueError`` instead of silently returning zeros (a PTQD and TFMQ pitfall).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from tadq.corrections.pair import (
    TRAJECTORY_MODES,
    FitContext,
    TrajectoryMode,
    TrajectoryPair,
    collect_trajectory_pair,
)
from tadq.device import table_device
from tadq.safefiles import finite_float
from tadq.sampling import Conditioning, IdentityHooks, SamplingHooks, StepContext, check_seed

__all__ = [
    "Correction", "CorrectionConfig", "FitContext", "HookedDenoiser", "PairRequest", "TableKey", "TrajectoryPair",
    "check_count", "check_number", "check_selection_seed", "collect_trajectory_pair",
]


@dataclass(frozen=True)
class TableKey:
    """What a correction's per-step tables depend on (docs/methods/composition.md#table-keys).

    Args:
        sampler_key: ``SamplerConfig.key`` (kind, number of steps, η), e.g. ``"ddim-50-eta0.0"``.
        num_steps: S, the length of every table.
        guidance_scale: Classifier-free guidance scale w (1.0 for unconditional models).
        bits: Bit label of the quantized model the tables were fitted with, e.g. ``"W4A8"``.
        clip_sample_range: x̂₀ clipping of the fitting sampler (``None``: off). The sampler key does not hold it (it
            comes from the scheduler config), yet clipping changes every step after the first clipped one.
        clip_recorded: Whether ``clip_sample_range`` was recorded; tables saved by an older tadq did not record it
            and cannot be checked.
        schedule: (t, A_t, B_t) of every step of the fitting sampler: the denoiser's timestep and the update's
            coefficients on x_t and ε, which the training schedule (betas, ``num_train_timesteps``, spacing) fixes
            and the sampler key does not hold. ``None`` in tables saved before it was recorded (not checked).
        noise: σ_t of every step, the sampler's noise std (DDIM's η, DDPM's ``variance_type``, which the sampler
            key does not hold either). ``None`` in tables saved before it was recorded (not checked).
        prediction_type: The fitting scheduler's ``prediction_type``: the tables act on ε converted from the model's
            output with it, and the schedule points do not hold it (a v-prediction model's tables were used on its
            output read as ε). ``None`` in tables saved before it was recorded (not checked).
    """

    sampler_key: str
    num_steps: int
    guidance_scale: float
    bits: str
    clip_sample_range: float | None = None
    clip_recorded: bool = False
    schedule: tuple[tuple[float, float, float], ...] | None = None
    noise: tuple[float, ...] | None = None
    prediction_type: str | None = None

    @classmethod
    def from_pair(cls, pair: TrajectoryPair) -> TableKey:
        """The key of tables fitted on ``pair``."""
        return cls.from_steps(pair.steps, pair.bits)

    @classmethod
    def from_steps(cls, steps: Sequence[StepContext], bits: str) -> TableKey:
        """The key of tables fitted along ``steps`` (one sampler grid, noisiest first) on a ``bits`` model."""
        first = steps[0]
        return cls(first.sampler_key, first.num_steps, float(first.guidance_scale), bits, first.clip_sample_range,
                   True, tuple(schedule_point(step) for step in steps), tuple(float(step.std_dev_t) for step in steps),
                   str(first.prediction_type))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TableKey:
        if not isinstance(text, str):  # json.loads raised a TypeError on a dict or a number
            raise ValueError(f"correction table key is a {type(text).__name__}, not the JSON text tadq writes; the "
                             "tables are damaged: save the artefact again")
        try:
            fields = json.loads(text)
        except ValueError as error:
            raise ValueError(f"correction table key {text[:80]!r} is not valid JSON; the tables are damaged: save the "
                             "artefact again") from error
        if not isinstance(fields, dict) or set(fields) - set(cls.__dataclass_fields__):
            raise ValueError(f"correction table key {text[:80]!r} has unknown fields; the tables are damaged or "
                             "were written by a newer tadq")
        _check_key_fields(fields, text)
        if fields.get("schedule") is not None:  # JSON lists back to the tuples a frozen key compares and hashes
            try:
                fields["schedule"] = tuple((float(t), float(a), float(b)) for t, a, b in fields["schedule"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"correction table key {text[:80]!r} has a damaged schedule") from error
            if len(fields["schedule"]) != fields.get("num_steps"):
                raise ValueError(f"correction table key {text[:80]!r} records a schedule of "
                                 f"{len(fields['schedule'])} steps for {fields.get('num_steps')}: it is damaged")
        if fields.get("noise") is not None:
            try:
                fields["noise"] = tuple(float(value) for value in fields["noise"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"correction table key {text[:80]!r} has a damaged noise schedule") from error
            if len(fields["noise"]) != fields.get("num_steps"):
                raise ValueError(f"correction table key {text[:80]!r} records σ_t of {len(fields['noise'])} steps "
                                 f"for {fields.get('num_steps')}: it is damaged")
        return cls(**fields)


def _check_key_fields(fields: dict[str, Any], text: str) -> None:
    """``ValueError`` for a key field every tadq wrote that is missing or of the wrong type: the key built anyway
    (a string guidance scale, a string step count) and failed later, or a missing one raised a ``TypeError``."""
    where = f"correction table key {text[:80]!r}"
    missing = [name for name in ("sampler_key", "num_steps", "guidance_scale", "bits") if name not in fields]
    if missing:
        raise ValueError(f"{where} lacks {missing}; the tables are damaged: save the artefact again")
    steps = fields["num_steps"]
    checks = {
        "sampler_key": isinstance(fields["sampler_key"], str),
        "bits": isinstance(fields["bits"], str),
        "num_steps": isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
        "guidance_scale": finite_float(fields["guidance_scale"]),
        "clip_sample_range": fields.get("clip_sample_range") is None or finite_float(fields["clip_sample_range"]),
        "clip_recorded": isinstance(fields.get("clip_recorded", False), bool),
        "prediction_type": fields.get("prediction_type") is None or isinstance(fields["prediction_type"], str),
    }
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        raise ValueError(f"{where} has {wrong[0]} = {fields.get(wrong[0])!r}, not what tadq writes; the tables are "
                         "damaged: save the artefact again")


SCHEDULE_RTOL = 1e-3
"""Relative tolerance of the schedule check: float32 ᾱ tables rebuilt by another torch or CPU differ by at most a
few hundred ulps after a 1000-term cumulative product (≈ 1e-5), another beta schedule or step count by percents."""


def schedule_point(step: StepContext) -> tuple[float, float, float]:
    """(t, A_t, B_t) of one step: what a table key records of the training schedule (``TableKey.schedule``)."""
    return float(step.t), float(step.coef_x), float(step.coef_eps)


def _points(values: tuple[float, float, float]) -> str:
    return "(" + ", ".join(f"{value:.6g}" for value in values) + ")"


@dataclass(frozen=True)
class PairRequest:
    """How the trajectory pair a correction fits on is collected (see ``tadq.corrections.pair``)."""

    mode: TrajectoryMode
    num_samples: int
    seed: int


@dataclass(frozen=True)
class CorrectionConfig:
    """Base of every correction config: how its fitting data is collected.

    Subclasses are frozen dataclasses registered with ``tadq.registry.register_correction``; they call
    ``super().__post_init__()`` from their own.

    Args:
        trajectory: ``"teacher_forced"`` (FP trajectory, both networks on the same state; PTQD's choice,
            docs/methods/ptqd.md#fitting-data) or ``"quantized"`` (the deployed quantized trajectory).
        num_samples: Trajectories in the fitting pair.
        seed: Noise seed of the fitting pair. It must be a calibration seed, disjoint from evaluation seeds:
            a correction scored on its own noise proves nothing.
    """

    trajectory: TrajectoryMode = "teacher_forced"
    num_samples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trajectory not in TRAJECTORY_MODES:
            raise ValueError(f"trajectory={self.trajectory!r}; accepted values: {TRAJECTORY_MODES}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        check_seed("seed (a calibration seed)", self.seed)


def check_number(where: str, value: object, low: float = 0.0, high: float = math.inf) -> None:
    """A real, finite number in [low, high], else ``ValueError`` naming ``where`` (``Config.field``): ``x < 0`` is
    False for NaN, so range checks alone let NaN through, and a string failed later with a bare ``TypeError``."""
    if not finite_float(value) \
            or not low <= value <= high:
        span = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{where} must be a finite number {span}, got {value!r}")


def check_count(where: str, value: object) -> None:
    """A positive int, else ``ValueError`` naming ``where`` (``selection_samples=2.5`` failed only at fit time)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where} must be a positive int, got {value!r}")


def check_selection_seed(config_name: str, seed: int, selection_seed: int | None, held_out_seed: int) -> None:
    """A correction's held-out selection seed: a calibration seed other than its fitting seed (a choice scored on
    the noise it was fitted on proves nothing), within the noise draws' seed range (``selection_seed=None`` takes
    ``seed + SELECTION_SEED_OFFSET``, which must fit too)."""
    if selection_seed is not None:
        check_seed(f"{config_name}.selection_seed", selection_seed)
        if selection_seed == seed:
            raise ValueError(f"{config_name}.selection_seed must be a calibration seed other than seed ({seed})")
    check_seed(f"{config_name}'s held-out seed (selection_seed, or seed + 100000 when it is None)", held_out_seed)


@runtime_checkable
class HookedDenoiser(Protocol):
    """A denoiser that carries its own corrections (``QuantizedDenoiser``, ``MixedPrecisionDenoiser``).

    ``tadq.sample`` calls it directly and puts ``correction_hooks()`` before any extra hooks.
    """

    @property
    def sample_shape(self) -> tuple[int, int, int]: ...

    def correction_hooks(self) -> tuple[SamplingHooks, ...]: ...

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor: ...


class Correction(nn.Module, IdentityHooks, ABC):
    """A timestep-aware fix with identity-default hooks (docs/architecture.md#corrections).

    Subclasses register their tables with ``register_table`` in ``__init__``, implement ``fit_tables`` and
    override the hooks they use, starting each with ``index = self.table_index(step)``.

    Attributes:
        config_type: The config class, set by ``@register_correction``.
        keyed: Whether the correction has per-step tables; a correction without any (structural only) sets this
            to ``False`` and is usable without ``fit``.
        wants_guidance_branches: Set to ``True`` to find both classifier-free guidance branches (as ε) in
            ``step.branches`` of ``after_model`` when the plan is guided; other hooks see the guided ε only.
    """

    config_type: ClassVar[type[CorrectionConfig]]
    keyed: ClassVar[bool] = True
    wants_guidance_branches: ClassVar[bool] = False
    # tables an older tadq saved in another dtype, converted exactly on load: {table: (old dtypes)}
    earlier_table_dtypes: ClassVar[dict[str, tuple[torch.dtype, ...]]] = {}
    # float64 buffers each step reads as Python numbers (settings, per-step scalars): kept on the CPU wherever the
    # module moves, so the reads are no device syncs (on a GPU, every float() of them waited for the queued work)
    host_tables: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: CorrectionConfig) -> None:
        super().__init__()
        expected = getattr(type(self), "config_type", None)
        if expected is not None and not isinstance(config, expected):
            raise TypeError(f"{type(self).__name__} takes a {expected.__name__}, got {type(config).__name__}")
        self.config = config
        self.table_key: TableKey | None = None
        self._table_names: list[str] = []

    # -- tables and their key ---------------------------------------------------------------------------------------
    def register_table(self, name: str, dtype: torch.dtype = torch.float64) -> None:
        """Register an empty per-step table buffer; ``fit_tables`` sets it to shape (S, ...)."""
        self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self._table_names.append(name)

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(self._table_names)

    def earlier_state(self, stored: dict[str, Tensor]) -> dict[str, Tensor]:
        """The buffers an older tadq did not save, with the values that tadq used instead, given this member's
        ``stored`` tensors (names without the ``members.<i>.`` prefix); ``load_corrections`` adds them where they
        are missing. Empty by default: a missing buffer is damage."""
        return {}

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        """``.to``/``.float()``/``.half()`` move the float64 tables and settings but keep them float64: cast with the
        network, PTQD's k (read as a Python float) lost its precision in float32 (``tadq.load(dir, device="cuda")``)
        or bfloat16, and a model saved after ``.float()`` wrote float32 tables its loader refused."""
        kept = {name: buffer for name, buffer in self._buffers.items()
                if buffer is not None and buffer.dtype == torch.float64}
        target = fn(torch.zeros(0, device="cpu")).device if kept else None  # where this call moves tensors
        # on the CPU: ``host_tables``, and every table on a device without float64 (MPS: moving them there raised,
        # tadq.load(dir, device="mps")), where each step moves the row it uses (broadcast_row)
        host = {name: buffer for name, buffer in kept.items()
                if name in self.host_tables or table_device(target) != target}
        for name in host:  # out of super()'s reach; the slots keep their order (state_dict)
            self._buffers[name] = None
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, buffer in host.items():
                self._buffers[name] = buffer.to(device="cpu")
        for name, buffer in kept.items():
            if name in host:
                continue
            moved = self._buffers[name]
            if moved is not None and moved.dtype != buffer.dtype:
                self._buffers[name] = buffer.to(device=moved.device)
        return result

    @property
    def fitted(self) -> bool:
        return self.table_key is not None

    # -- settings chosen on held-out noise (tadq.corrections.stack.fit_stack) -----------------------------------------
    def candidates(self) -> list[dict[str, Any]]:
        """Settings to choose between by held-out final error; one (empty) candidate means nothing to choose."""
        return [{}]

    def use_candidate(self, settings: dict[str, Any]) -> None:
        """Switch to one of ``candidates()`` (for a pair-fitted correction: after ``fit``, on its fitted tables)."""

    def selection_noise(self) -> tuple[int | None, int]:
        """(held-out seed, trajectories) that score the candidates; no seed when there is nothing to choose."""
        return None, 64

    def selection_score(self) -> str:
        """How the held-out trajectories score a candidate (``tadq.corrections.sequential.SELECTION_SCORES``)."""
        return "final_mse"

    def pair_request(self) -> PairRequest | None:
        """How to collect the fitting pair (from the config); ``None`` for a correction that fits nothing."""
        if not self.keyed:
            return None
        return PairRequest(self.config.trajectory, self.config.num_samples, self.config.seed)

    def check_step(self, step: StepContext) -> None:
        """Raise ``ValueError`` unless the tables were fitted for this step's sampler grid and guidance scale."""
        if not self.keyed:
            return
        name = type(self).__name__
        if self.table_key is None:
            raise ValueError(f"{name} is not fitted: call fit(pair) (or tadq.corrections.fit_stack) before sampling")
        key = self.table_key
        if step.num_steps != key.num_steps:
            raise ValueError(f"{name} was fitted for {key.num_steps} sampler steps ({key.sampler_key}) but is used "
                             f"with {step.num_steps} ({step.sampler_key}); refit it for this sampler")
        if step.sampler_key != key.sampler_key:
            raise ValueError(f"{name} was fitted for sampler {key.sampler_key!r} but is used with "
                             f"{step.sampler_key!r}; its tables depend on kind, steps and η: refit it")
        if step.guidance_scale != key.guidance_scale:
            raise ValueError(f"{name} was fitted at guidance scale {key.guidance_scale} but is used at "
                             f"{step.guidance_scale}; guided ε (and its quantization error) changes with the scale: "
                             "refit it at this scale")
        if key.schedule is not None:
            fitted, used = key.schedule[step.index], schedule_point(step)
            if not all(math.isclose(a, b, rel_tol=SCHEDULE_RTOL, abs_tol=1e-12) for a, b in zip(fitted, used,
                                                                                             strict=True)):
                raise ValueError(f"{name} was fitted on another training schedule: at step {step.index} of "
                                 f"{key.sampler_key} (t, A_t, B_t) = {_points(fitted)} when fitted, {_points(used)} "
                                 "now (another beta schedule, num_train_timesteps or timestep spacing). Sample with "
                                 "the scheduler the model was quantized with, or refit it")
        if key.noise is not None and not math.isclose(key.noise[step.index], float(step.std_dev_t),
                                                      rel_tol=SCHEDULE_RTOL, abs_tol=1e-12):
            raise ValueError(f"{name} was fitted with the sampler's noise σ_t = {key.noise[step.index]:.6g} at step "
                             f"{step.index} of {key.sampler_key}, but it is {float(step.std_dev_t):.6g} now (another "
                             "DDPM variance_type or η); sample with the scheduler the model was quantized with, or "
                             "refit it")
        if key.prediction_type is not None and step.prediction_type != key.prediction_type:
            raise ValueError(f"{name} was fitted with a scheduler of prediction_type={key.prediction_type!r} but is "
                             f"used with {step.prediction_type!r}: its tables correct ε converted from the model's "
                             "output as the fitting scheduler read it. Sample with the scheduler the model was "
                             "quantized with (tadq.load returns it), or refit it")
        if key.clip_recorded and step.clip_sample_range != key.clip_sample_range:
            def clipping(value: float | None) -> str:
                return "without x̂₀ clipping" if value is None else f"with x̂₀ clipped to ±{value}"

            raise ValueError(f"{name} was fitted {clipping(key.clip_sample_range)} but is used "
                             f"{clipping(step.clip_sample_range)} (clip_sample); sample with the same clipping "
                             "or refit it")

    def check_plan(self, steps: Sequence[StepContext]) -> None:
        """``check_step`` for every step of a plan, before the sampling loop starts: a schedule that differs only
        at a late step was refused there, after the steps before it had run."""
        for step in steps:
            self.check_step(step)

    def check_fittable(self, steps: Sequence[StepContext]) -> None:
        """Raise before any fitting work when this correction cannot be fitted along ``steps`` (every plan by
        default; e.g. TCEC's next-state target refuses a multistep sampler)."""

    def check_model(self, bits: str, guidance_scale: float | None = None) -> None:
        """Raise ``ValueError`` unless the tables were fitted for this bit label (and ``guidance_scale`` when given;
        every hook also checks the scale of its step)."""
        if not self.keyed or self.table_key is None:
            return  # an unfitted correction fails at its first hook
        key, name = self.table_key, type(self).__name__
        if key.bits != bits:
            raise ValueError(f"{name} was fitted on a {key.bits} model but is attached to a {bits} one; refit it")
        if guidance_scale is not None and key.guidance_scale != guidance_scale:
            raise ValueError(f"{name} was fitted at guidance scale {key.guidance_scale}, used at {guidance_scale}")

    def table_index(self, step: StepContext) -> int:
        """``step.index`` after ``check_step``: the row of every table that belongs to this step."""
        self.check_step(step)
        return step.index

    # -- fitting ----------------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, adapter: Any) -> nn.Module:
        """Structural change of the network before quantization (identity by default)."""
        return model

    def fit(self, pair: TrajectoryPair) -> None:
        """Fit the per-step tables on ``pair`` and key them by its sampler, guidance scale and bit label."""
        self.table_key = None  # a failed fit leaves the correction unfitted, never half-keyed
        self.fit_tables(pair)
        for name in self._table_names:
            rows = getattr(self, name).shape[0]
            if rows != pair.num_steps:
                raise RuntimeError(f"{type(self).__name__}.fit_tables left table {name!r} with {rows} rows, "
                                   f"expected S={pair.num_steps}")
        self.table_key = TableKey.from_pair(pair)

    @abstractmethod
    def fit_tables(self, pair: TrajectoryPair) -> None:
        """Set every registered table to its fitted (S, ...) value."""

    # -- identity hooks that still refuse a wrong grid --------------------------------------------------------------
    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        self.check_step(step)
        return x

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        self.check_step(step)
        return eps

    def noise_std(self, std: Tensor, step: StepContext) -> Tensor:
        self.check_step(step)
        return std

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor:
        self.check_step(step)
        return x_prev

    # -- serialisation ----------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """The table key, saved beside the table buffers (a JSON-compatible dict)."""
        return {"table_key": None if self.table_key is None else self.table_key.to_json()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):  # was read as "no key": a keyed correction loaded unfitted
            raise ValueError(f"{type(self).__name__}'s saved state is a {type(state).__name__}, not the "
                             "{\"table_key\": ...} object tadq writes; the tables are damaged: save the artefact "
                             "again")
        text = state.get("table_key")
        self.table_key = None if text is None else TableKey.from_json(text)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # Tables of a fresh correction are empty placeholders: take the saved (S, ...) shapes before copying.
        for name in self._table_names:
            incoming = state_dict.get(prefix + name)
            if isinstance(incoming, Tensor):
                current = self._buffers[name]
                self._buffers[name] = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        key = "unfitted" if self.table_key is None else f"{self.table_key.sampler_key}, {self.table_key.bits}"
        return f"{self.config}, {key}"
