"""Names and ranges that need neither torch nor diffusers to check: seeds, sampler kinds, preset names.

The command line refuses a bad flag with these before it imports the library (seconds of torch and diffusers);
the library checks the same values with the same functions, which live here so that one definition serves both.
"""

from __future__ import annotations

import re

import numpy as np

__all__ = ["MAX_SEED", "check_seed", "SAMPLER_KINDS", "PRESET_NAMES", "BLOCK_SUFFIX", "preset_key"]

MAX_SEED = 2**32 - 1
"""The largest seed (and sample index): ``SeedSequence`` splits a larger int into 32-bit words, so seed s + k·2³²
at sample 0 would hash like seed s at sample k and replay its noise (calibration and evaluation seeds would no
longer be disjoint)."""


def check_seed(name: str, value: object) -> None:
    """Refuse anything but an int in [0, ``MAX_SEED``], naming ``name``: seeds are checked where a config or call
    takes them, before any work, with the same bound the noise draws hold."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"{name} must be an int in [0, 2**32 - 1], got {value!r}.")


SAMPLER_KINDS: tuple[str, ...] = ("ddim", "ddpm", "euler", "euler-ancestral", "dpmsolver++", "flow-euler")
"""The sampler kinds ``tadq.sampling.SamplerConfig`` runs."""

PRESET_NAMES: dict[str, bool] = {"W8A8": True, "W4A8": True, "W4A4": True, "W4A16": True, "W8A16": True,
                                 "W8A8-WSYM": True, "W4A8-FP8": True, "W8A8-FP8": True}
"""Each key of ``tadq.quant.qscheme.PRESETS`` → whether the preset quantizes weights (``-G<n>`` applies); the
schemes themselves are built there (a test holds the two in step)."""

BLOCK_SUFFIX = re.compile(r"^(?P<base>.+)-G(?P<size>[1-9][0-9]{0,5})$")
"""A preset name with block-wise weights: a key of ``PRESETS`` and ``-G<n>`` (``W4A8-G128``: one weight step per
128 consecutive weights of each output row, ``per_block``)."""


def preset_key(name: str) -> str:
    """The key of a preset name: a key of ``PRESETS``, or one with a ``-G<n>`` block suffix (``BLOCK_SUFFIX``); case
    and surrounding blanks ignored, as the comma lists of ``tadq run`` / ``tadq bench`` and recipe files read them
    (``--preset " w4a8"`` was refused by ``tadq quantize`` alone)."""
    if not isinstance(name, str):
        raise TypeError(f"a preset name is a string such as 'W4A8', got {type(name).__name__} {name!r}")
    key = name.strip().upper()
    if key in PRESET_NAMES:
        return key
    blocked = BLOCK_SUFFIX.match(key)
    if blocked is None or blocked["base"] not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESET_NAMES)}, optionally with block-wise "
                         "weights as a suffix -G<n> (W4A8-G128: one weight step per 128 weights of a row)")
    if not PRESET_NAMES[blocked["base"]]:
        raise ValueError(f"preset {name!r}: {blocked['base']} quantizes no weights, so -G{blocked['size']} (weight "
                         "blocks) does not apply")
    return key
