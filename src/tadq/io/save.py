"""Save and load quantized denoisers: integer weight codes in safetensors beside an untouched diffusers layout.

Folder layout (docs/architecture.md#artefact)::

    model_index.json                 diffusers pipeline index (denoiser + scheduler classes)
    unet/config.json                 the FP model's config as diffusers writes it (no quantization key, no path)
    scheduler/scheduler_config.json  the training scheduler
    tadq_config.json                 QuantConfig, adapter, model class, format version, library versions, sizes
    tadq_quant_map.json              layer name → role, schemes, reason a layer stayed in FP
    tadq_recipe.json                 the Recipe that made the model (method, samplers, correction stack), when
                                     it came from tadq.quantize (docs/recipes.md)
    tadq_weights.safetensors         integer codes of every quantized weight (two 4-bit codes per byte) and
                                     every other state tensor (FP layers, norms, biases, quantizer Δ; since
                                     format 2 each calibrated z as the smallest integer dtype of its grid)
    corrections.safetensors          per-step tables of the correction stack (only when it is not empty; the
                                     stack's configs are in tadq_config.json, see tadq.corrections.io)

Loading rebuilds the FP architecture from its config, re-runs the structural step of ``quantize``
(``build_quantized_structure``) and sets each quantized weight to Δ·(codes − z). An on-grid weight fake-quantizes
to itself, so the loaded model's outputs are bit-identical to the saved one's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from diffusers import SchedulerMixin
from safetensors.torch import save_file
from torch import Tensor, nn

from tadq.adapters.freeu import freeu_settings
from tadq.config import config_to_dict
from tadq.corrections.io import save_corrections
from tadq.quant.fake_quant import quantize_to_int
from tadq.quant.quantizer import Quantizer, off_grid_zero_point, zero_point_bounds
from tadq.registry import model_family, registered_families
from tadq.sampling import DEFAULTED_KEYS
from tadq.utils import library_versions, make_staging_dir, write_error, write_utf8

if TYPE_CHECKING:
    from tadq.denoiser import QuantizedDenoiser

__all__ = [
    "ArtefactSize", "save_quantized", "pack_codes", "unpack_codes", "FORMAT_VERSION", "CONFIG_FILE", "QUANT_MAP_FILE",
    "WEIGHTS_FILE",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: calibrated zero points stored as the smallest integer dtype holding their grid (1: float32)
ARTEFACT_FORMAT = "tadq-quantized"  # tadq_config.json's "format"
CONFIG_FILE, QUANT_MAP_FILE, WEIGHTS_FILE = "tadq_config.json", "tadq_quant_map.json", "tadq_weights.safetensors"
RECIPE_FILE = "tadq_recipe.json"  # the Recipe (tadq.recipe) of a model made by tadq.quantize
CODES_SUFFIX = ".codes"


@dataclass(frozen=True)
class ArtefactSize:
    """True on-disk size of the weights file beside the FP size, so compression claims are measured, not assumed.

    Args:
        weights_bytes: bytes of ``tadq_weights.safetensors`` (codes, scales, FP tensors, header).
        fp_bytes: 4 bytes × the FP model's parameter count (float32 weights).
        header_bytes: the part of ``weights_bytes`` that is the safetensors header (about 125 bytes per tensor
            name: negligible for a real model, dominant for a toy one).
    """

    weights_bytes: int
    fp_bytes: int
    header_bytes: int = 0

    @property
    def ratio(self) -> float:
        """weights_bytes / fp_bytes (0.25 would be a perfect int8 model, 0.125 a perfect int4 one)."""
        return self.weights_bytes / self.fp_bytes

    def to_json(self) -> dict[str, float]:
        return {"weights_bytes": self.weights_bytes, "fp_bytes": self.fp_bytes, "header_bytes": self.header_bytes,
                "ratio": round(self.ratio, 4)}


@dataclass(frozen=True)
class _WeightEntry:
    """One quantized weight: the module that declares it, its quantizer, and the tensor (or view) quantized."""

    module: str
    quantizer: Quantizer
    tensor: Tensor


def pack_codes(codes: Tensor, bits: int, qmin: int) -> Tensor:
    """Integer codes → compact storage: the codes themselves as int8/uint8, or two 4-bit codes per byte.

    Codes of ≤ 4 bits are stored as ``code − qmin`` (a nibble), low nibble first, padded with 0 to an even count.
    """
    if bits > 4:
        return codes.to(torch.int8 if qmin < 0 else torch.uint8)
    nibbles = (codes - qmin).to(torch.uint8).flatten()
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_codes(stored: Tensor, bits: int, qmin: int, shape: tuple[int, ...]) -> Tensor:
    """Inverse of ``pack_codes``: float32 codes of ``shape``."""
    if bits > 4:
        return stored.to(torch.float32).reshape(shape)
    numel = int(torch.Size(shape).numel())
    nibbles = torch.stack([stored & 0xF, stored >> 4], dim=1).flatten()[:numel]
    return (nibbles.to(torch.float32) + qmin).reshape(shape)


def _weight_entries(qmodel: nn.Module) -> dict[str, _WeightEntry]:
    """``"<layer>.<name>"`` → entry for every enabled weight quantizer, via each layer's ``quantized_weights()``."""
    entries: dict[str, _WeightEntry] = {}
    claimed: set[int] = set()
    for name, module in qmodel.named_modules():
        declared = getattr(module, "quantized_weights", None)
        if not callable(declared):
            continue
        for attribute, (quantizer, tensor) in declared().items():
            claimed.add(id(quantizer))
            if quantizer.enabled:
                entries[f"{name}.{attribute}"] = _WeightEntry(name, quantizer, tensor)
    orphans = [name for name, m in qmodel.named_modules()
               if isinstance(m, Quantizer) and m.kind == "weight" and m.enabled and id(m) not in claimed]
    if orphans:
        raise ValueError(f"weight quantizers {orphans} belong to no layer declaring them; add a "
                         "quantized_weights() method to the owning layer class so their integer codes can be saved")
    return entries


