"""Load a quantized denoiser saved by ``tadq.io.save``: rebuild the structure ``quantize`` built, then set each
quantized weight to Δ·(codes − z) (bit-identical outputs to the saved model)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from safetensors import SafetensorError, safe_open
from torch import nn

from tadq.config import QuantConfig, config_from_dict, config_version
from tadq.corrections.io import load_corrections
from tadq.denoiser import QuantizedDenoiser
from tadq.io.manifest import MANIFEST_FILE, verify_manifest
from tadq.io.save import (
    CODES_SUFFIX,
    CONFIG_FILE,
    FORMAT_VERSION,
    QUANT_MAP_FILE,
    RECIPE_FILE,
    WEIGHTS_FILE,
    _covered_keys,
    _network_state,
    _weight_entries,
    _WeightEntry,
    unpack_codes,
)
from tadq.prepare import build_quantized_structure
from tadq.recipe import Recipe, recipe_from_dict
from tadq.registry import model_family
from tadq.safefiles import DamagedFileError, read_json_file, require_finite
from tadq.utils import library_versions

__all__ = ["load_quantized", "is_quantized_artefact", "read_recipe"]

logger = logging.getLogger(__name__)


def is_quantized_artefact(directory: str | Path) -> bool:
    """Whether ``directory`` holds a tadq artefact (as opposed to a plain diffusers model folder)."""
    return (Path(directory) / CONFIG_FILE).is_file()


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"quantized model folder {path} does not exist")
    if not is_quantized_artefact(path):
        raise ValueError(f"{path} is not a tadq artefact ({CONFIG_FILE} is missing): write one with `tadq quantize "
                         "--out` or QuantizedDenoiser.save_pretrained; load FP folders with tadq.models")
    if not verify_manifest(path):
        logger.warning("%s has no %s (saved by an older tadq): its files cannot be checked for damage", path,
                       MANIFEST_FILE)
    meta = read_json_file(path / CONFIG_FILE, "artefact config")
    if not isinstance(meta, dict) or not isinstance(meta.get("quant_config"), dict):
        raise ValueError(f"{path / CONFIG_FILE} is not a tadq artefact config (no quant_config object); save the "
                         "artefact again")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} uses artefact format {version!r}, newer than this tadq reads ({FORMAT_VERSION}); "
                         "upgrade tadq to load it")
    versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
    if versions.get("tadq") != library_versions()["tadq"]:
        logger.warning("%s was written by tadq %s (this is %s)", path, versions.get("tadq"),
                       library_versions()["tadq"])
    return meta


def _build_fp_model(folder: Path) -> nn.Module:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'config.json'} is missing: the artefact is incomplete, save it again")
    config = read_json_file(folder / "config.json", "model config")
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    klass = model_family(str(class_name), where=str(folder)).model_class
    return klass.from_config(klass.load_config(folder)).eval()


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
    return klass.from_config(config)


def _owner(qmodel: nn.Module, key: str, entries: dict[str, _WeightEntry]) -> str:
    """'<module> (<class>)' that expects a state or codes key, for error messages."""
    if key.endswith(CODES_SUFFIX):
        name = entries[key[: -len(CODES_SUFFIX)]].module
    else:
        name = key.rpartition(".")[0]
    return f"{name or '<root>'} ({type(qmodel.get_submodule(name)).__name__})"


@torch.no_grad()
def _load_tensors(qmodel: QuantizedDenoiser, file: Path) -> None:
    """Load FP tensors and quantizer state, then set every quantized weight to Δ·(codes − z)."""
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
        codes_info = json.loads((handle.metadata() or {}).get("tadq_codes", "{}"))
        try:
            qmodel.load_state_dict({key: handle.get_tensor(key) for key in float_keys}, strict=False)
        except RuntimeError as error:
            raise ValueError(f"{file.name} does not fit the rebuilt model: {error}") from error
        for key, entry in entries.items():
            scheme, shape = entry.quantizer.scheme, tuple(entry.tensor.shape)
            info = codes_info.get(key, {})
            if (info.get("bits"), info.get("qmin"), tuple(info.get("shape", ()))) != (scheme.bits, scheme.qmin, shape):
                raise ValueError(f"codes of {key!r} were saved as {info}, but the rebuilt layer expects "
                                 f"{scheme.bits} bits, qmin {scheme.qmin}, shape {list(shape)}: save it again")
            codes = unpack_codes(handle.get_tensor(key + CODES_SUFFIX), scheme.bits, scheme.qmin, shape)
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
    from tadq.backends import check_backend, check_weight_grid, to_backend

    check_backend(backend)
    path = Path(directory)
    meta = _read_meta(path)
    try:
        config = config_from_dict(meta["quant_config"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: quant_config is malformed ({type(error).__name__}: {error}); save "
                         "the artefact again") from error
    check_weight_grid(backend, config.weights)  # before building anything: 8-bit weights on a CPU without VNNI
    model = _build_fp_model(path / meta.get("denoiser_folder", "unet"))
    qmodel = build_quantized_structure(model, config, init_weight_range=False)
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
        _load_tensors(qmodel, path / WEIGHTS_FILE)
    except (OSError, RuntimeError, SafetensorError) as error:  # damage the manifest did not cover (older artefact)
        raise DamagedFileError(f"{path / WEIGHTS_FILE} cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:120]}); save the artefact again") from error
    require_finite(dict(qmodel.model.named_parameters()), f"artefact {path}: parameter")
    require_finite(dict(qmodel.model.named_buffers()), f"artefact {path}: buffer")
    try:
        qmodel.corrections = load_corrections(path, meta.get("corrections", []))
    except (OSError, RuntimeError, SafetensorError) as error:  # damage the manifest did not cover (older artefact)
        raise DamagedFileError(f"{path / 'corrections.safetensors'} cannot be read ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:120]}); save the artefact again") from error
    # structural corrections (TFMQ) put their loaded tables back into the network; the others' prepare is identity
    qmodel.model = qmodel.corrections.prepare(qmodel.model, qmodel.adapter)
    qmodel.recipe = read_recipe(path, config)
    if backend != "fake":
        qmodel = to_backend(qmodel, backend, inplace=True)
    return qmodel, _load_scheduler(path)


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
    payload = read_json_file(file, "recipe")
    recipe = recipe_from_dict(payload, str(file))
    if config is not None and isinstance(payload, dict) and payload.get("version", 0) < config_version(Recipe):
        # a recipe older than a network field (softmax_granularity, layer_bits) could not record it: the network's
        # config, written beside it, is what the artefact was built with
        recipe = dataclasses.replace(recipe, **{name: getattr(config, name) for name in LATER_NETWORK_FIELDS})
    if config is not None and recipe.quant_config() != config:
        raise ValueError(f"{file} and {CONFIG_FILE} describe different networks; save the artefact again")
    return recipe
