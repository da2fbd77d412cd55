"""Save and load a ``CorrectionStack`` beside a quantized artefact (docs/architecture.md#artefact).

``corrections.safetensors`` holds every member's table buffers under ``members.<i>.<name>``; each member's extra
state (its ``TableKey``) is JSON in the file's metadata. The members' configs, in order, go into
``tadq_config.json`` (written by ``tadq.io``), so loading rebuilds the same stack through the registries and a
missing table names the correction that expected it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from tadq.corrections.stack import CorrectionStack
from tadq.safefiles import DamagedFileError, require_finite

__all__ = ["CORRECTIONS_FILE", "load_corrections", "save_corrections"]

logger = logging.getLogger(__name__)

CORRECTIONS_FILE = "corrections.safetensors"
_EXTRA_STATE_KEY = "tadq_extra_state"


def _check_rows(stack: CorrectionStack, file: Path) -> None:
    """Every table of a keyed member has one row per step of the sampler its key names (a table cut short would
    be indexed past its end, or misread, while sampling)."""
    for position, member in enumerate(stack):
        if not (member.keyed and member.fitted):
            continue
        steps = member.table_key.num_steps
        wrong = {name: int(buffer.shape[0]) for name, buffer in member.named_buffers(recurse=False)
                 if buffer.ndim >= 1 and int(buffer.shape[0]) != steps}
        if wrong:
            raise ValueError(f"{file}: correction {position} ({type(member).__name__}) tables {sorted(wrong)} have "
                             f"{sorted(set(wrong.values()))} rows, but its key says {steps} steps "
                             f"({member.table_key.sampler_key}); save the artefact again")


def _owner(stack: CorrectionStack, key: str) -> str:
    """'correction <i> (<Class>, <Config>)' for a ``members.<i>.…`` key, for error messages."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "members" and parts[1].isdigit() and int(parts[1]) < len(stack):
        member = stack[int(parts[1])]
        return f"correction {parts[1]} ({type(member).__name__}, {type(member.config).__name__})"
    return "the correction stack"


def _earlier_dtypes(stack: CorrectionStack, key: str) -> tuple[torch.dtype, ...]:
    """The dtypes an older tadq saved the table ``members.<i>.<table>`` in (``Correction.earlier_table_dtypes``)."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "members" and parts[1].isdigit() and int(parts[1]) < len(stack):
        return type(stack[int(parts[1])]).earlier_table_dtypes.get(parts[2], ())
    return ()


def save_corrections(stack: CorrectionStack, folder: str | Path) -> list[dict[str, Any]]:
    """Write the stack's tables to ``folder/corrections.safetensors``; returns the configs for ``tadq_config.json``.

    Nothing is written for an empty stack.

    Raises:
        ValueError: a member with per-step tables is not fitted.
    """
    unfitted = [f"{i} ({type(m).__name__})" for i, m in enumerate(stack) if m.keyed and not m.fitted]
    if unfitted:
        raise ValueError(f"corrections {unfitted} are not fitted; fit them (tadq.corrections.fit_stack) before saving")
    if len(stack) == 0:
        return []
    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in stack.state_dict().items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().contiguous().cpu()
        else:
            extra[key] = value
    save_file(tensors, str(Path(folder) / CORRECTIONS_FILE),
              metadata={_EXTRA_STATE_KEY: json.dumps(extra, sort_keys=True)})  # one key: deterministic bytes
    return stack.configs()


def load_corrections(folder: str | Path, configs: list[dict[str, Any]]) -> CorrectionStack:
    """Rebuild the stack described by ``configs`` and load its tables from ``folder/corrections.safetensors``.

    Raises:
        FileNotFoundError: configs name corrections but the file is missing.
        ValueError: a key is missing (the message names the correction that expected it) or unexpected.
    """
    stack = CorrectionStack.from_configs(configs)
    if len(stack) == 0:
        return stack
    file = Path(folder) / CORRECTIONS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing but tadq_config.json lists {len(stack)} corrections: the "
                                "artefact is incomplete, save it again")
    template = stack.state_dict()
    expected = set(template)
    with safe_open(str(file), framework="pt") as handle:
        try:
            extra = json.loads((handle.metadata() or {}).get(_EXTRA_STATE_KEY, "{}"))
        except ValueError as error:
            raise DamagedFileError(f"{file}: its {_EXTRA_STATE_KEY} metadata is not valid JSON ({error}); save the "
                                   "artefact again") from error
        if not isinstance(extra, dict):
            raise DamagedFileError(f"{file}: its {_EXTRA_STATE_KEY} metadata is not a JSON object; save the artefact "
                                   "again")
        stored = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, value in sorted(stored.items()):  # load_state_dict would cast a float32 or int table silently
        wanted = template.get(key)
        if isinstance(wanted, Tensor) and value.dtype in _earlier_dtypes(stack, key):
            stored[key] = value = value.to(wanted.dtype)
        if isinstance(wanted, Tensor) and value.dtype != wanted.dtype:
            raise ValueError(f"{file}: table {key!r} is {str(value.dtype).removeprefix('torch.')}, but "
                             f"{_owner(stack, key)} stores {str(wanted.dtype).removeprefix('torch.')}; save the "
                             "artefact again")
    require_finite(stored, f"{file}: table")
    stored.update(extra)
    for position, member in enumerate(stack):  # buffers an older tadq did not write (Correction.earlier_state)
        prefix = f"members.{position}."
        own = {key[len(prefix):]: value for key, value in stored.items() if key.startswith(prefix)}
        for name, value in member.earlier_state(own).items():
            stored.setdefault(prefix + name, value)
    missing = sorted(expected - set(stored))
    if missing:
        raise ValueError(f"{file.name} lacks {missing[0]!r}, expected by {_owner(stack, missing[0])}; the artefact "
                         "is incomplete or was saved with other corrections: save it again")
    unexpected = sorted(set(stored) - expected)
    if unexpected:
        raise ValueError(f"{file.name} has keys the configured corrections do not expect, e.g. {unexpected[:3]}; "
                         "tadq_config.json and the tables disagree: save the artefact again")
    try:
        stack.load_state_dict(stored)
    except (ValueError, TypeError) as error:  # a member's own reading of its saved state (its table key)
        raise ValueError(f"{file}: {error}") from error
    # save_corrections refuses unfitted keyed members: one without its key here lost it after saving
    unfitted = [f"{i} ({type(m).__name__})" for i, m in enumerate(stack) if m.keyed and not m.fitted]
    if unfitted:
        raise ValueError(f"{file}: corrections {unfitted} have tables but no table key (which sampler, guidance and "
                         "bits they were fitted for); the file is damaged: save the artefact again")
    _check_rows(stack, file)
    logger.info("loaded %d corrections from %s", len(stack), file)
    return stack