ZERO_POINT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32)  # format 2's zero-point storage


def _zero_point_dtype(low: int, high: int) -> torch.dtype:
    """The smallest integer dtype holding every zero point in [low, high]."""
    for dtype in ZERO_POINT_DTYPES:
        info = torch.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise ValueError(f"zero points on [{low}, {high}] fit no 32-bit integer")


def integer_zero_points(qmodel: nn.Module) -> dict[str, torch.dtype]:
    """State key → storage dtype of every calibrated integer-grid quantizer's zero point.

    Such a zero point is an integer on ``zero_point_bounds`` (loading refuses anything else), held in a float32
    buffer for the arithmetic; stored as float32 it cost 4 bytes per weight block, more than the block's 4-bit
    codes. Stored as uint8/int8 it loads back to the same float32 values. The map depends on the schemes only, so
    the rebuilt structure gives the loader the same keys and dtypes. Dynamic and fp8 quantizers keep float32.
    """
    return {key: _zero_point_dtype(*zero_point_bounds(quantizer.scheme))
            for key, quantizer in _integer_grid_quantizers(qmodel).items()}


def _integer_grid_quantizers(qmodel: nn.Module) -> dict[str, Quantizer]:
    """Zero-point state key → quantizer, for every calibrated integer-grid quantizer (``integer_zero_points``)."""
    found: dict[str, Quantizer] = {}
    for name, module in qmodel.named_modules(remove_duplicate=False):  # state_dict lists a shared one at every name
        if isinstance(module, Quantizer) and module.enabled and not module.scheme.dynamic and not module.scheme.fp8:
            found[f"{name}.zero_point" if name else "zero_point"] = module
    return found


