"""Load a quantized denoiser saved by ``tadq.io.save``: rebuild the structure ``quantize`` built, then set each
quantized weight to Δ·(codes − z) (bit-identical outputs to the saved model)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from tadq.adapters.freeu import apply_freeu
from tadq.config import NewerVersionError, QuantConfig, config_from_dict, config_version
from tadq.corrections.io import CORRECTIONS_FILE, load_corrections
from tadq.denoiser import QuantizedDenoiser
from tadq.io.manifest import MANIFEST_FILE, check_listed, check_saved_file, verify_manifest
from tadq.io.save import (
    ARTEFACT_FORMAT,
    CODES_SUFFIX,
    CONFIG_FILE,
    FORMAT_VERSION,
    QUANT_MAP_FILE,
    RECIPE_FILE,
    WEIGHTS_FILE,
    ZERO_POINT_DTYPES,
    _covered_keys,
    _network_state,
    _weight_entries,
    _WeightEntry,
    integer_zero_points,
    unpack_codes,
)
from tadq.prepare import build_quantized_structure
from tadq.quant.quantizer import Quantizer, off_grid_zero_point, zero_point_bounds
from tadq.recipe import Recipe, recipe_from_dict
from tadq.registry import model_family
from tadq.safefiles import DamagedFileError, read_json_file, require_finite
from tadq.sampling.config import check_drivable
from tadq.utils import library_versions

__all__ = ["load_quantized", "is_quantized_artefact", "read_recipe"]

logger = logging.getLogger(__name__)


def is_quantized_artefact(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tadq artefact (as opposed to a plain diffusers model folder)."""
    return (Path(directory) / CONFIG_FILE).is_file()


# the files load_quantized reads (besides the denoiser's config): each must be covered by the manifest
LOADED_FILES = (CONFIG_FILE, QUANT_MAP_FILE, WEIGHTS_FILE, RECIPE_FILE, CORRECTIONS_FILE, "model_index.json",
                "scheduler/scheduler_config.json")


# every key a tadq_config.json has held: the loader reads or ignores each knowingly ("sizes": reports only)
META_KEYS = frozenset({"format", "format_version", "model_class", "denoiser_folder", "adapter", "quant_config",
                       "versions", "sizes", "corrections", "freeu"})


def _writer(meta: dict[str, Any]) -> str:
    """The tadq version that wrote ``meta`` as recorded, or "unknown"."""
    versions = meta.get("versions")
    return str(versions.get("tadq", "unknown")) if isinstance(versions, dict) else "unknown"


def _read_meta(path: Path) -> dict[str, Any]:
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file; a tadq artefact is a folder (the --out of `tadq quantize`)")
    if not path.is_dir():
        raise FileNotFoundError(f"quantized model folder {path} does not exist")
    if not is_quantized_artefact(path):
        raise ValueError(f"{path} is not a tadq artefact ({CONFIG_FILE} is missing): write one with `tadq quantize "
                         "--out` or QuantizedDenoiser.save_pretrained; load FP folders with tadq.models")
    if not verify_manifest(path, required=LOADED_FILES):
        logger.warning("%s has no %s (saved by an older tadq): its files cannot be checked for damage", path,
                       MANIFEST_FILE)
    meta = read_json_file(path / CONFIG_FILE, "artefact config")
    if not isinstance(meta, dict) or not isinstance(meta.get("quant_config"), dict):
        raise ValueError(f"{path / CONFIG_FILE} is not a tadq artefact config (no quant_config object); save the "
                         "artefact again")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{path / CONFIG_FILE}: format_version is {version!r}, not an artefact format (an integer "
                         f">= 1); save the artefact again")
    if version > FORMAT_VERSION:
        raise NewerVersionError(f"{path} uses artefact format {version!r}, newer than this tadq reads "
                                f"({FORMAT_VERSION}); upgrade tadq to load it")
    if meta.get("format") != ARTEFACT_FORMAT:
        raise ValueError(f"{path / CONFIG_FILE}: format is {meta.get('format')!r}, not {ARTEFACT_FORMAT!r}: it is not "
                         "a tadq artefact config; save the artefact again")
    unknown = sorted(set(meta) - META_KEYS)
    if unknown:  # a setting added later (as "freeu" was, format unchanged) would be dropped without a word
        raise NewerVersionError(f"{path / CONFIG_FILE} has keys {unknown} this tadq ({library_versions()['tadq']}) "
                                f"does not know (written by tadq {_writer(meta)}): a newer tadq records settings "
                                "there that change the model; upgrade tadq to load it")
    folder = meta.get("denoiser_folder", "unet")
    if not (isinstance(folder, str) and folder and folder.isprintable() and "/" not in folder and "\\" not in folder
            and folder not in (".", "..")):
        raise ValueError(f"{path / CONFIG_FILE}: denoiser_folder {folder!r} is not the name of a folder inside the "
                         "artefact (e.g. 'unet'); save the artefact again")
    check_listed(path, [f"{folder}/config.json"])
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    if versions.get("tadq") != library_versions()["tadq"]:
        logger.warning("%s was written by tadq %s (this is %s)", path, versions.get("tadq"),
                       library_versions()["tadq"])
    return meta


