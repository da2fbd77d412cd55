"""Load a diffusers denoiser and its scheduler from a local folder (no hub access), or the shipped default."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel
from torch import nn

__all__ = ["load_pipeline_parts", "shipped_model_path", "SUPPORTED_MODEL_CLASSES"]

logger = logging.getLogger(__name__)
SUPPORTED_MODEL_CLASSES: dict[str, type[nn.Module]] = {"UNet2DModel": UNet2DModel}


def shipped_model_path() -> Path:
    """The digits DDPM that ships inside the package (trained by ``tadq zoo train``)."""
    return Path(__file__).parent / "zoo" / "weights" / "digits-ddpm"


def _model_dir(path: Path) -> Path:
    if (path / "model_index.json").exists():
        index = json.loads((path / "model_index.json").read_text())
        for name in ("unet", "transformer"):
            if name in index and (path / name / "config.json").exists():
                return path / name
        raise ValueError(f"{path}/model_index.json names no denoiser folder (looked for 'unet', 'transformer')")
    if (path / "config.json").exists():
        return path
    raise ValueError(
        f"{path} is not a diffusers model folder: expected model_index.json (a pipeline) or config.json "
        "with weights (a model saved by save_pretrained)"
    )


def _load_scheduler(path: Path, model_dir: Path) -> SchedulerMixin:
    for candidate in (path / "scheduler", model_dir / "scheduler", path):
        config_file = candidate / "scheduler_config.json"
        if config_file.exists():
            return DDPMScheduler.from_config(json.loads(config_file.read_text()))
    logger.warning("no scheduler_config.json under %s; using DDPM defaults (1000 steps, linear betas)", path)
    return DDPMScheduler()


def load_pipeline_parts(path: str | Path | None = None) -> tuple[nn.Module, SchedulerMixin]:
    """(denoiser in eval mode, training scheduler) from a diffusers folder; ``None`` loads the shipped model.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it is not a diffusers model folder, or the model class is not supported.
    """
    path = Path(path) if path is not None else shipped_model_path()
    if not path.exists():
        hint = " (train it with `tadq zoo train`)" if path == shipped_model_path() else ""
        raise FileNotFoundError(f"model folder {path} does not exist{hint}")
    model_dir = _model_dir(path)
    class_name = json.loads((model_dir / "config.json").read_text()).get("_class_name")
    if class_name not in SUPPORTED_MODEL_CLASSES:
        raise ValueError(f"{model_dir} holds a {class_name!r}; supported: {sorted(SUPPORTED_MODEL_CLASSES)}")
    if (path / "tadq_config.json").exists():
        raise ValueError(f"{path} is a tadq quantized artefact, not an FP model: load it with tadq.load(path)")
    try:
        model = SUPPORTED_MODEL_CLASSES[class_name].from_pretrained(model_dir)
    except OSError as error:
        raise ValueError(f"could not load weights from {model_dir}: {error}") from error
    model.eval().requires_grad_(False)
    return model, _load_scheduler(path, model_dir)
