"""Names and ranges that need neither torch nor diffusers to check: seeds, sampler kinds and η, preset names, dtype
names.

The command line refuses a bad flag with these before it imports the library (seconds of torch and diffusers);
the library checks the same values with the same functions, which live here so that one definition serves both.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

__all__ = ["MAX_SEED", "check_seed", "SAMPLER_KINDS", "check_eta", "PRESET_NAMES", "BLOCK_SUFFIX", "preset_key",
           "DTYPE_NAMES", "check_dtype_name", "finite_float"]


def finite_float(value: Any) -> bool:
    """Whether ``value`` is a real, finite number (JSON loads may give anything)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

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


def check_eta(eta: object, kind: str | None = None) -> None:
    """``SamplerConfig``'s checks of its η: a finite number in [0, 1] and, when ``kind`` is given, 0 for every kind
    but DDIM. The command line calls it with ``kind=None`` where the kind is the model's to decide (it is checked
    again, with the kind, when the sampler is built)."""
    if not finite_float(eta):
        raise ValueError(f"SamplerConfig.eta must be a finite float in [0, 1], got {eta!r}.")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"SamplerConfig.eta must lie in [0, 1] (0 = deterministic DDIM), got {eta}.")
    if kind == "ddpm" and eta != 0.0:
        raise ValueError(
            f"SamplerConfig.eta={eta} only applies to kind='ddim'; DDPM's noise is set by the scheduler's "
            "variance_type. Use eta=0.0 with kind='ddpm', or kind='ddim' with eta=1.0 for DDPM-like noise."
        )
    if kind is not None and kind not in ("ddim", "ddpm") and eta != 0.0:
        raise ValueError(f"SamplerConfig.eta={eta} only applies to kind='ddim'; {kind} fixes its own "
                         "noise (use eta=0.0).")

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


DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The keys of ``tadq.device.DTYPES``, the compute dtypes by name (a test holds the two in step)."""


def check_dtype_name(name: str) -> None:
    """Refuse a dtype name that is not one of ``DTYPE_NAMES`` (``resolve_dtype``'s check of a name)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {list(DTYPE_NAMES)}")