def _stored_zero_points(qmodel: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Replace each calibrated zero point in ``tensors`` by its integer storage (``integer_zero_points``), refusing
    one that is not an integer on its grid rather than rounding it."""
    for key, module in _integer_grid_quantizers(qmodel).items():
        if key not in tensors:
            continue  # not part of the saved state (a correction's, say)
        dtype = _zero_point_dtype(*zero_point_bounds(module.scheme))
        bad = off_grid_zero_point(tensors[key], module.scheme)
        if bad is not None:
            raise ValueError(f"{key}: zero point {bad} is not an integer on its grid "
                             f"{list(zero_point_bounds(module.scheme))}; calibrate the model before saving")
        tensors[key] = tensors[key].to(dtype)


def _covered_keys(state: dict[str, Tensor], entries: dict[str, _WeightEntry]) -> set[str]:
    """State keys whose every element is stored as codes (their storage is fully covered by quantized views).

    Raises ``ValueError`` for a declared tensor that is not a parameter or buffer (or a view of one): loading could
    not write its values back.
    """
    state_pointers = {value.untyped_storage().data_ptr() for value in state.values()}
    covered_numel: dict[int, int] = {}
    for key, entry in entries.items():
        pointer = entry.tensor.untyped_storage().data_ptr()
        if pointer not in state_pointers:
            raise ValueError(f"{key!r} from {entry.module}.quantized_weights() is neither a parameter nor a view of "
                             "one; return the parameter (or a slice of it) so loading can write the weights back")
        covered_numel[pointer] = covered_numel.get(pointer, 0) + entry.tensor.numel()
    return {key for key, value in state.items()
            if covered_numel.get(value.untyped_storage().data_ptr()) == value.numel()}


def _fp_parameter_count(module: nn.Module, seen: set[int] | None = None) -> int:
    """Parameters of the FP architecture: everything except what quantizers add (e.g. learned steps)."""
    seen = set() if seen is None else seen
    if isinstance(module, Quantizer):
        return 0
    own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
    seen.update(id(p) for p in own)
    return sum(p.numel() for p in own) + sum(_fp_parameter_count(c, seen) for c in module.children())


@torch.no_grad()
def _encode_weight(key: str, entry: _WeightEntry) -> tuple[Tensor, dict[str, Any]]:
    """Packed codes of one weight and their description; raises if the quantizer's output is off its grid."""
    quantizer, scheme = entry.quantizer, entry.quantizer.scheme
    if not bool(quantizer.initialized):
        raise ValueError(f"the weight quantizer of {entry.module!r} has no range; quantize or calibrate before saving")
    quantized = quantizer(entry.tensor)
    scale = quantizer._broadcast(quantizer.scale, entry.tensor)
    zero_point = quantizer._broadcast(quantizer.zero_point, entry.tensor)
    codes = quantize_to_int(quantized, scale, zero_point, scheme.qmin, scheme.qmax)
    if not torch.equal((codes - zero_point) * scale, quantized):
        raise ValueError(f"{key!r}: its quantizer returned values off the Δ·(integer − z) grid (a learned rounding "
                         "still soft, or a bypassed quantizer?); finish reconstruction before saving")
    info = {"shape": list(entry.tensor.shape), "bits": scheme.bits, "qmin": scheme.qmin}
    return pack_codes(codes, scheme.bits, scheme.qmin), info


def _diffusers_layout(model: nn.Module) -> tuple[str, str]:
    """(sub-folder, pipeline class) of the model's family, as its adapter registration declares them."""
    try:
        family = model_family(type(model).__name__)
    except ValueError as error:
        raise TypeError(f"cannot save a quantized {type(model).__name__}: {error}") from error
    return family.subfolder, family.pipeline_for(model.config)


def _save_scheduler(scheduler: SchedulerMixin, folder: Path) -> None:
    """The scheduler's config as diffusers writes it, less the keys its constructor was never given
    (``DEFAULTED_KEYS``): loading it then lists them again, so a sampler of another class built from the loaded
    scheduler takes the same defaults as the one the model was calibrated with (diffusers' own save names every key,
    which would turn e.g. a default DDPM spacing into an explicit one and move an Euler grid). Written again in
    any case: diffusers writes it in text mode, with ``\\r\\n`` on Windows, and an artefact's bytes must not depend
    on the OS that saved it."""
    scheduler.save_pretrained(folder)
    defaulted = set(scheduler.config.get(DEFAULTED_KEYS) or ())
    path = folder / "scheduler_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    write_utf8(json.dumps({key: value for key, value in config.items() if key not in defaulted},
                          indent=2, sort_keys=True) + "\n", path)


# what diffusers' save_config writes that says where the model was read from, not what it is: ``_name_or_path`` is
# the folder as the user spelled it (relative, absolute, through a link), so one model saved from one folder typed
# two ways gave two artefacts with different bytes, and the user's paths travelled with every artefact
_WHERE_LOADED_KEYS = ("_name_or_path",)


