"""Load a diffusers denoiser and its scheduler from a local folder (no hub access), or the shipped default."""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import DDPMScheduler, SchedulerMixin
from safetensors import SafetensorError
from torch import nn

from tadq.registry import ModelFamily, model_family, registered_families
from tadq.safefiles import (
    DamagedFileError,
    diffusers_loading_options,
    find_weight_files,
    read_json_file,
    require_finite,
    require_stored_parameters,
)
from tadq.sampling.config import check_drivable
from tadq.zoo.paths import shipped_model_path

__all__ = ["load_pipeline_parts", "load_scheduler", "loaded_class_name", "shipped_model_path"]

logger = logging.getLogger(__name__)


# Released DiT (facebook/DiT-XL-2-*) and PixArt-α folders name their denoiser ``Transformer2DModel``;
# ``Transformer2DModel.from_pretrained`` loads them as these classes, chosen by ``norm_type``.
_LEGACY_TRANSFORMER_CLASSES = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


def loaded_class_name(config: dict) -> object:
    """The model class a diffusers ``config.json`` loads as: its ``_class_name``, except the legacy
    ``Transformer2DModel`` name of released DiT and PixArt-α folders, which loads as the class its ``norm_type``
    picks."""
    class_name = config.get("_class_name")
    if class_name == "Transformer2DModel":
        return _LEGACY_TRANSFORMER_CLASSES.get(config.get("norm_type"), class_name)
    return class_name


def _present(path: Path) -> bool:
    """A file, or a link to one that is gone (a hub-cache blob): reading it then says which."""
    return path.exists() or path.is_symlink()


def _model_dir(path: Path, *, denoiser_only: bool = False) -> Path:
    """The folder of the denoiser in ``path``. ``denoiser_only``: it is loaded without the rest of a prompt
    pipeline, which is logged (not when only the scheduler is read: every command checks its sampler against it
    first, and the whole pipeline may be loaded later, so the note misled `tadq sample` on a text-to-image
    folder, twice)."""
    if path.is_file():
        raise ValueError(f"{path} is a file; tadq reads diffusers model folders (config.json and weights, as "
                         "save_pretrained writes them). A single-file checkpoint converts with diffusers' "
                         "from_single_file(...).save_pretrained(folder)")
    if _present(path / "model_index.json"):
        index = read_json_file(path / "model_index.json", "pipeline index")
        if not isinstance(index, dict):
            raise ValueError(f"{path / 'model_index.json'} holds a JSON {type(index).__name__}, not an object")
        subfolders = sorted({family.subfolder for family in registered_families().values()})
        for name in subfolders:
            if name in index and _present(path / name / "config.json"):
                _check_components_present(path, index, name)
                if denoiser_only and isinstance(index.get("text_encoder"), list) and None not in index["text_encoder"]:
                    logger.info("%s is a %s: loading its %s and scheduler only; tadq.pipelines.load_fp_pipeline "
                                "loads the whole pipeline and PromptConditions encodes prompts for it", path,
                                index.get("_class_name"), name)
                return path / name
        for name in subfolders:  # named, but its config is gone: say that, not "names no denoiser"
            if name in index:
                raise ValueError(f"{path / name / 'config.json'} is missing: {path}/model_index.json names the "
                                 f"denoiser folder {name!r}, but its config is not there (restore the folder)")
        raise ValueError(f"{path}/model_index.json names no denoiser folder (looked for {subfolders})")
    if _present(path / "config.json"):
        return path
    raise ValueError(
        f"{path} is not a diffusers model folder: expected model_index.json (a pipeline) or config.json "
        f"with weights (a model saved by save_pretrained){_hub_cache_hint(path)}"
    )


def _hub_cache_hint(path: Path) -> str:
    """For a refusal: the snapshot to pass when ``path`` is a hub-cache repository folder
    (``models--org--name``, whose files live in ``snapshots/<revision>/``)."""
    snapshots = path / "snapshots"
    if not snapshots.is_dir():
        return ""
    revisions = sorted(entry.name for entry in snapshots.iterdir() if entry.is_dir())
    main = path / "refs" / "main"
    try:
        ref = main.read_text(encoding="utf-8").strip() if main.is_file() and main.stat().st_size < 4096 else ""
    except (OSError, UnicodeDecodeError):
        ref = ""
    chosen = ref if ref in revisions else (revisions[0] if len(revisions) == 1 else None)
    if chosen is not None:
        return f". It is a Hugging Face hub-cache folder: pass its snapshot {snapshots / chosen}"
    choices = ", ".join(str(snapshots / revision) for revision in revisions) or "(none: the download is missing)"
    return f". It is a Hugging Face hub-cache folder: pass one of its snapshots {choices}"


