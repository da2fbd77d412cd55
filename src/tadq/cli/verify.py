"""``tadq verify ARTEFACT``: is this artefact exactly what tadq saved, and do its tables fit its config?

Checks, in order: every file against the SHA-256 manifest (nothing missing, changed or added), the structure
rebuilt from the config against the saved weights, finite weights, and every correction table's key (fitted,
for this model's bit label, tables as long as their sampler's steps). Exit 0 when all hold, 1 when the artefact
is damaged or inconsistent, 2 for a path that is not an artefact, 3 (``EXIT_NEWER``) for an artefact written in a
format newer than this tadq reads (``NewerVersionError``: upgrade tadq; saving again cannot help, and nothing says it
is damaged).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import USER_ERRORS, console, err_console, fail_cleanly, setup, torch_setup
from tadq.cli.sample import Verbose

__all__ = ["EXIT_NEWER", "verify_command", "check_tables"]

EXIT_NEWER = 3
"""``tadq verify``'s exit code for an artefact of a newer tadq (1 is damage, 2 a path that is not an artefact)."""


def check_tables(qmodel) -> list[str]:
    """One line per keyed correction; raises ``ValueError`` naming the first table that does not fit the model."""
    lines = []
    for position, member in enumerate(qmodel.corrections):
        name = f"correction {position} ({type(member).__name__})"
        if not member.keyed:
            lines.append(f"{name}: structural, no tables")
            continue
        if not member.fitted:
            raise ValueError(f"{name} is not fitted: its tables are missing; save the artefact again")
        key = member.table_key
        member.check_model(qmodel.config.label)  # the bit label the tables were fitted on
        recipe = getattr(qmodel, "recipe", None)
        if recipe is not None and (key.sampler_key, key.guidance_scale) != (recipe.sampler.key,
                                                                            float(recipe.guidance_scale)):
            raise ValueError(f"{name} was fitted for {key.sampler_key} at guidance {key.guidance_scale}, but the "
                             f"recipe deploys {recipe.sampler.key} at guidance {recipe.guidance_scale}; save the "
                             "artefact again")
        lengths = {buffer_name: int(buffer.shape[0]) for buffer_name, buffer in member.named_buffers(recurse=False)
                   if buffer.ndim >= 1}
        wrong = {k: v for k, v in lengths.items() if v != key.num_steps}
        if wrong:
            raise ValueError(f"{name}: tables {sorted(wrong)} have {sorted(set(wrong.values()))} rows, but the key "
                             f"says {key.num_steps} steps ({key.sampler_key}); save the artefact again")
        clip = "clip unrecorded" if not key.clip_recorded else (
            "no x̂₀ clipping" if key.clip_sample_range is None else f"x̂₀ clipped to ±{key.clip_sample_range}")
        lines.append(f"{name}: {key.bits}, {key.sampler_key}, guidance {key.guidance_scale}, {clip}")
    return lines


# tadq.io.save's staging folder (tadq.utils.make_staging_dir): ".NAME.tmp-PID-HOST-RANDOM", or ".NAME.tmp-RANDOM"
_STAGING = re.compile(r"^\..+\.tmp-[A-Za-z0-9_-]+$")


def _interrupted_overwrite(artefact: Path) -> str:
    """A hint naming the previous artefact an interrupted ``--overwrite`` left beside ``artefact``
    (``tadq.io.save``: the old folder is moved to ``.NAME.old-*/NAME`` before the new one is renamed into place, so
    a kill between the two renames leaves no folder at ``artefact``), or ``""``."""
    if not artefact.name or not artefact.parent.is_dir():
        return ""
    olds = list(artefact.parent.glob(f".{artefact.name}.old-*"))
    if not olds:  # the common case, a mistyped path: refused without importing tadq.io (torch)
        return ""
    from tadq.io import is_quantized_artefact

    left = sorted(str(old / artefact.name) for old in olds if is_quantized_artefact(old / artefact.name))
    if not left:
        return ""
    return (f"; a save with --overwrite was interrupted and left the previous artefact at {left[0]}: verify it and "
            f"move it back (mv {left[0]} {artefact}), or save again")


def verify_command(
    artefact: Annotated[Path, typer.Argument(help="A tadq artefact folder (`tadq quantize --out`).")],
    verbose: Verbose = False,
) -> None:
    """Check an artefact's files against its manifest, its weights against its config, its tables against both.

    Exit codes: 0 all hold; 1 damaged or inconsistent (save it again); 2 not an artefact; 3 written by a newer tadq
    (a newer format, manifest, config version or setting: upgrade tadq).
    """
    setup(verbose, 0)
    with fail_cleanly():
        if not artefact.is_dir():
            what = "is not a folder" if artefact.exists() else "does not exist"  # a typo read "is not a folder"
            raise FileNotFoundError(f"{artefact} {what}{_interrupted_overwrite(artefact)}")
        torch_setup(0)  # after the check above: a mistyped path is refused before torch is imported
        from tadq.io import is_quantized_artefact, load_quantized
        from tadq.io.manifest import MANIFEST_FILE, verify_manifest
        from tadq.safefiles import NewerVersionError

        if not is_quantized_artefact(artefact):
            raise ValueError(f"{artefact} is not a tadq artefact (no tadq_config.json)")
    try:
        if _STAGING.match(artefact.resolve().name):  # checked first: it may hold a config but never a manifest
            raise ValueError(f"{artefact} is the staging folder of a save that did not finish (tadq writes an "
                             "artefact there and renames it into place at the end); it is not an artefact: delete "
                             "it and save again")
        manifest = verify_manifest(artefact, allow_extra=False)
        qmodel, _ = load_quantized(artefact)
        tables = check_tables(qmodel)
    except NewerVersionError as error:  # not damage: this tadq cannot read it, a newer one can
        if verbose:
            err_console.print_exception()
        console.print(f"NEWER {artefact}: {' '.join(str(error).split())}", soft_wrap=True)
        raise typer.Exit(code=EXIT_NEWER) from error
    except USER_ERRORS as error:  # damage of any kind: one FAILED line, exit 1
        if verbose:
            err_console.print_exception()
        console.print(f"FAILED {artefact}: {' '.join(str(error).split())}", soft_wrap=True)
        raise typer.Exit(code=1) from error
    verdict, files = ("OK", "files match the manifest") if manifest else (
        "UNCHECKED", f"no {MANIFEST_FILE} (saved by an older tadq), so its files cannot be checked; save it again")
    console.print(f"{verdict} {artefact}: {files}; structure and finite weights load; "
                  f"{qmodel.config.label} {qmodel.config.method}", soft_wrap=True)
    for line in tables:
        console.print(f"  {line}", soft_wrap=True)
    if not manifest:
        raise typer.Exit(code=1)