def _save_denoiser_config(model: nn.Module, folder: Path) -> None:
    """The FP config as the model's ``save_config`` writes it (same keys, order and layout), less where the model
    was loaded from (``_WHERE_LOADED_KEYS``): an artefact's bytes depend on the model, never on a path."""
    config = json.loads(model.to_json_string())
    for key in _WHERE_LOADED_KEYS:
        config.pop(key, None)
    folder.mkdir(parents=True, exist_ok=True)
    write_utf8(json.dumps(config, indent=2, sort_keys=True) + "\n", folder / model.config_name)


def _write_diffusers_layout(qmodel: QuantizedDenoiser, scheduler: SchedulerMixin | None, folder: Path) -> str:
    subfolder, pipeline = _diffusers_layout(qmodel.model)
    _save_denoiser_config(qmodel.model, folder / subfolder)
    index: dict[str, Any] = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__,
                             subfolder: ["diffusers", type(qmodel.model).__name__]}
    if scheduler is not None:
        _save_scheduler(scheduler, folder / "scheduler")
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
    else:
        logger.warning("saving without a scheduler: pass the model's training scheduler to sample from the artefact")
    write_utf8(json.dumps(index, indent=2) + "\n", folder / "model_index.json")
    return subfolder


def _plain(value: Any) -> Any:
    """A config value as JSON reads it back (tuples become lists), so an in-memory config compares with a file's."""
    return json.loads(json.dumps(value))


def config_mismatch(model: nn.Module, config_file: Path) -> str | None:
    """Why ``config_file`` does not describe ``model`` (another class, or a config value that differs), or ``None``.
    Keys the model's config does not carry (ones diffusers ignores) are not compared, nor weights (an artefact holds
    only the quantized ones)."""
    from tadq.models import loaded_class_name
    from tadq.safefiles import read_json_file

    saved = read_json_file(config_file, "denoiser config")
    config = getattr(model, "config", None)
    if not isinstance(saved, dict) or config is None:
        return None  # a config that is not an object is the folder check's to name; a model without one, save's
    # a released DiT / PixArt-α folder names its model Transformer2DModel, which loads as the class its norm picks
    if saved.get("_class_name") is not None and loaded_class_name(saved) != type(model).__name__:
        return f"{config_file} is a {saved.get('_class_name')}, but the quantized model is a {type(model).__name__}"
    differing = [key for key, value in sorted(saved.items())
                 if not key.startswith("_") and key in config and _plain(config[key]) != _plain(value)]
    if differing:
        key = differing[0]
        return (f"{config_file} does not describe the quantized model ({len(differing)} config value(s) differ, "
                f"e.g. {key}: {saved[key]!r} in the folder, {config[key]!r} in the model)")
    return None


def source_mismatch(model: nn.Module, source: Path) -> str | None:
    """Why the pipeline folder ``source`` is not the one ``model`` came from (its denoiser config is missing or
    describes another model: ``config_mismatch``), or ``None``."""
    subfolder, _pipeline = _diffusers_layout(model)
    config_file = source / subfolder / "config.json"
    return config_mismatch(model, config_file) if config_file.is_file() else f"{config_file} is missing"


def check_copyable_components(source: str | Path) -> None:
    """Refuse, before any work, a pipeline folder whose component folders (the ones an artefact copies: every one
    but the denoiser's) hold broken links or other entries that are not files or folders: ``shutil.copytree`` failed
    on them after the whole quantization (e.g. a hub snapshot whose unused ``.bin`` blob was deleted, which
    diffusers itself never reads)."""
    source = Path(source)
    try:
        index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a readable pipeline folder: the pipeline checks name that
    denoisers = {family.subfolder for family in registered_families().values()}
    bad = []
    for name, value in sorted(index.items() if isinstance(index, dict) else ()):
        folder = source / name
        if name.startswith("_") or name in denoisers or not isinstance(value, list) or not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not (path.is_file() or path.is_dir()):  # a dangling link (is_file follows links), a socket, a fifo
                bad.append(str(path.relative_to(source)))
    if bad:
        listed = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise FileNotFoundError(f"{source}: {listed} {'is' if len(bad) == 1 else 'are'} not a file (a broken link?), "
                                "and an artefact copies its component folders whole; remove it or restore its "
                                "target")