def _check_components_present(path: Path, index: dict, denoiser: str) -> None:
    """Every component ``model_index.json`` names has its folder, and every other diffusers model among them (a
    VAE) whole safetensors weights: a DiT whose ``vae/`` was gone or truncated used to be loaded, calibrated and
    quantized, and refused only when its artefact was written (the other components are copied into it).
    Components tadq loads as ``None`` (a safety checker) may be absent."""
    from tadq.pipelines.components import UNUSED_COMPONENTS

    for name, value in sorted(index.items()):
        if name.startswith("_") or name in (*UNUSED_COMPONENTS, "scheduler") or not isinstance(value, list) \
                or len(value) != 2 or None in value:  # the scheduler's own check names what it holds
            continue
        folder = path / name
        if not folder.is_dir():
            raise ValueError(f"{path} is incomplete: the component folder {name}/ ({value[1]}) named in "
                             "model_index.json is missing (restore it from the model's download)")
        if name != denoiser and value[0] == "diffusers" and (folder / "config.json").is_file():
            find_weight_files(folder)  # names the empty, truncated or dangling file, or the pickle


def _scheduler_classes() -> dict[str, type[SchedulerMixin]]:
    """Every training-scheduler class tadq honours (``tadq.sampling.SUPPORTED_SCHEDULERS``), by name: discrete ᾱ_t
    schedules (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver multistep, PNDM, LMS) and flow matching."""
    import diffusers

    from tadq.sampling.config import SUPPORTED_SCHEDULERS

    return {name: getattr(diffusers, name) for name in SUPPORTED_SCHEDULERS}


def _sibling_scheduler(path: Path) -> list[Path]:
    """``[pipeline/scheduler]`` when ``path`` is a component folder of a pipeline (``sd/unet``, named by its
    ``model_index.json``): its training schedule is the pipeline's, not DDPM defaults (an SD UNet was trained on
    scaled-linear betas, DDPM's default is linear)."""
    index_file = path.absolute().parent / "model_index.json"
    if not index_file.is_file():
        return []
    index = read_json_file(index_file, "pipeline index")
    if isinstance(index, dict) and isinstance(index.get(path.absolute().name), list):
        logger.info("%s is the %s folder of the pipeline %s: using its scheduler", path, path.absolute().name,
                    index_file.parent)
        return [index_file.parent / "scheduler"]
    return []


_DEFAULT_SCHEDULE_WARNED: set[Path] = set()  # folders this process has warned about running on DDPM's defaults


def _load_scheduler(path: Path, model_dir: Path) -> SchedulerMixin:
    """The folder's own scheduler, as its class: it records the *training* schedule (betas, or a flow shift) and the
    sampler the model ships with (``tadq.sampling.default_sampler``); the sampler tadq runs is the user's choice,
    and ``make_scheduler`` builds it on this schedule. A class tadq cannot honour (score SDE, UniPC, Heun...) is
    refused by name instead of being read as a DDPM config."""
    for candidate in (path / "scheduler", model_dir / "scheduler", path, *_sibling_scheduler(path)):
        config_file = candidate / "scheduler_config.json"
        if config_file.exists():
            config = read_json_file(config_file, "scheduler config")
            if not isinstance(config, dict):
                raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not an object")
            name = config.get("_class_name")
            check_drivable(name, config)
            if name is None:
                raise ValueError(f"{config_file} has no _class_name; tadq will not guess the scheduler class")
            return _scheduler_classes()[name].from_config(config)
    index = read_json_file(path / "model_index.json", "pipeline index") if (path / "model_index.json").is_file() \
        else None
    if isinstance(index, dict) and index.get("scheduler"):  # a pipeline that had one: its schedule is not guessed
        raise ValueError(f"{path / 'model_index.json'} names a scheduler ({index['scheduler']}), but "
                         f"{path / 'scheduler' / 'scheduler_config.json'} is missing: the training schedule (betas, "
                         "prediction type) cannot be guessed; restore the scheduler folder")
    _supported_family(model_dir)  # a model tadq cannot load is refused first, not warned about its schedule
    if path.resolve() not in _DEFAULT_SCHEDULE_WARNED:  # a command reads the scheduler several times: said once
        _DEFAULT_SCHEDULE_WARNED.add(path.resolve())
        logger.warning("no scheduler_config.json under %s; using DDPM defaults (1000 steps, linear betas)", path)
    return DDPMScheduler()


