"""Small helpers shared across tadq: atomic writes, versions, seeding."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["PNG_MARK", "atomic_torch_save", "atomic_write_text", "atomic_write_json", "library_versions",
           "public_config", "save_figure"]

# the PNG text chunk tadq writes into every figure it saves, by which an existing PNG is known as its own
PNG_MARK = {"tadq": "tadq-output"}


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file behind (write to a temp file, then rename)."""
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text atomically."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically, indented for people to read."""
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=False), path)


def save_figure(fig: Any, path: str | Path, dpi: int = 130) -> Path:
    """Save a matplotlib figure as a PNG carrying tadq's mark (``fsguard.PNG_MARK``: a later run may replace it,
    nothing else is replaced) through a temp file and a rename, so an interrupt never leaves a truncated PNG in
    place of a finished one; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        _atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, metadata=PNG_MARK))
    finally:
        plt.close(fig)
    return path


def library_versions() -> dict[str, str]:
    """Versions that decide numerics, recorded beside every artefact tadq writes."""
    import diffusers

    from tadq._version import __version__

    return {
        "tadq": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


# what a config records about where it came from, not how the module computes: diffusers writes its version and
# source under ``_`` keys, transformers its version as ``transformers_version``
_PROVENANCE_KEYS = frozenset({"transformers_version"})


def public_config(module: Any) -> dict[str, Any]:
    """A diffusers/transformers module's config without where it was loaded from or by which library version (the
    ``_``-keys, ``transformers_version``): the settings its forward reads besides the weights (``sample_size``,
    ``norm_eps``, ``center_input_sample``, a VAE's ``scaling_factor``, a text encoder's ``layer_norm_eps``...),
    which no attribute may hold. Empty for a plain module."""
    config = getattr(module, "config", None)
    if config is None:
        return {}
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config) if isinstance(config, Mapping) else {}
    return {str(key): value for key, value in items.items()
            if not str(key).startswith("_") and str(key) not in _PROVENANCE_KEYS}
