"""``Recipe``: everything about a quantized model in one typed, versioned object (docs/recipes.md).

A recipe names the quantization method (a registered method config: ``NaiveMethod``, ``QDiffusionMethod``,
``tadq.tfmq.TFMQMethod``, or one a user registers with ``register_quant_method``), the weight and activation schemes,
the layers kept in floating point, the calibration data, the deployment sampler(s) and the correction stack in
application order. ``tadq.quantize(model, scheduler, recipe)`` runs it, the artefact stores it
(``tadq_recipe.json``) and ``tadq sample`` / ``tadq evaluate`` apply it.

JSON form: ``config_to_dict`` (``{"type": "Recipe", "version": 3, "data": {...}}``, nested configs the same way);
omitted fields take their defaults; an unknown field, type or a newer version raises naming where it is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

from tadq.config import (
    CalibrationConfig,
    QuantConfig,
    ReconstructionConfig,
    config_from_dict,
    config_to_dict,
    field_added,
    refuse_strings,
    register_config_type,
    register_migration,
)
from tadq.corrections.base import CorrectionConfig
from tadq.quant.qscheme import QScheme, preset, preset_key
from tadq.registry import load_builtins, registered_corrections
from tadq.safefiles import finite_float, read_json_file
from tadq.sampling import SamplerConfig

__all__ = [
    "Recipe", "Deployment", "NaiveMethod", "QDiffusionMethod", "MethodHandler", "register_quant_method",
    "method_handler", "registered_quant_methods", "load_recipe", "save_recipe", "recipe_from_dict",
    "override_recipe",
]


@register_config_type
@dataclass(frozen=True)
class NaiveMethod:
    """Naive PTQ: calibrated ranges, no reconstruction (the baseline of every table)."""

    base_method: ClassVar[str] = "naive"

    @property
    def reconstruction(self) -> ReconstructionConfig:
        return ReconstructionConfig()  # unused; what QuantConfig records for a naive model


@register_config_type
@dataclass(frozen=True)
class QDiffusionMethod:
    """Q-Diffusion: block reconstruction (AdaRound weights, then learned activation steps), docs/methods."""

    base_method: ClassVar[str] = "qdiffusion"
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)


class MethodHandler(NamedTuple):
    """What runs a method config: ``quantize(model, reference, scheduler, recipe, **options)`` builds the
    quantized network from scratch; ``reuse(base, reference, scheduler, recipe, **options)`` returns a network for
    ``recipe`` from an already built ``base`` (e.g. one on disk) or raises ``ValueError`` saying why it cannot."""

    quantize: Callable[..., Any]
    reuse: Callable[..., Any]


_METHODS: dict[type, MethodHandler] = {}


def register_quant_method(config_type: type, quantize: Callable[..., Any], reuse: Callable[..., Any]) -> None:
    """Make ``config_type`` usable as ``Recipe.method`` (a handler table, like torchao's ``quantize_``)."""
    known = _METHODS.get(config_type)
    if known is not None and known != (quantize, reuse):
        raise ValueError(f"{config_type.__name__} already has a quantization handler ({known.quantize.__module__})")
    register_config_type(config_type)
    _METHODS[config_type] = MethodHandler(quantize, reuse)


def registered_quant_methods() -> dict[type, MethodHandler]:
    load_builtins()  # tadq.methods and tadq.tfmq register theirs
    return dict(_METHODS)


def method_handler(method: object) -> MethodHandler:
    """The handler of a method config; ``ValueError`` listing the registered ones otherwise."""
    load_builtins()
    handler = _METHODS.get(type(method))
    if handler is None:
        raise ValueError(f"Recipe.method: {type(method).__name__} is not a registered quantization method; "
                         f"registered: {sorted(k.__name__ for k in _METHODS)} (tadq.recipe.register_quant_method)")
    return handler


@register_config_type
@dataclass(frozen=True)
class Deployment:
    """A sampler the model is deployed with: its grid (kind, steps, η) and the classifier-free guidance scale.

    Correction and TFMQ tables are fitted for exactly this (sampler, guidance scale). ``null_class``: the label of
    the unconditional branch a class-conditional model was calibrated with (``tadq quantize --null-class``, or the
    shipped model's), recorded so that sampling the artefact needs no flag to find it again; ``None`` for other
    models and for recipes written before it was recorded. ``distilled_guidance``: the guidance scale a
    guidance-distilled model (Flux) embedded while it was calibrated and fitted (FluxPipeline's ``guidance_scale``),
    a model input the tables depend on like the classifier-free scale; ``None`` for every other model.
    """

    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="ddim", num_steps=50, eta=0.0))
    guidance_scale: float = 1.0
    null_class: int | None = None
    distilled_guidance: float | None = None

    # written to JSON only when set: recipes of every other model read and hash as before it existed
    written_when_set = ("distilled_guidance", "null_class")

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, SamplerConfig):
            raise ValueError(f"Deployment.sampler must be a SamplerConfig, got {type(self.sampler).__name__}")
        scale = self.guidance_scale
        if not finite_float(scale) or scale < 0:
            raise ValueError(f"Deployment.guidance_scale must be a finite float >= 0 (1.0: none), got {scale!r}")
        object.__setattr__(self, "guidance_scale", float(scale))
        label = self.null_class
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            raise ValueError(f"Deployment.null_class must be a class label (an int >= 0) or None, got {label!r}")
        if self.distilled_guidance is not None:
            object.__setattr__(self, "distilled_guidance",
                               check_distilled_guidance(self.distilled_guidance, "Deployment.distilled_guidance"))