def _copy_pipeline_layout(qmodel: QuantizedDenoiser, source: Path, folder: Path) -> str:
    """A pipeline source (text encoders, tokenizers, VAE...): ``model_index.json`` and every component folder but
    the denoiser's copied byte for byte, so diffusers' own ``from_pretrained`` loads them from the artefact; the
    denoiser folder gets its FP config only (its weights are tadq's codes). A safety checker or feature extractor
    the source lacks is left out (tadq loads them as None)."""
    from tadq.pipelines.components import UNUSED_COMPONENTS

    subfolder, _pipeline = _diffusers_layout(qmodel.model)
    index = json.loads((source / "model_index.json").read_text(encoding="utf-8"))
    if not isinstance(index.get(subfolder), list):
        raise ValueError(f"{source}/model_index.json names no {subfolder!r}: it is not the source of this model")
    check_copyable_components(source)
    shutil.copyfile(source / "model_index.json", folder / "model_index.json")
    for name, value in sorted(index.items()):
        if name.startswith("_") or name == subfolder or not isinstance(value, list) or None in value:
            continue
        if name in UNUSED_COMPONENTS and not (source / name).is_dir():  # loaded as None: a folder without is whole
            continue
        if not (source / name).is_dir():
            raise FileNotFoundError(f"{source / name} ({value[1]}) is missing; the pipeline folder is incomplete")
        shutil.copytree(source / name, folder / name, copy_function=shutil.copyfile)
    _save_denoiser_config(qmodel.model, folder / subfolder)
    return subfolder


def _network_state(qmodel: QuantizedDenoiser) -> dict[str, Tensor]:
    """The state of everything but the correction stack (which has its own file)."""
    return {key: value for key, value in qmodel.state_dict().items() if not key.startswith("corrections.")}


def _write_tadq_files(qmodel: QuantizedDenoiser, folder: Path, subfolder: str) -> ArtefactSize:
    entries = _weight_entries(qmodel)
    state = _network_state(qmodel)
    covered = _covered_keys(state, entries)
    tensors = {key: value.detach().contiguous() for key, value in state.items() if key not in covered}
    _stored_zero_points(qmodel, tensors)
    codes_info = {}
    for key, entry in entries.items():
        codes, codes_info[key] = _encode_weight(key, entry)
        # contiguous: a channels-last model's 8-bit codes (stored unpacked) keep its strides, which safetensors refuses
        tensors[key + CODES_SUFFIX] = codes.contiguous()
    # one metadata key with sorted JSON: safetensors keeps metadata in a hash map, so two keys came out in a
    # different order in every process and identical models had different bytes
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"tadq_codes": json.dumps(codes_info, sort_keys=True)})
    with open(folder / WEIGHTS_FILE, "rb") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")  # safetensors: u64 length, then the JSON header
    size = ArtefactSize((folder / WEIGHTS_FILE).stat().st_size, 4 * _fp_parameter_count(qmodel.model), header_bytes)
    write_utf8(json.dumps(qmodel.quantization_map(), indent=2) + "\n", folder / QUANT_MAP_FILE)
    meta = {
        "format": ARTEFACT_FORMAT, "format_version": FORMAT_VERSION, "model_class": type(qmodel.model).__name__,
        "denoiser_folder": subfolder, "adapter": qmodel.adapter.name, "quant_config": config_to_dict(qmodel.config),
        "versions": library_versions(), "sizes": size.to_json(),
        "corrections": save_corrections(qmodel.corrections, folder),
    }
    freeu = freeu_settings(qmodel.model)
    if freeu is not None:  # only when on: an artefact without FreeU keeps its bytes
        meta["freeu"] = freeu
    write_utf8(json.dumps(meta, indent=2) + "\n", folder / CONFIG_FILE)
    recipe = getattr(qmodel, "recipe", None)  # set by tadq.quantize: everything that made this model
    if recipe is not None:
        if recipe.quant_config() != qmodel.config:
            raise ValueError("the model's recipe does not match its QuantConfig; quantize it with tadq.quantize")
        write_utf8(json.dumps(config_to_dict(recipe), indent=2) + "\n", folder / RECIPE_FILE)
    return size


