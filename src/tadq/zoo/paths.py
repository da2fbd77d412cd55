"""Where the shipped models sit, and the folder a ``--model`` name means: importable without torch, so that the
command line checks its output paths against the input model before it imports the library."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["SHIPPED_MODELS", "resolve_model_path", "shipped_dit_path", "shipped_model_path", "shipped_photos_path",
           "shipped_t2i_path"]


def shipped_model_path() -> Path:
    """The digits DDPM that ships inside the package (trained by ``tadq zoo train``)."""
    return Path(__file__).parent / "weights" / "digits-ddpm"


def shipped_photos_path() -> Path:
    """Folder of the shipped natural-image patch DDPM, beside the package."""
    return Path(__file__).resolve().parent / "weights" / "photos-ddpm"


def shipped_t2i_path() -> Path:
    """Folder of the shipped text-to-image digits model (StableDiffusionPipeline layout), beside the package."""
    return Path(__file__).resolve().parent / "weights" / "digits-t2i"


def shipped_dit_path() -> Path:
    """Folder of the shipped class-conditional DiT (DiTPipeline layout), beside the package."""
    return Path(__file__).resolve().parent / "weights" / "digits-dit"


# names ``tadq run --model`` accepts besides a folder: the models that ship inside the package
SHIPPED_MODELS: dict[str, Callable[[], Path]] = {
    "digits": shipped_model_path, "t2i": shipped_t2i_path, "photos": shipped_photos_path, "dit": shipped_dit_path,
}


def resolve_model_path(model: str | None) -> Path:
    """The folder of ``model``: a shipped model's name (``digits``, ``t2i``, ``photos``, ``dit``; ``None`` =
    ``digits``) or a path.

    An existing folder of the same name wins over a shipped name, so a user's ``./t2i`` is never shadowed.
    """
    if model is None:
        return shipped_model_path()
    if model in SHIPPED_MODELS and not Path(model).exists():
        return SHIPPED_MODELS[model]()
    return Path(model)