def check_distilled_guidance(value: Any, what: str = "guidance_scale") -> float:
    """``value`` as a float when it is a finite number (the scale a guidance-distilled model embeds; NaN or inf
    would make every image NaN), else ``ValueError``."""
    if not finite_float(value):
        raise ValueError(f"{what} must be a finite number (the guidance scale the model embeds), got {value!r}")
    return float(value)


@register_config_type
@dataclass(frozen=True)
class Recipe:
    """Everything about a quantized model (docs/recipes.md has every field with an example).

    Args:
        method: the quantization method, a registered method config (``NaiveMethod``, ``QDiffusionMethod``,
            ``TFMQMethod``...).
        weights: scheme of every quantized weight (bits, symmetry, per-channel or per-tensor, range estimator).
        activations: scheme of every quantized input activation: ``per_tensor`` (calibrated) or dynamic
            ``per_token``/``per_group`` ranges, smoothing, rotation (``QScheme``).
        keep_fp_roles: adapter roles kept in floating point (e.g. ``("input_conv", "output_conv")``).
        exclude: fnmatch patterns of layer names kept in floating point.
        split_shortcut: Q-Diffusion shortcut splitting of the decoder's skip convolutions.
        quantize_attention: quantize the attention matmul operands (q, k, v, softmax output).
        softmax_bits: bits of the softmax output when ``quantize_attention``.
        softmax_granularity: its step, one per query row (``"per_row"``) or one calibrated per module
            (``"per_tensor"``) — ``QuantConfig.softmax_granularity``.
        branch_ranges: separate activation ranges for the unconditional guidance branch (``QuantConfig``).
        layer_bits: (layer name, weight bits, activation bits) of layers at other bits than the schemes' (mixed
            precision, ``QuantConfig.layer_bits``): part of the network, so the recipe that made it carries it.
        calibration: the FP trajectories calibration data is taken from; its sampler must be the first deployment
            sampler's.
        deployments: the sampler(s) the model is deployed with, first = the one corrections are fitted for.
        corrections: correction configs in application order (``PTQDConfig``, ``TACConfig``, ``TCECConfig``...);
            their seeds must be calibration seeds.
        preset_name: the preset the schemes came from (reports only).
        name: a label for reports (e.g. ``qdiffusion+tac-W4A8``).
    """

    # 2: softmax_granularity (a version-1 recipe meant "per_tensor"); 3: layer_bits (a version-2 recipe: none)
    config_version: ClassVar[int] = 3

    method: Any = field(default_factory=NaiveMethod)
    weights: QScheme = field(default_factory=lambda: preset("W8A8")[0])
    activations: QScheme = field(default_factory=lambda: preset("W8A8")[1])
    keep_fp_roles: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    split_shortcut: bool = False
    quantize_attention: bool = False
    softmax_bits: int = 8
    softmax_granularity: Literal["per_tensor", "per_row"] = "per_row"
    branch_ranges: bool = False
    layer_bits: tuple[tuple[str, int, int | None], ...] = ()
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    deployments: tuple[Deployment, ...] = (Deployment(),)
    corrections: tuple[CorrectionConfig, ...] = ()
    preset_name: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        refuse_strings(self, ("keep_fp_roles", "exclude", "layer_bits", "deployments", "corrections"))
        object.__setattr__(self, "keep_fp_roles", tuple(self.keep_fp_roles))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "layer_bits", tuple(tuple(e) if isinstance(e, list) else e for e in self.layer_bits))
        object.__setattr__(self, "deployments", tuple(self.deployments))
        object.__setattr__(self, "corrections", tuple(self.corrections))
        method_handler(self.method)
        if not self.deployments:
            raise ValueError("Recipe.deployments is empty; give at least one Deployment(sampler=SamplerConfig(...))")
        if any(not isinstance(d, Deployment) for d in self.deployments):
            raise ValueError("Recipe.deployments must hold Deployment objects (sampler + guidance_scale)")
        if self.calibration.sampler != self.sampler:
            raise ValueError(f"Recipe.calibration.sampler ({self.calibration.sampler.key}) must be the first "
                             f"deployment's sampler ({self.sampler.key}): calibrate on the trajectories you deploy "
                             "(set both to the same SamplerConfig)")
        corrections = registered_corrections()
        for index, config in enumerate(self.corrections):
            if type(config) not in corrections:
                raise ValueError(f"Recipe.corrections[{index}]: {type(config).__name__} is not a registered "
                                 f"correction; registered: {sorted(k.__name__ for k in corrections)}")
            if type(config).__name__ == "TFMQConfig":
                raise ValueError(f"Recipe.corrections[{index}]: TFMQ is a quantization method, not a sampler-level "
                                 "correction; use method=TFMQMethod(tfmq=TFMQConfig(...))")
        if self.corrections and len(self.deployments) > 1:
            raise ValueError(f"Recipe has {len(self.deployments)} deployments and a correction stack: correction "
                             "tables are fitted for one (sampler, guidance scale); write one recipe per deployment")
        if getattr(type(self.method), "per_step_tables", False) and len(self.deployments) > 1:
            # the later deployments could never be sampled: tadq sample refuses any other sampler than the tables'
            raise ValueError(f"Recipe has {len(self.deployments)} deployments and method "
                             f"{type(self.method).__name__}, whose per-step tables are built for one (the first "
                             "deployment's sampler); write one recipe per deployment")
        config = self.quant_config()  # the structural fields validate there (roles, granularity, softmax bits)
        check = getattr(self.method, "check_quant_config", None)  # a method's own limits (TFMQ's FSC: no fp8)
        if check is not None:
            check(config)

    # -- derived views ------------------------------------------------------------------------------------------
    @property
    def sampler(self) -> SamplerConfig:
        """The first deployment's sampler: what calibration and the corrections' tables are built for."""
        return self.deployments[0].sampler

    @property
    def guidance_scale(self) -> float:
        return self.deployments[0].guidance_scale

    @property
    def label(self) -> str:
        return self.quant_config().label

    def describe(self) -> str:
        """"W8A8 QDiffusion + TAC": bits, method and correction stack, as the CLI names an artefact everywhere."""
        return f"{self.label} {self.describe_method()}"

    def describe_method(self) -> str:
        """"QDiffusion + TAC": the base method and the correction stack in application order."""
        names = [type(self.method).__name__.removesuffix("Method"),
                 *(type(c).__name__.removesuffix("Config") for c in self.corrections)]
        return " + ".join(names)

    def quant_config(self) -> QuantConfig:
        """The ``QuantConfig`` of the network (what ``tadq_config.json`` records and loading rebuilds)."""
        return QuantConfig(
            weights=self.weights, activations=self.activations, method=self.method.base_method,
            calibration=self.calibration, reconstruction=self.method.reconstruction,
            split_shortcut=self.split_shortcut, quantize_attention=self.quantize_attention,
            softmax_bits=self.softmax_bits, softmax_granularity=self.softmax_granularity, exclude=self.exclude,
            keep_fp_roles=self.keep_fp_roles,
            preset_name=self.preset_name, branch_ranges=self.branch_ranges, layer_bits=self.layer_bits,
        )

    def noise_seeds(self) -> dict[str, int]:
        """Where → seed of every noise the model was calibrated, fitted or chosen on: the calibration trajectories,
        TFMQ's FP trajectories, each correction's fitting pair and held-out selection (only when it chooses). An
        evaluation on one of them scores the model on its own noise."""
        from tadq.registry import correction_for

        seeds = {"calibration.seed": self.calibration.seed}
        tfmq = getattr(self.method, "tfmq", None)
        if isinstance(tfmq, CorrectionConfig):
            seeds["method.tfmq.seed"] = tfmq.seed
        for index, config in enumerate(self.corrections):
            name = type(config).__name__
            seeds[f"corrections[{index}].seed ({name})"] = config.seed
            member = correction_for(config)
            held_out, _ = member.selection_noise()
            if held_out is not None and len(member.candidates()) > 1:
                seeds[f"corrections[{index}]'s held-out selection seed ({name})"] = held_out
        return seeds

    def base(self) -> Recipe:
        """This recipe without its correction stack: the network the corrections are fitted on."""
        return dataclasses.replace(self, corrections=(), name="")

    # -- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def from_quant_config(cls, config: QuantConfig, *, deployments: tuple[Deployment, ...] | None = None,
                          corrections: tuple[CorrectionConfig, ...] = (), name: str = "") -> Recipe:
        """The recipe of a plain ``QuantConfig`` (deployed with its calibration sampler unless told otherwise); a
        ``svdquant`` config gets ``SVDQuantMethod``'s default fitting settings."""
        if config.method == "svdquant":  # was NaiveMethod, which refused the branch and smoothing svdquant fits
            from tadq.svdquant.method import SVDQuantMethod

            method = SVDQuantMethod()
        elif config.method == "qdiffusion":
            method = QDiffusionMethod(reconstruction=config.reconstruction)
        else:
            method = NaiveMethod()
        return cls(method=method, weights=config.weights, activations=config.activations,
                   keep_fp_roles=config.keep_fp_roles, exclude=config.exclude, split_shortcut=config.split_shortcut,
                   quantize_attention=config.quantize_attention, softmax_bits=config.softmax_bits,
                   softmax_granularity=config.softmax_granularity, branch_ranges=config.branch_ranges,
                   layer_bits=config.layer_bits, calibration=config.calibration,
                   deployments=deployments or (Deployment(config.calibration.sampler),),
                   corrections=corrections, preset_name=config.preset_name, name=name)

    @classmethod
    def from_preset(cls, preset_name: str, /, **fields: Any) -> Recipe:
        """``Recipe.from_preset("W4A8", method=QDiffusionMethod(), corrections=(TACConfig(),))``."""
        weights, activations = preset(preset_name)
        key = preset_key(preset_name)
        return cls(**{"weights": weights, "activations": activations, "preset_name": key, **fields})