def _publish(staging: Path, target: Path, recheck: Callable[[], None], overwrite: bool) -> None:
    """Move a finished staging folder to ``target``, replacing an existing artefact only once the new one is whole.

    ``target`` was checked before the staging folder was written, which for a pipeline copy takes minutes: what is
    there now is checked again (``recheck``, the same ``check_output_dir``), and without ``overwrite`` the rename
    itself refuses to land on anything but an empty folder. A folder that appeared meanwhile (a user's files, another
    run's artefact) used to be moved aside and deleted, ``overwrite`` or not."""
    if not overwrite:
        try:
            _rename_onto_empty(staging, target)  # fails on a non-empty folder or a file
        except OSError as error:
            if not os.path.lexists(target):
                raise
            from tadq.fsguard import OutputRefused

            raise OutputRefused(f"artefact folder {target} was created or filled by another process while this model "
                                f"was being saved ({error.strerror}); it is left as it is and this save was "
                                "discarded. Save again to another folder, or with --overwrite (overwrite=True)") \
                from error
        return
    recheck()
    if target.exists():
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, retired / target.name)
        try:
            os.replace(staging, target)
        except BaseException:  # an interrupt between the two renames: the old artefact goes back, whole
            if not target.exists():
                os.replace(retired / target.name, target)
                retired.rmdir()
            raise
        shutil.rmtree(retired)
    else:
        os.replace(staging, target)


def _rename_onto_empty(staging: Path, target: Path) -> None:
    """``os.rename`` that replaces an empty folder at ``target`` on every OS and nothing else: POSIX does that
    itself, Windows refuses any existing ``target``, so a save into the empty folder the user made (which the output
    checks accept) failed there after all the work, taken for "another process filled it"."""
    try:
        os.rename(staging, target)
    except OSError:
        if target.is_symlink() or not target.is_dir() or any(target.iterdir()):
            raise
        target.rmdir()  # empty: nothing of anyone's is lost; a folder made again meanwhile fails the rename below
        os.rename(staging, target)


def _check_float32(qmodel: QuantizedDenoiser) -> None:
    """Refuse a network cast to another floating dtype before anything is written: its float16 ranges and biases
    were written as they were, and the artefact could never be loaded ("the file was altered")."""
    for key, value in _network_state(qmodel).items():
        if value.is_floating_point() and value.dtype != torch.float32:
            name = str(value.dtype).removeprefix("torch.")
            raise ValueError(f"save_pretrained: this model is in {name} (e.g. {key!r}); an artefact stores float32 "
                             f"ranges and weights: save the float32 model and load it with tadq.load(dir, "
                             f"dtype=torch.{name}), or cast this one back with .float() first")


def _check_tables_fit(qmodel: QuantizedDenoiser, scheduler: SchedulerMixin) -> None:
    """Refuse, before anything is written, a scheduler the per-step tables (PTQD/TAC/TCEC corrections, TFMQ) were
    not fitted on: the artefact keeps it as its own (``tadq.load`` returns it, ``tadq sample`` walks it) and the
    tables refused it at every sampling, while the scheduler they were fitted on was no longer in the folder. The
    grids are rebuilt on ``scheduler`` from the recipe's samplers; tables of a grid the recipe does not hold cannot be
    rebuilt here and are checked when sampled, as before."""
    from tadq.sampling import SamplingPlan

    recipe = getattr(qmodel, "recipe", None)  # a model made by tadq.quantize has one; a hand-built may not
    samplers = {} if recipe is None else {s.key: s for s in (recipe.sampler, *(d.sampler for d in recipe.deployments))}
    for member in qmodel.corrections:
        key = getattr(member, "table_key", None)
        grid, scale = (key.sampler_key, key.guidance_scale) if key is not None else (
            getattr(member, "sampler_key", None), 1.0)
        if grid not in samplers:
            continue
        try:
            member.check_plan(SamplingPlan.build(scheduler, samplers[grid], scale).steps)
        except (ValueError, NotImplementedError) as error:
            raise ValueError(f"save_pretrained: the {type(scheduler).__name__} given is not the scheduler "
                             f"{type(member).__name__}'s per-step tables were fitted on ({error}); the artefact would "
                             "keep it as its own and refuse to sample with it. Pass the scheduler the model was "
                             "quantized and fitted with, or refit the tables on this one") from error


