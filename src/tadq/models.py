"""Load a diffusers denoiser and its scheduler from a local folder (no hub access), or the shipped default."""

from __future__ import annotations

import logging
from pathlib import Path

from diffusers import DDPMScheduler, SchedulerMixin
from safetensors import SafetensorError
from torch import nn

from tadq.registry import model_family, registered_families
from tadq.safefiles import read_json_file, require_finite
from tadq.sampling.config import check_drivable

__all__ = ["load_pipeline_parts", "load_scheduler", "shipped_model_path"]

logger = logging.getLogger(__name__)


# Released DiT (facebook/DiT-XL-2-*) and PixArt-α folders name their denoiser ``Transformer2DModel``;
# ``Transformer2DModel.from_pretrained`` loads them as these classes, chosen by ``norm_type``.
_LEGACY_TRANSFORMER_CLASSES = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


def shipped_model_path() -> Path:
    """The digits DDPM that ships inside the package (trained by ``tadq zoo train``)."""
    return Path(__file__).parent / "zoo" / "weights" / "digits-ddpm"


def _model_dir(path: Path) -> Path:
    if (path / "model_index.json").exists():
        index = read_json_file(path / "model_index.json", "pipeline index")
        if not isinstance(index, dict):
            raise ValueError(f"{path / 'model_index.json'} holds a JSON {type(index).__name__}, not an object")
        subfolders = sorted({family.subfolder for family in registered_families().values()})
        for name in subfolders:
            if name in index and (path / name / "config.json").exists():
                if isinstance(index.get("text_encoder"), list) and None not in index["text_encoder"]:
                    logger.info("%s is a %s: loading its %s and scheduler only; tadq.pipelines.load_fp_pipeline "
                                "loads the whole pipeline and PromptConditions encodes prompts for it", path,
                                index.get("_class_name"), name)
                return path / name
        for name in subfolders:  # named, but its config is gone: say that, not "names no denoiser"
            if name in index:
                raise ValueError(f"{path / name / 'config.json'} is missing: {path}/model_index.json names the "
                                 f"denoiser folder {name!r}, but its config is not there (restore the folder)")
        raise ValueError(f"{path}/model_index.json names no denoiser folder (looked for {subfolders})")
    if (path / "config.json").exists():
        return path
    raise ValueError(
        f"{path} is not a diffusers model folder: expected model_index.json (a pipeline) or config.json "
        "with weights (a model saved by save_pretrained)"
    )


def _scheduler_classes() -> dict[str, type[SchedulerMixin]]:
    """Every training-scheduler class tadq honours (``tadq.sampling.SUPPORTED_SCHEDULERS``), by name: discrete ᾱ_t
    schedules (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver multistep, PNDM, LMS) and flow matching."""
    import diffusers

    from tadq.sampling.config import SUPPORTED_SCHEDULERS

    return {name: getattr(diffusers, name) for name in SUPPORTED_SCHEDULERS}


def _load_scheduler(path: Path, model_dir: Path) -> SchedulerMixin:
    """The folder's own scheduler, as its class: it records the *training* schedule (betas, or a flow shift) and the
    sampler the model ships with (``tadq.sampling.default_sampler``); the sampler tadq runs is the user's choice,
    and ``make_scheduler`` builds it on this schedule. A class tadq cannot honour (score SDE, UniPC, Heun...) is
    refused by name instead of being read as a DDPM config."""
    for candidate in (path / "scheduler", model_dir / "scheduler", path):
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
    if not path.exists():
        hint = " (train it with `tadq zoo train`)" if path == shipped_model_path() else ""
        raise FileNotFoundError(f"model folder {path} does not exist{hint}")
    model_dir = _model_dir(path)
    model_config = read_json_file(model_dir / "config.json", "model config")
    class_name = model_config.get("_class_name") if isinstance(model_config, dict) else None
    if class_name == "Transformer2DModel":  # the legacy name of released DiT / PixArt-α folders, as diffusers reads it
        class_name = _LEGACY_TRANSFORMER_CLASSES.get(model_config.get("norm_type"), class_name)
    family = model_family(str(class_name), where=str(model_dir))
    if (path / "tadq_config.json").exists():
        raise ValueError(f"{path} is a tadq quantized artefact, not an FP model: sample or evaluate it (`tadq "
                         "sample`, `tadq evaluate`; tadq.load(path) in Python), and quantize from its FP model folder")
    if not any(model_dir.glob("*.safetensors")):
        found = sorted(p.name for p in model_dir.iterdir() if p.is_file() and p.name != "config.json")
        raise ValueError(f"{model_dir} holds no safetensors weights (found {found or 'no weight file'}); tadq reads "
                         "safetensors only, never a pickle (.bin, .pt, .ckpt): re-save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    try:  # use_safetensors: diffusers would otherwise fall back to unpickling a .bin
        model = family.model_class.from_pretrained(model_dir, low_cpu_mem_usage=False,  # no accelerate needed
                                                   use_safetensors=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:  # truncated or foreign weight files
        first = " ".join(str(error).split())[:300] or type(error).__name__  # torch puts the cause on line 2
        raise ValueError(f"could not load weights from {model_dir}: {first}") from error
    model.eval().requires_grad_(False)
    require_finite(model.state_dict(), f"model {model_dir}: weight")  # NaN used to fail late, as a zero_point error
    return model, _load_scheduler(path, model_dir)
