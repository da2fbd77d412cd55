"""The shipped model folders and how each is made again: the hint a loader adds when one is missing or damaged.

The hint names absolute paths (the folders sit beside the installed package): a ``src/tadq/...`` path is right only
from a source checkout's root, and from anywhere else ``tadq zoo train --out src/...`` trained into a new folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

__all__ = ["SHIPPED_WEIGHTS", "TRAIN_COMMANDS", "error_line", "how_to_make", "load_classifier_folder",
           "regenerate_hint"]

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
# shipped folder -> the `tadq zoo` command that trains it (docs/models.md gives each run's exact settings)
TRAIN_COMMANDS = {
    "digits-ddpm": "train", "photos-ddpm": "train-photos", "digits-t2i": "train-t2i", "digits-dit": "train-dit",
    "digits-classifier": "train-classifier", "photo-classifier": "train-photo-classifier",
}


def regenerate_hint(folder: str | Path) -> str:
    """``""`` unless ``folder`` is one of the shipped model folders; then a sentence (starting with "; ") saying
    how to get it back: restore the package's copy, or retrain it into that folder (with ``--overwrite`` when the
    folder still records a finished run, which the command would otherwise refuse to replace)."""
    folder = Path(folder)
    try:
        resolved = folder.resolve()
    except OSError:
        return ""
    if resolved.parent != SHIPPED_WEIGHTS or resolved.name not in TRAIN_COMMANDS:
        return ""
    overwrite = " --overwrite" if (resolved / "training_info.json").is_file() else ""
    return (f"; it is the shipped {resolved.name} model: restore it (reinstall tadq, or `git checkout -- "
            f"src/tadq/zoo/weights/{resolved.name}` in a source checkout) or retrain it with `tadq zoo "
            f"{TRAIN_COMMANDS[resolved.name]} --out {resolved}{overwrite}` (docs/models.md gives the exact settings)")


def how_to_make(folder: str | Path, command: str) -> str:
    """How to get a model folder back: the shipped folder's hint, else ``tadq zoo COMMAND`` into it (with
    ``--overwrite`` when a finished run's record is still there: the command refuses to replace it otherwise)."""
    if hint := regenerate_hint(folder):
        return hint
    overwrite = " --overwrite" if (Path(folder) / "training_info.json").is_file() else ""
    return f"; create it with `tadq zoo {command} --out {folder}{overwrite}`"


def error_line(error: BaseException) -> str:
    """``Type: message`` on one line, for an error wrapped into a message of tadq's own."""
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_classifier_folder(folder: Path, build: Callable[..., nn.Module], what: str, command: str) -> nn.Module:
    """A classifier saved as ``config.json`` (its architecture) and ``model.safetensors``, in eval mode with
    gradients off (a fixed measuring instrument); a missing or damaged folder is one error naming it and how to
    make it again (``tadq zoo COMMAND``), not a bare JSONDecodeError or SafetensorError naming neither."""
    how = how_to_make(folder, command)
    missing = [name for name in ("model.safetensors", "config.json") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no {what} at {folder} (missing {', '.join(missing)}){how}")
    try:
        architecture = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        architecture["channels"] = tuple(architecture["channels"])
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten: the caller's torch RNG stays
            model = build(**architecture)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except (ValueError, TypeError, KeyError, RuntimeError, SafetensorError, UnicodeDecodeError) as error:
        raise ValueError(f"the {what} at {folder} is damaged ({error_line(error)}){how}") from error
    model.eval()
    model.requires_grad_(False)
    return model