def save_quantized(
    qmodel: QuantizedDenoiser, directory: str | Path, scheduler: SchedulerMixin | None, *, overwrite: bool = False,
    force_foreign: bool = False, pipeline_source: str | Path | None = None,
) -> ArtefactSize:
    """Write ``qmodel`` (and its training scheduler) to ``directory``; returns the measured artefact size.

    ``pipeline_source``: the FP pipeline folder the model came from (Stable Diffusion...): its ``model_index.json``
    and every other component are copied unchanged instead of writing a denoiser-only index (``scheduler`` is
    then the folder's own).

    Everything is written to a hidden sibling folder first and renamed into place at the end, so a failure never
    leaves a half-written artefact. The folder gets tadq's marker and a manifest of SHA-256 hashes.

    Raises:
        OutputRefused (a ValueError): ``directory`` exists and is not empty and ``overwrite`` is false; or it is a
            file, or a folder tadq did not write (unless ``force_foreign``), or it cannot be written; checked again
            when the new artefact is ready, so files put there while it was written are never deleted.
        ValueError: a quantized weight is off its grid or has no range.
    """
    from tadq.fsguard import check_output_dir, mark_output
    from tadq.io.manifest import write_manifest

    if not (isinstance(qmodel, nn.Module) and callable(getattr(qmodel, "quantization_map", None))):
        raise TypeError(f"save_quantized takes a QuantizedDenoiser (from tadq.quantize), got {type(qmodel).__name__}")
    if not isinstance(directory, (str, Path)):
        raise TypeError(f"save_quantized: directory must be a str or Path, got {type(directory).__name__}")
    if scheduler is not None:  # a str or a scheduler class failed after the staging folder was made
        from tadq.typecheck import expect_scheduler

        expect_scheduler(scheduler, "save_pretrained")
    for name, flag in (("overwrite", overwrite), ("force_foreign", force_foreign)):
        if not isinstance(flag, bool):  # overwrite="no" is truthy: it replaced the artefact there
            raise TypeError(f"save_pretrained: {name} must be True or False, got {type(flag).__name__} ({flag!r})")
    _check_float32(qmodel)
    target = Path(directory)
    source = None if pipeline_source is None else Path(pipeline_source)
    if source is not None and not (source / "model_index.json").is_file():
        raise ValueError(f"pipeline_source {source} is not a pipeline folder (no model_index.json)")
    if source is not None:  # its encoders and VAE would be paired with a denoiser they were not quantized with
        reason = source_mismatch(qmodel.model, source)
        if reason is not None:
            raise ValueError(f"pipeline_source {source} is not the folder this model was quantized from: {reason}")
    if scheduler is not None and source is None:  # a pipeline folder's artefact keeps the folder's own scheduler
        _check_tables_fit(qmodel, scheduler)

    def check() -> None:
        check_output_dir(target, kind="artefact", what="artefact folder", overwrite=overwrite,
                         force_foreign=force_foreign, inputs=[] if source is None else [source])

    check()
    staging = make_staging_dir(target)  # and removes the staging folders a killed save of target left
    try:
        if source is None:
            subfolder = _write_diffusers_layout(qmodel, scheduler, staging)
        else:
            subfolder = _copy_pipeline_layout(qmodel, source, staging)
        size = _write_tadq_files(qmodel, staging, subfolder)
        mark_output(staging, "artefact")
        write_manifest(staging)
        for item in staging.rglob("*"):  # mkdtemp and safetensors create owner-only files; artefacts are shared
            item.chmod(0o755 if item.is_dir() else 0o644)
        staging.chmod(0o755)
        _publish(staging, target, check, overwrite)
    except Exception as error:  # a full disk: safetensors' own error type was a traceback, naming no folder
        if (converted := write_error(error, target)) is not None:
            raise converted from error
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    logger.info("saved %s: weights %.1f KiB vs FP %.1f KiB (%.3f)", target, size.weights_bytes / 1024,
                size.fp_bytes / 1024, size.ratio)
    return size