# -- JSON -------------------------------------------------------------------------------------------------------------
def _payload_kind(payload: Any) -> str:
    """What a JSON document that is not a recipe holds, in words: an object without a "type" read "a None"."""
    if not isinstance(payload, Mapping):
        return f"a JSON {type(payload).__name__}"
    return f"a {payload['type']!r}" if "type" in payload else "an object without a \"type\""


def recipe_from_dict(payload: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """A ``Recipe`` from its ``config_to_dict`` form; ``ValueError`` naming the field for anything unknown."""
    if not isinstance(payload, Mapping) or payload.get("type") != "Recipe":
        # the current version: a recipe written as an older one is migrated (version 1: per-tensor softmax steps)
        hint = ("; a QuantConfig file is read by tadq quantize --config"
                if isinstance(payload, Mapping) and payload.get("type") == "QuantConfig" else "")
        raise ValueError(f"{where} holds {_payload_kind(payload)}, not a Recipe ({{\"type\": \"Recipe\", "
                         f"\"version\": {Recipe.config_version}, \"data\": {{...}}}}; see docs/recipes.md{hint})")
    return config_from_dict(dict(payload))


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe JSON file (``tadq quantize --recipe``), or the recipe of a folder that holds one: the
    ``recipe.json`` of a ``tadq recipe --out`` search folder, the ``tadq_recipe.json`` of an artefact."""
    path = Path(path)
    for name in ("recipe.json", "tadq_recipe.json"):
        if path.is_dir() and (path / name).is_file():
            path = path / name
            break
    if path.is_dir():
        raise FileNotFoundError(f"recipe {path} is a folder without a recipe.json (a tadq recipe search) or "
                                "tadq_recipe.json (an artefact); give the recipe's JSON file")
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    # UTF-8 named, devices and pipes refused, a key given twice refused (json.loads kept the last one silently)
    payload = read_json_file(path, "recipe", strict_keys=True)
    try:
        return recipe_from_dict(payload, str(path))
    except ValueError as error:  # named once: "recipe X: X holds ..." said the path twice
        message = str(error)
        raise ValueError(message if message.startswith(str(path)) else f"recipe {path}: {message}") from error


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write ``recipe`` as JSON through a temp file of this process and a rename: a failed or killed write (a full
    disk) left a truncated recipe under ``path``, in place of the one that was there."""
    from tadq.utils import atomic_write_text

    atomic_write_text(json.dumps(config_to_dict(recipe), indent=2) + "\n", path)


def override_recipe(recipe: Recipe, changes: Mapping[str, Any], *, flag: str | None = None) -> Recipe:
    """``recipe`` with dotted fields replaced, e.g. ``{"method.reconstruction.weight_iters": 2,
    "corrections.0.num_samples": 8}`` (``tadq quantize --set``); a wrong path raises naming it. ``sampler.<field>``
    sets the deployment sampler and the calibration sampler together (they must be one sampler).

    The result does not depend on the order of ``changes``: every config is rebuilt once, bottom-up, with all of its
    changed fields at the same time, so fields that constrain each other are checked together even across configs
    (``sampler.num_steps`` with ``calibration.num_steps_kept``). Two paths of which one lies inside the other
    (``calibration`` and ``calibration.seed``), or that set one field to two values (``sampler.num_steps`` and
    ``calibration.sampler.num_steps``), would make the order decide and are refused naming both.

    ``flag``: the command-line option the changes came from (``"--set"``), named in errors as ``--set PATH``;
    without one an error names ``changes['PATH']``, as the caller wrote it."""
    tree: dict[str, Any] = {}
    for path, value in changes.items():
        parts = tuple(path.split("."))
        if parts[0] == "sampler":  # one sampler: the calibration's and the first deployment's
            targets = [("calibration", "sampler", *parts[1:]), ("deployments", "0", "sampler", *parts[1:])]
        else:
            targets = [parts]
        for target in targets:
            _insert(tree, target, _Setting(value, path, f"{flag} {path}" if flag else f"changes[{path!r}]"))
    return _apply(recipe, tree)


@dataclass(frozen=True)
class _Setting:
    """One ``--set`` value at the end of a path of ``override_recipe``'s tree, with the path the user wrote and how
    errors name it (``--set PATH`` or ``changes['PATH']``)."""

    value: Any
    path: str
    label: str


def _insert(tree: dict[str, Any], parts: tuple[str, ...], setting: _Setting) -> None:
    """Put ``setting`` at ``parts`` in ``tree``; refuse a path inside or around another one (their order would
    decide which wins) and one field set to two different values."""
    node = tree
    for depth, head in enumerate(parts):
        below = node.get(head)
        if isinstance(below, _Setting) and depth < len(parts) - 1:
            raise ValueError(f"{below.label} and {setting.label} overlap: the second lies inside the first, "
                             "so their order would decide the result; give one")
        if depth == len(parts) - 1:
            if isinstance(below, dict):
                inner = next(iter(_settings(below)))
                raise ValueError(f"{setting.label} and {inner.label} overlap: the second lies inside the "
                                 "first, so their order would decide the result; give one")
            if isinstance(below, _Setting) and below.value != setting.value:
                raise ValueError(f"{below.label}={below.value!r} and {setting.label}={setting.value!r} "
                                 "set the same field to different values; give one")
            if below is None:
                node[head] = setting
            return
        node = node.setdefault(head, {})


def _settings(tree: dict[str, Any]) -> list[_Setting]:
    """Every setting in ``tree``, depth first."""
    found: list[_Setting] = []
    for below in tree.values():
        found.extend(_settings(below) if isinstance(below, dict) else [below])
    return found


def _where(tree: dict[str, Any]) -> str:
    """The settings a failure at ``tree`` comes from, as the user wrote them (``--set a, --set b``)."""
    return ", ".join(dict.fromkeys(setting.label for setting in _settings(tree)))


def _apply(node: Any, tree: dict[str, Any]) -> Any:
    """``node`` rebuilt once with every field of ``tree`` replaced (list items by index), each changed child first."""
    def new_value(old: Any, below: Any) -> Any:
        return _coerce(old, below.value) if isinstance(below, _Setting) else _apply(old, below)

    if isinstance(node, tuple):
        items = list(node)
        for head, below in tree.items():
            if not head.isdigit() or int(head) >= len(node):
                raise ValueError(f"{_where({head: below})}: {head!r} is not an index of a {len(node)}-item "
                                 "list")
            items[int(head)] = new_value(items[int(head)], below)  # a config object replaces a config item
        return tuple(items)
    if not dataclasses.is_dataclass(node):
        head = next(iter(tree))
        raise ValueError(f"{_where(tree)}: {type(node).__name__} has no field {head!r}")
    names = [f.name for f in dataclasses.fields(node)]
    for head, below in tree.items():
        if head not in names:
            raise ValueError(f"{_where({head: below})}: {type(node).__name__} has no field {head!r}; its "
                             f"fields are {names}")
    fields = {head: new_value(getattr(node, head), below) for head, below in tree.items()}
    try:
        return dataclasses.replace(node, **fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{_where(tree)}: {error}") from error


def _coerce(old: Any, value: Any) -> Any:
    """A JSON-decoded value in the shape of the field it replaces (lists → tuples, config dicts → configs)."""
    if isinstance(value, dict) and "type" in value:
        return config_from_dict(value)
    if isinstance(value, list):
        return tuple(config_from_dict(v) if isinstance(v, dict) else v for v in value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# as QuantConfig's: version 2 added softmax_granularity (per-tensor before), version 3 layer_bits (none before)
register_migration("Recipe", 1, field_added("softmax_granularity", "per_tensor"))
register_migration("Recipe", 2, field_added("layer_bits", []))
