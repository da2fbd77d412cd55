"""FreeU (diffusers' ``enable_freeu``): a runtime setting of a UNet's up blocks that no config file records.

A model quantized with FreeU on is calibrated and sampled with it, so an artefact records the four factors and the
loader turns FreeU back on: without that, the loaded model silently sampled other images than the saved one.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["FREEU_FACTORS", "freeu_settings", "apply_freeu", "match_freeu"]

FREEU_FACTORS = ("s1", "s2", "b1", "b2")


def freeu_settings(model: nn.Module) -> dict[str, float] | None:
    """The FreeU factors ``model`` runs with, ``None`` when FreeU is off (or the model has no up blocks).

    Raises:
        ValueError: its up blocks hold different or partial factors (set by hand, not by ``enable_freeu``).
    """
    blocks = getattr(model, "up_blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        return None
    found = [tuple(getattr(block, name, None) for name in FREEU_FACTORS) for block in blocks]
    if all(value is None for values in found for value in values):
        return None
    if len(set(found)) != 1 or any(value is None for value in found[0]):
        raise ValueError(f"{type(model).__name__}'s up blocks hold different FreeU factors {found}; turn FreeU on "
                         "with model.enable_freeu(s1, s2, b1, b2) (or off with disable_freeu()) before saving")
    return {name: float(value) for name, value in zip(FREEU_FACTORS, found[0], strict=True)}


def apply_freeu(model: nn.Module, settings: Any, where: str) -> None:
    """Turn FreeU on in ``model`` with the recorded ``settings`` (``None``: leave it off), checked first."""
    if settings is None:
        return
    if (not isinstance(settings, dict) or sorted(settings) != sorted(FREEU_FACTORS)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                       for v in settings.values())):
        raise ValueError(f"{where}: freeu is {settings!r}, not the four finite factors {list(FREEU_FACTORS)}; save "
                         "the artefact again")
    enable = getattr(model, "enable_freeu", None)
    if not callable(enable):
        raise ValueError(f"{where}: records FreeU factors, but a {type(model).__name__} has no FreeU; save the "
                         "artefact again")
    enable(**{name: float(settings[name]) for name in FREEU_FACTORS})


def match_freeu(reference: nn.Module, model: nn.Module) -> dict[str, float] | None:
    """Give the FP ``reference`` the FreeU setting ``model`` runs with (returned), so paired metrics measure the
    quantization alone; a reference folder cannot record FreeU, and without it the FreeU change counted as error."""
    settings = freeu_settings(model)
    apply_freeu(reference, settings, f"the FP reference {type(reference).__name__}")
    return settings