# torch.nn.init's in-place initializers (uniform_, kaiming_uniform_, zeros_...), which modules' reset_parameters call
WEIGHT_INITIALIZERS = tuple(name for name in dir(torch.nn.init) if name.endswith("_") and not name.startswith("_")
                            and callable(getattr(torch.nn.init, name)))


@contextlib.contextmanager
def skipped_weight_init() -> Iterator[None]:
    """``torch.nn.init``'s initializers leave their tensor as allocated inside the block (as diffusers'
    ``from_pretrained`` builds a model): for an architecture whose every tensor is then loaded. Process-wide, like
    diffusers' own: build nothing else in another thread meanwhile."""
    saved = {name: getattr(torch.nn.init, name) for name in WEIGHT_INITIALIZERS}

    def left_as_allocated(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return tensor

    for name in saved:
        setattr(torch.nn.init, name, left_as_allocated)
    try:
        yield
    finally:
        for name, initializer in saved.items():
            setattr(torch.nn.init, name, initializer)


def _build_fp_model(folder: Path, model_class: Any) -> nn.Module:
    """The FP architecture from ``folder/config.json`` (no weights: they are the artefact's codes)."""
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the artefact is incomplete, save it again")
    config = read_json_file(file, "model config")
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if model_class is not None and class_name != model_class:
        raise ValueError(f"{file} describes a {class_name!r}, but {CONFIG_FILE} records a {model_class!r}: the "
                         "artefact's files belong to different models; save it again")
    klass = model_family(str(class_name), where=str(folder)).model_class
    try:
        # every parameter and buffer is overwritten by the artefact's tensors: torch.nn.init is skipped (it cost a
        # random draw per weight, most of a large model's build time); a module that draws without it does so from
        # a forked generator, so loading leaves the caller's torch.manual_seed stream where it was
        with torch.random.fork_rng(devices=[]), skipped_weight_init():
            return klass.from_config(klass.load_config(folder)).eval()
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as error:  # diffusers' own
        raise ValueError(f"{file} does not build a {class_name} ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}); save the artefact again") from error


def _load_scheduler(path: Path) -> SchedulerMixin | None:
    config_file = path / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        logger.warning("%s has no scheduler; pass the model's training scheduler to tadq.sample yourself", path)
        return None
    config = read_json_file(config_file, "scheduler config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not an object; save the artefact again")
    klass = getattr(diffusers, str(config.get("_class_name")), None)
    if not (isinstance(klass, type) and issubclass(klass, SchedulerMixin)):
        raise ValueError(f"{config_file} names an unknown scheduler class {config.get('_class_name')!r}")
    try:
        check_drivable(config.get("_class_name"), config)  # as tadq.models does for an FP folder
        return klass.from_config(config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:
        raise ValueError(f"{config_file}: {' '.join(str(error).split())[:300]}") from error


def _owner(qmodel: nn.Module, key: str, entries: dict[str, _WeightEntry]) -> str:
    """'<module> (<class>)' that expects a state or codes key, for error messages."""
    if key.endswith(CODES_SUFFIX):
        name = entries[key[: -len(CODES_SUFFIX)]].module
    else:
        name = key.rpartition(".")[0]
    return f"{name or '<root>'} ({type(qmodel.get_submodule(name)).__name__})"


def _codes_info(handle, file: Path) -> dict[str, dict[str, Any]]:
    """The ``tadq_codes`` metadata (weight → bits, qmin, shape), checked to be a JSON object of objects."""
    try:
        info = json.loads((handle.metadata() or {}).get("tadq_codes", "{}"))
    except ValueError as error:
        raise DamagedFileError(f"{file}: its tadq_codes metadata is not valid JSON ({error}); save the artefact "
                               "again") from error
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DamagedFileError(f"{file}: its tadq_codes metadata is not an object of {{bits, qmin, shape}} objects; "
                               "save the artefact again")
    return info


def _codes_storage(bits: int, qmin: int, shape: tuple[int, ...]) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) ``pack_codes`` stores the codes of a weight in: two nibbles per uint8 byte up to 4 bits,
    else int8 (signed grid) or uint8, shaped as the weight."""
    if bits <= 4:
        return torch.uint8, ((int(torch.Size(shape).numel()) + 1) // 2,)
    return (torch.int8 if qmin < 0 else torch.uint8), shape


def _check_stored(file: Path, key: str, stored: Tensor, dtype: torch.dtype, shape: tuple[int, ...],
                  owner: str | Callable[[], str]) -> None:
    """Refuse a stored tensor of another dtype or shape than the rebuilt model's, naming ``owner`` (a callable is
    only called for the error: looking up every key's module took a get_submodule walk per tensor of every load)."""
    if stored.dtype != dtype or tuple(stored.shape) != tuple(shape):
        owner = owner() if callable(owner) else owner
        raise ValueError(f"{file}: {key!r} is {str(stored.dtype).removeprefix('torch.')} {list(stored.shape)}, but "
                         f"{owner} expects {str(dtype).removeprefix('torch.')} {list(shape)}; the file was altered "
                         "or saved with another structure: save the artefact again")


def _check_quantizer_state(qmodel: QuantizedDenoiser, file: Path) -> None:
    """Every calibrated quantizer's stored grid is one tadq can have written: range set, Δ finite and > 0, z an
    integer on [qmin, qmax] (0 for a symmetric grid). A damaged Δ or z otherwise loads and samples garbage, or
    fails later inside a torch kernel."""
    for name, quantizer in qmodel.named_modules():
        if not isinstance(quantizer, Quantizer) or not quantizer.enabled or quantizer.scheme.dynamic:
            continue
        scheme = quantizer.scheme
        where = f"{file}: quantizer {name} ({scheme.describe()})"
        if not bool(quantizer.initialized):
            raise ValueError(f"{where} has no range (initialized is false); save the artefact again")
        scale, zero_point = quantizer.scale, quantizer.zero_point
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            bad = scale[~(torch.isfinite(scale) & (scale > 0))].reshape(-1)[0].item()
            raise ValueError(f"{where} has step size Δ = {bad}; Δ must be finite and > 0: save the artefact again")
        bad = off_grid_zero_point(zero_point, scheme)
        if bad is not None:
            low, high = zero_point_bounds(scheme)
            raise ValueError(f"{where} has zero point z = {bad}; z must be an integer in [{low}, {high}]: save the "
                             "artefact again")


@torch.no_grad()
def _load_tensors(qmodel: QuantizedDenoiser, file: Path, version: int = FORMAT_VERSION) -> None:
    """Load FP tensors and quantizer state, then set every quantized weight to Δ·(codes − z).

    Every stored tensor must have exactly the dtype and shape the rebuilt model holds (``load_state_dict`` would
    cast int64 scales or float64 weights without a word), codes must lie on their grid and every quantizer's
    (Δ, z) must be valid before any weight is decoded. From format 2 on, calibrated zero points are stored in the
    integer dtype ``integer_zero_points`` names (format 1: float32) and widened to float32 here, exactly.
    """
    entries = _weight_entries(qmodel)
    state = _network_state(qmodel)
    float_keys = set(state) - _covered_keys(state, entries)
    expected = float_keys | {key + CODES_SUFFIX for key in entries}
    with safe_open(str(file), framework="pt") as handle:
        stored = set(handle.keys())
        missing = sorted(expected - stored)
        if missing:
            more = f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""
            raise ValueError(f"{file.name} lacks {missing[0]!r}, expected by module "
                             f"{_owner(qmodel, missing[0], entries)}{more}; the artefact is incomplete or was saved "
                             "with another structure: save it again")
        unexpected = sorted(stored - expected)
        if unexpected:
            raise ValueError(f"{file.name} has keys this structure does not expect, e.g. {unexpected[:3]}; it was "
                             "saved by a tadq with another layer structure: save it again with this version")
        codes_info = _codes_info(handle, file)
        tensors = {key: handle.get_tensor(key) for key in float_keys}
        stored_as = integer_zero_points(qmodel) if version >= 2 else {}
        for key in sorted(float_keys):
            expected = stored_as.get(key, state[key].dtype)
            if (version >= 2 and key not in stored_as and key.endswith("zero_point")
                    and tensors[key].dtype in ZERO_POINT_DTYPES):
                # saved by a calibrated quantizer that this structure rebuilds as another kind (a dynamic one, say):
                # widened as format 1 held it, so that quantizer's own state checks say what differs
                expected = tensors[key].dtype
            _check_stored(file, key, tensors[key], expected, tuple(state[key].shape),
                          lambda key=key: _owner(qmodel, key, entries))
            tensors[key] = tensors[key].to(state[key].dtype)  # an integer zero point widened exactly; else as it is
        try:
            qmodel.load_state_dict(tensors, strict=False)
        except RuntimeError as error:
            raise ValueError(f"{file.name} does not fit the rebuilt model: {error}") from error
        except ValueError as error:  # a quantizer's own check of its state (an off-grid zero point)
            raise ValueError(f"{file}: {error}; save the artefact again") from error
        _check_quantizer_state(qmodel, file)
        for key, entry in entries.items():
            scheme, shape = entry.quantizer.scheme, tuple(entry.tensor.shape)
            info = codes_info.get(key, {})
            if (info.get("bits"), info.get("qmin"), info.get("shape")) != (scheme.bits, scheme.qmin, list(shape)):
                raise ValueError(f"{file.name}: codes of {key!r} were saved as {info}, but the rebuilt layer expects "
                                 f"{scheme.bits} bits, qmin {scheme.qmin}, shape {list(shape)}: save it again")
            packed = handle.get_tensor(key + CODES_SUFFIX)
            _check_stored(file, key + CODES_SUFFIX, packed, *_codes_storage(scheme.bits, scheme.qmin, shape),
                          f"{entry.module} ({scheme.bits}-bit codes)")
            codes = unpack_codes(packed, scheme.bits, scheme.qmin, shape)
            if bool(((codes < scheme.qmin) | (codes > scheme.qmax)).any()):
                raise ValueError(f"{file}: {key + CODES_SUFFIX!r} holds codes outside [{scheme.qmin}, "
                                 f"{scheme.qmax}] of its {scheme.bits}-bit grid; save the artefact again")
            scale = entry.quantizer._broadcast(entry.quantizer.scale, entry.tensor)
            zero_point = entry.quantizer._broadcast(entry.quantizer.zero_point, entry.tensor)
            entry.tensor.copy_((codes - zero_point) * scale)


def load_quantized(directory: str | Path, *, backend: str = "fake") -> tuple[QuantizedDenoiser, SchedulerMixin | None]:
    """(quantized denoiser, training scheduler or ``None``) from a folder written by ``save_quantized``.

    ``backend`` (``tadq.backends``): ``"fake"`` is the float simulation; ``"int8"`` converts the loaded model in
    place to integer kernels (float weights dropped), refused before loading if unavailable here.

    Raises:
        FileNotFoundError: the folder (or its denoiser config) does not exist.
        ValueError: not a tadq artefact, a newer format, or keys missing / not matching the rebuilt structure.
    """
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"load_quantized takes a folder path (str or Path), got {type(directory).__name__}")
    from tadq.backends import check_backend, check_config, to_backend

    check_backend(backend)  # an unknown or unavailable backend before the folder is read
    path = Path(directory)
    meta = _read_meta(path)
    try:
        config = config_from_dict(meta["quant_config"])
    except NewerVersionError as error:  # not damage: saving again with this tadq cannot help
        raise NewerVersionError(f"{path / CONFIG_FILE}: quant_config: {error}") from error
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: quant_config is malformed ({type(error).__name__}: {error}); save "
                         "the artefact again") from error
    # before building anything, as to_backend would refuse it: fp8 or dynamic activations, SVDQuant's transformed
    # layers, block-wise weights, 8-bit weights (the model's, or mixed-precision layers') on a CPU without VNNI
    check_config(backend, config)
    model = _build_fp_model(path / meta.get("denoiser_folder", "unet"), meta.get("model_class"))
    apply_freeu(model, meta.get("freeu"), str(path / CONFIG_FILE))  # a runtime setting its config does not hold
    try:  # the plan's own checks of the config against the model (a layer_bits entry naming no quantized layer)
        qmodel = build_quantized_structure(model, config, init_weight_range=False, copy_model=False)  # built for it
    except ValueError as error:
        raise _same_kind(error, f"{path / CONFIG_FILE}: quant_config does not fit the {type(model).__name__} "
                                f"its denoiser config builds: {error}; save the artefact again") from error
    for name in (QUANT_MAP_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: the artefact is incomplete, save it again")
    saved_map = read_json_file(path / QUANT_MAP_FILE, "quantization map")
    if not isinstance(saved_map, dict):
        raise ValueError(f"{path / QUANT_MAP_FILE} holds a JSON {type(saved_map).__name__}, not an object; save the "
                         "artefact again")
    if saved_map != json.loads(json.dumps(qmodel.quantization_map())):
        differing = sorted(k for k in set(saved_map) | set(qmodel.quantization_map())
                           if saved_map.get(k) != qmodel.quantization_map().get(k))
        raise ValueError(f"{QUANT_MAP_FILE} differs from the structure rebuilt from {CONFIG_FILE} at layers "
                         f"{differing[:5]}; the artefact was saved by a tadq that plans layers differently")
    if qmodel.adapter.name != meta.get("adapter"):
        raise ValueError(f"{path} was saved with adapter {meta.get('adapter')!r}, this tadq uses "
                         f"{qmodel.adapter.name!r} for {type(model).__name__}")
    try:
        _load_tensors(qmodel, path / WEIGHTS_FILE, meta["format_version"])
    except (OSError, RuntimeError, SafetensorError) as error:  # damage the manifest did not cover (older artefact)
        raise DamagedFileError(f"{path / WEIGHTS_FILE} cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:120]}); save the artefact again") from error
    require_finite(dict(qmodel.model.named_parameters()), f"artefact {path}: parameter")
    require_finite(dict(qmodel.model.named_buffers()), f"artefact {path}: buffer")
    try:
        qmodel.corrections = load_corrections(path, meta.get("corrections", []))
    except ValueError as error:
        if str(path) in str(error):  # names its file already
            raise
        raise _same_kind(error, f"{path / CONFIG_FILE}: corrections: {error}") from error
    except (OSError, RuntimeError, SafetensorError) as error:  # damage the manifest did not cover (older artefact)
        raise DamagedFileError(f"{path / 'corrections.safetensors'} cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:120]}); save the artefact again") from error
    # structural corrections (TFMQ) put their loaded tables back into the network; the others' prepare is identity
    try:  # the tables are checked against the network here (TFMQ: each per-step range on its quantizer's grid)
        qmodel.model = qmodel.corrections.prepare(qmodel.model, qmodel.adapter)
    except ValueError as error:
        raise ValueError(f"{path / CORRECTIONS_FILE}: {error}; save the artefact again") from error
    qmodel.recipe = read_recipe(path, config)
    if qmodel.recipe is not None:  # the same network; for an older naive artefact, today's unused reconstruction
        qmodel.config = qmodel.recipe.quant_config()  # defaults, so that saving it again matches its recipe
    qmodel.eval()  # the corrections loaded (and TFMQ's per-step quantizers) were built in training mode
    if backend != "fake":
        qmodel = to_backend(qmodel, backend, inplace=True)
    return qmodel, _load_scheduler(path)


def _same_kind(error: ValueError, message: str) -> ValueError:
    """``message`` as a ``ValueError``, a ``NewerVersionError`` when ``error`` was one: naming the file must not turn
    "upgrade tadq" into damage (``tadq verify`` exits 3 for the one, 1 for the other)."""
    return NewerVersionError(message) if isinstance(error, NewerVersionError) else ValueError(message)


# network fields added to QuantConfig and Recipe after their version 1 (QuantConfig's migrations say how)
LATER_NETWORK_FIELDS = ("softmax_granularity", "layer_bits")


def read_recipe(directory: str | Path, config: QuantConfig | None = None) -> Recipe | None:
    """The artefact's ``Recipe`` (``tadq_recipe.json``), ``None`` for an artefact written without one.

    Raises:
        ValueError: the recipe is malformed, newer than this tadq, or disagrees with ``config`` (the network's).
    """
    file = Path(directory) / RECIPE_FILE
    if not file.is_file():
        return None
    check_saved_file(directory, RECIPE_FILE)  # read before the artefact loads: damage is named as damage
    payload = read_json_file(file, "recipe")
    try:
        recipe = recipe_from_dict(payload, str(file))
    except ValueError as error:
        message = str(error)
        raise _same_kind(error, message if str(file) in message else f"{file}: {message}") from error
    if config is not None and isinstance(payload, dict) and payload.get("version", 0) < config_version(Recipe):
        # a recipe older than a network field (softmax_granularity, layer_bits) could not record it: the network's
        # config, written beside it, is what the artefact was built with
        recipe = dataclasses.replace(recipe, **{name: getattr(config, name) for name in LATER_NETWORK_FIELDS})
    if config is not None and recipe.quant_config() != config and not _unused_reconstruction_differs(recipe, config):
        raise ValueError(f"{file} and {CONFIG_FILE} describe different networks; save the artefact again")
    return recipe


def _unused_reconstruction_differs(recipe: Recipe, config: QuantConfig) -> bool:
    """Whether ``config`` is ``recipe``'s network but for reconstruction settings the method never runs and the
    recipe cannot record (naive, SVDQuant): the config holds the defaults of the tadq that wrote it, and those
    changed (ReconstructionConfig versions 2 and 3), so every such artefact of an older tadq was refused."""
    records = dataclasses.is_dataclass(recipe.method) and any(
        f.name == "reconstruction" for f in dataclasses.fields(recipe.method))
    return not records and dataclasses.replace(recipe.quant_config(), reconstruction=config.reconstruction) == config
