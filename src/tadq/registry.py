"""Registries: model class → adapter, correction config type → correction class, config name → config type.

A leaf module: it imports nothing from tadq, so every part of the package can register itself here without an
import cycle. The built-in adapters, corrections and configs register when their modules are imported; every lookup
here first imports them all (``load_builtins``, with the loader ``tadq/__init__.py`` installs), so a lookup sees
every built-in registration whatever was imported before it, while ``import tadq`` itself (and ``tadq --help``)
imports none of diffusers.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # torch is imported where a model is looked up: ``import tadq`` (and ``tadq --help``) needs none
    from torch import nn

__all__ = [
    "ModelFamily", "model_family", "registered_families", "register_adapter", "adapter_for", "registered_adapters",
    "register_correction", "correction_for", "registered_corrections", "register_config_type",
    "registered_config_types", "load_builtins", "set_builtin_loader",
]

T = TypeVar("T")


@dataclass(frozen=True)
class ModelFamily:
    """One registration per model family: what loaders, artefacts and methods need to know about it.

    Args:
        model_class: the diffusers denoiser class; exactly this class (a subclass, e.g. diffusers'
            ``DreamLiteUNetModel`` of ``UNet2DConditionModel``, builds other blocks and needs its own).
        adapter_class: the ``ModelAdapter`` that names every layer's role for this class.
        subfolder: the denoiser's folder inside a diffusers pipeline (``unet``, ``transformer``).
        pipeline_class: the diffusers pipeline class an artefact's ``model_index.json`` names (the family's
            default, see ``pipeline_for``).
        pipeline_class_for: for a model class shared by several pipelines (``UNet2DConditionModel``: Stable
            Diffusion and SDXL), a function of the model's config (``model.config`` or its ``config.json`` dict)
            returning the pipeline class; ``None``: always ``pipeline_class``.
    """

    model_class: type[nn.Module]
    adapter_class: type
    subfolder: str
    pipeline_class: str
    pipeline_class_for: Callable[[Mapping[str, Any]], str] | None = None

    @property
    def name(self) -> str:
        return self.model_class.__name__

    def pipeline_for(self, config: Mapping[str, Any]) -> str:
        """The diffusers pipeline class of the model with this config (what writers of ``model_index.json`` use)."""
        return self.pipeline_class if self.pipeline_class_for is None else self.pipeline_class_for(config)


_ADAPTERS: dict[type[nn.Module], type] = {}
_FAMILIES: dict[str, ModelFamily] = {}
_CORRECTIONS: dict[type, type] = {}
_CONFIG_TYPES: dict[str, type] = {}

_builtin_loader: Callable[[], None] | None = None
_builtins = "pending"  # "loading" while the loader runs (a lookup inside it reads the tables as they are), "loaded"
_builtins_lock = threading.RLock()  # another thread's first lookup waits for the tables to be filled


def set_builtin_loader(loader: Callable[[], None]) -> None:
    """``loader`` imports the modules of the built-in registrations; ``tadq/__init__.py`` sets it, and since Python
    runs a package's ``__init__`` before any of its modules, it is set before anything can look up."""
    global _builtin_loader
    _builtin_loader = loader


def load_builtins() -> None:
    """Import the built-in adapters, corrections, methods and configs (once), so the tables hold them all; every
    lookup calls it first. An error of the loader (an old diffusers' ``ImportError``) is raised again by the next
    lookup rather than leaving the tables half-filled without a word."""
    global _builtins
    if _builtins == "loaded" or _builtin_loader is None:
        return
    with _builtins_lock:
        if _builtins != "pending":  # loaded by another thread meanwhile, or a lookup made by the loader's imports
            return
        _builtins = "loading"
        try:
            _builtin_loader()
        except BaseException:
            _builtins = "pending"
            raise
        _builtins = "loaded"