def load_scheduler(path: str | Path | None = None) -> SchedulerMixin:
    """The training scheduler of a diffusers folder (``None``: the shipped model) without loading the denoiser:
    what commands check every requested sampler against before any work."""
    path = Path(path) if path is not None else shipped_model_path()
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    return _load_scheduler(path, _model_dir(path))


def load_pipeline_parts(path: str | Path | None = None) -> tuple[nn.Module, SchedulerMixin]:
    """(denoiser in eval mode, training scheduler) from a diffusers folder; ``None`` loads the shipped model.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it is not a diffusers model folder, or the model class is not supported.
    """
    if path is not None and not isinstance(path, (str, Path)):
        raise TypeError(f"load_pipeline_parts takes a folder path (str or Path) or None, got {type(path).__name__}")
    path = Path(path) if path is not None else shipped_model_path()
    try:
        return _load_pipeline_parts(path)
    except (ValueError, FileNotFoundError) as error:  # a shipped folder missing or damaged: say how to get it back
        from tadq.zoo.shipped import regenerate_hint

        if (hint := regenerate_hint(path)) and hint not in str(error):
            error.args = (f"{error}{hint}",)
        raise


def _supported_family(model_dir: Path) -> tuple[str, ModelFamily]:
    """(class name, registered family) of the denoiser in ``model_dir``; ``ValueError`` for a config that names no
    class or one no adapter is registered for."""
    model_config = read_json_file(model_dir / "config.json", "model config")
    if not isinstance(model_config, dict):
        raise ValueError(f"{model_dir / 'config.json'} holds a JSON {type(model_config).__name__}, not an object; "
                         "it is not a diffusers model config")
    class_name = model_config.get("_class_name")
    if not isinstance(class_name, str) or not class_name:
        raise ValueError(f"{model_dir / 'config.json'} names no model class (_class_name is {class_name!r}); tadq "
                         f"will not guess one. Supported: {sorted(registered_families())}")
    class_name = str(loaded_class_name(model_config))  # the legacy name of released DiT / PixArt-α folders
    return class_name, model_family(class_name, where=str(model_dir))


def _load_pipeline_parts(path: Path) -> tuple[nn.Module, SchedulerMixin]:
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    model_dir = _model_dir(path, denoiser_only=True)
    class_name, family = _supported_family(model_dir)
    if (path / "tadq_config.json").exists():
        raise ValueError(f"{path} is a tadq quantized artefact, not an FP model: sample or evaluate it (`tadq "
                         "sample`, `tadq evaluate`; tadq.load(path) in Python), and quantize from its FP model folder")
    # every weight file checked whole first (an interrupted download, a dangling hub-cache link), and the variant
    # of a folder saved with save_pretrained(variant="fp16") only, which from_pretrained finds only when told
    try:
        weights = find_weight_files(model_dir)
    except DamagedFileError as error:
        raise DamagedFileError(f"could not load weights from {model_dir}: {error}") from error
    if weights.variant is not None:
        logger.info("%s holds its weights as the %r variant only; loading that", model_dir, weights.variant)
    try:  # use_safetensors: diffusers would otherwise fall back to unpickling a .bin
        model = family.model_class.from_pretrained(model_dir, use_safetensors=True, variant=weights.variant,
                                                   **diffusers_loading_options())
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # truncated or foreign weight files
        first = " ".join(str(error).split())[:300] or type(error).__name__  # torch puts the cause on line 2
        raise ValueError(f"could not load weights from {model_dir}: {first}") from error
    except (TypeError, KeyError, IndexError, AttributeError) as error:  # a config value of the wrong type
        first = " ".join(str(error).split())[:200]  # ("layers_per_block": "2") fails inside a diffusers block
        raise ValueError(f"{model_dir / 'config.json'} does not build a {class_name} ({type(error).__name__}: "
                         f"{first}): a value of the wrong type or shape; fix it or restore the file from the "
                         "model's download") from error
    require_stored_parameters(model, weights.files, str(model_dir))
    model.eval().requires_grad_(False)
    require_finite(model.state_dict(), f"model {model_dir}: weight")  # NaN used to fail late, as a zero_point error
    return model, _load_scheduler(path, model_dir)