def register_config_type(cls: type) -> type:
    """Class decorator: make a frozen config dataclass serialisable by ``tadq.config.config_to_dict``/``_from_dict``.

    Method folders (e.g. ``tadq.corrections.ptqd``) register their own configs, so ``tadq.config`` never imports them.

    Raises:
        TypeError: ``cls`` is not a dataclass.
        ValueError: another class is already registered under the same name.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"register_config_type takes a dataclass type, got {cls!r}")
    known = _CONFIG_TYPES.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"a different config class is already registered as {cls.__name__!r} ({known.__module__}); "
                         "rename one of them")
    _CONFIG_TYPES[cls.__name__] = cls
    _check_fields_first(cls)
    return cls


def _check_fields_first(cls: type) -> None:
    """Run ``check_config_fields`` before the class's own ``__post_init__`` (or instead of a missing one), so every
    registered config refuses a wrong kind of value naming the field, on the values as given (the class may
    normalise them: ``tuple("conv_in")`` splits a string into letters). When a field is refused, the class still
    runs: its own ``ValueError`` (which names the fix) wins over the generic one; a ``TypeError`` or
    ``AttributeError`` it raises on the bad value does not."""
    from tadq.config_fields import check_config_fields

    own = cls.__dict__.get("__post_init__")
    hooked = hasattr(cls, "__post_init__")  # the dataclass's generated __init__ calls it only if it existed then

    def run_own(self) -> None:
        if own is not None:
            own(self)
        elif (inherited := getattr(super(cls, self), "__post_init__", None)) is not None:
            inherited()

    def __post_init__(self) -> None:
        try:
            check_config_fields(self)
        except ValueError as generic:
            try:
                run_own(self)
            except ValueError:
                raise
            except (TypeError, AttributeError):
                raise generic from None
            raise
        run_own(self)

    __post_init__.__doc__ = getattr(own, "__doc__", None)
    cls.__post_init__ = __post_init__
    if not hooked:  # QDiffusionMethod, a user's method config: no check ran, reconstruction=0 was taken
        generated = cls.__init__

        @functools.wraps(generated)
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            generated(self, *args, **kwargs)
            self.__post_init__()

        cls.__init__ = __init__


def registered_config_types() -> dict[str, type]:
    """Config name → config class, for every registered config (the live table: ``config_from_dict`` reads it)."""
    load_builtins()
    return _CONFIG_TYPES


def register_adapter(
    model_class: type[nn.Module], *, subfolder: str, pipeline_class: str,
    pipeline_class_for: Callable[[Mapping[str, Any]], str] | None = None,
) -> Callable[[type[T]], type[T]]:
    """Class decorator: use the decorated adapter for ``model_class`` (exactly that class: an unregistered subclass is
    refused by ``adapter_for``, as ``model_family`` refuses its name when an artefact is saved or loaded).

    ``subfolder`` and ``pipeline_class`` describe the family's diffusers layout; model loading and artefacts read
    them from here (``model_family``), so adding a family means writing one adapter. ``pipeline_class_for``
    (config → pipeline class) lets one model class serve several pipelines (``ModelFamily.pipeline_for``).
    """

    def decorate(adapter_class: type[T]) -> type[T]:
        _ADAPTERS[model_class] = adapter_class
        _FAMILIES[model_class.__name__] = ModelFamily(model_class, adapter_class, subfolder, pipeline_class,
                                                      pipeline_class_for)
        return adapter_class

    return decorate


def registered_families() -> dict[str, ModelFamily]:
    """Model class name → its registration, for every registered family."""
    load_builtins()
    return dict(_FAMILIES)


def model_family(class_name: str, where: str = "") -> ModelFamily:
    """The registration of the model class named ``class_name`` (as in a diffusers ``config.json``).

    Raises:
        ValueError: no family is registered under that name; the message lists the supported ones.
    """
    load_builtins()
    family = _FAMILIES.get(class_name)
    if family is None:
        place = f"{where} holds a {class_name!r}" if where else f"{class_name!r} is not supported"
        raise ValueError(f"{place}; supported model classes: {sorted(_FAMILIES)}. "
                         "Add one with @tadq.registry.register_adapter(YourModelClass).")
    return family


def registered_adapters() -> dict[type[nn.Module], type]:
    load_builtins()
    return dict(_ADAPTERS)


def adapter_for(model: nn.Module):
    """The adapter instance for ``model``'s class.

    Only a registered class is adapted. A subclass of one is refused too, naming its registered ancestor: diffusers'
    own subclasses replace the parent's blocks (``DreamLiteUNetModel`` builds depthwise-separable resnets and
    grouped-query attention inside a ``UNet2DConditionModel``), so the parent's adapter would give most layers the
    role ``other`` and install an attention processor that drops the subclass's; and an artefact names the class
    itself (``model_family``), so a quantized subclass could not be saved after all the calibration work. Register
    the subclass (with the parent's adapter where its layout is the parent's) to adapt it.

    Raises:
        TypeError: ``model``'s class is not registered; the message lists the supported classes.
    """
    from torch import nn

    load_builtins()
    klass = type(model)
    if klass in _ADAPTERS:
        return _ADAPTERS[klass]()
    supported = ", ".join(sorted(k.__name__ for k in _ADAPTERS))
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule wraps the module it compiles
    if isinstance(inner, nn.Module) and type(inner) in _ADAPTERS:
        raise TypeError(f"no tadq adapter for {klass.__name__}, torch.compile's wrapper of a "
                        f"{type(inner).__name__}: quantize the module itself (model._orig_mod); tadq replaces its "
                        "layers, so compile the quantized model instead (backend 'int8-compiled')")
    inner = getattr(model, "module", None)  # nn.DataParallel / DistributedDataParallel wrap theirs as .module
    if isinstance(inner, nn.Module) and type(inner) in _ADAPTERS:
        raise TypeError(f"no tadq adapter for {klass.__name__}, a wrapper of a {type(inner).__name__}: pass the "
                        "module itself (model.module); tadq runs one device per call (quantize or sample with "
                        "device=)")
    parent = next((k for k in klass.__mro__[1:] if k in _ADAPTERS), None)
    if parent is not None:
        family = _FAMILIES[parent.__name__]
        raise TypeError(
            f"no tadq adapter for {klass.__name__}, a subclass of {parent.__name__}: a subclass may build other "
            f"blocks or call them otherwise, so tadq does not adapt it as a {parent.__name__}; supported: "
            f"{supported}. If its layers and forward are {parent.__name__}'s, register it: "
            f"tadq.registry.register_adapter({klass.__name__}, subfolder={family.subfolder!r}, "
            f"pipeline_class=...)({_ADAPTERS[parent].__name__})."
        )
    raise TypeError(
        f"no tadq adapter for {klass.__name__}; supported: {supported}. "
        "Add one with @tadq.registry.register_adapter(YourModelClass)."
    )


def register_correction(config_type: type) -> Callable[[type[T]], type[T]]:
    """Class decorator: build the decorated ``Correction`` for configs of ``config_type`` (docs/architecture.md).

    The config type is also registered with ``register_config_type`` so stacks save as JSON, and the
    correction class gets ``config_type`` as a class attribute.
    """
    register_config_type(config_type)

    def decorate(correction_class: type[T]) -> type[T]:
        known = _CORRECTIONS.get(config_type)
        if known is not None and known is not correction_class:
            raise ValueError(f"{config_type.__name__} is already handled by {known.__name__}")
        _CORRECTIONS[config_type] = correction_class
        correction_class.config_type = config_type  # type: ignore[attr-defined]
        return correction_class

    return decorate


def registered_corrections() -> dict[type, type]:
    """Config type → correction class for every registered correction (built-in ones included)."""
    load_builtins()
    return dict(_CORRECTIONS)


def correction_for(config: object):
    """A fresh (unfitted) correction for ``config``; raises ``TypeError`` listing the registered configs otherwise."""
    registry = registered_corrections()
    klass = registry.get(type(config))
    if klass is None:
        supported = ", ".join(sorted(k.__name__ for k in registry))
        raise TypeError(
            f"no tadq correction for {type(config).__name__}; registered: {supported}. "
            "Add one with @tadq.registry.register_correction(YourConfig)."
        )
    return klass(config)
