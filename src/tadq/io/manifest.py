"""``tadq_manifest.json``: the SHA-256 and size of every file of an artefact, written at save, checked at load.

Safetensors checks its header, not its data: bytes flipped inside ``tadq_weights.safetensors`` used to load and
sample with a 10 dB worse result and exit code 0. The manifest names the file that changed, went missing or was
added. It holds no time or host, so two saves of the same model give the same bytes (a hash identifies a model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

from tadq.safefiles import NewerVersionError
from tadq.utils import write_utf8

__all__ = ["MANIFEST_FILE", "ArtefactDamaged", "NewerManifestError", "check_listed", "check_saved_file", "file_sha256",
           "relative_name", "unlisted_files", "verify_manifest", "write_manifest"]

MANIFEST_FILE = "tadq_manifest.json"
MANIFEST_FORMAT = "tadq-manifest"
MANIFEST_VERSION = 1


class ArtefactDamaged(ValueError):
    """A file of an artefact differs from what its manifest recorded at save time."""


class NewerManifestError(ArtefactDamaged, NewerVersionError):
    """A manifest of a newer version than this tadq reads: its files cannot be checked here, yet nothing says they
    are damaged (an ``ArtefactDamaged`` for the callers that refuse what they cannot check)."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def relative_name(path: PurePath, folder: PurePath) -> str:
    """``path``'s name below ``folder`` with ``/`` between its parts, on every OS: ``str()`` gave ``unet\\config.json``
    on Windows, a name ``read_manifest`` refuses (the artefact could not be loaded on the machine that saved it) and
    one no other OS finds."""
    return path.relative_to(folder).as_posix()


def _files(folder: Path) -> list[str]:
    return sorted(relative_name(p, folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Hash every file under ``folder`` (the manifest itself excepted) into ``folder/tadq_manifest.json``."""
    folder = Path(folder)
    files = {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
             for name in _files(folder)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files, "digest": _digest(files)}
    write_utf8(json.dumps(manifest, indent=2, sort_keys=True) + "\n", folder / MANIFEST_FILE)
    return manifest


def _digest(files: dict[str, Any]) -> str:
    """SHA-256 of the file list itself: a byte changed in the manifest (a hash or a name) is then named as the
    manifest's damage, not blamed on an intact file it no longer describes."""
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _self_check(folder: Path, manifest: dict[str, Any], error: ArtefactDamaged) -> ArtefactDamaged:
    """The manifest's own damage instead of ``error`` when its file list no longer matches its digest (manifests
    written before the digest existed have none and are taken as they are)."""
    recorded = manifest.get("digest")
    if recorded is None or recorded == _digest(manifest["files"]):
        return error
    claim = str(error).split("; ")[0]  # what the damaged list says, without its advice (given once below)
    return ArtefactDamaged(f"{folder / MANIFEST_FILE} itself was changed after saving (its file list no longer "
                           f"matches its digest), so its claim that {claim} cannot be trusted; save the artefact "
                           "again")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest, ``None`` for an artefact saved before manifests existed; ``ArtefactDamaged`` if unreadable."""
    path = folder / MANIFEST_FILE
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_file():  # a folder, a device or a dangling link is damage, not "an older artefact"
        raise ArtefactDamaged(f"{path} is not a regular file, so the artefact cannot be checked: save it again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        ok = manifest.get("format") == MANIFEST_FORMAT and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            for v in files.values())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise ArtefactDamaged(f"{path} is damaged (not a tadq manifest), so the artefact cannot be checked: save "
                              "it again")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtefactDamaged(f"{path} has version {version!r}, not a manifest version; save the artefact again")
    if version > MANIFEST_VERSION:
        raise NewerManifestError(f"{path} is manifest version {version}, newer than this tadq reads "
                              f"({MANIFEST_VERSION}); upgrade tadq to check and load the artefact")
    outside = [name for name in manifest["files"] if not _inside(name)]
    if outside:  # hashing /etc/... or ../../x would read files that are not the artefact's
        raise ArtefactDamaged(f"{path} lists {outside[0]!r}, a path outside the artefact folder; save the artefact "
                              "again")
    return manifest


def _inside(name: str) -> bool:
    """Whether a manifest entry is a relative path below the folder (what ``write_manifest`` writes)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not PurePosixPath(name).is_absolute() and "\\" not in name and ".." not in parts


def check_listed(folder: str | Path, names: Iterable[str]) -> None:
    """Raise ``ArtefactDamaged`` for a file among ``names`` that exists but the manifest does not list: a file tadq
    reads must be covered by a hash (a manifest with entries removed would otherwise check nothing). No manifest:
    nothing to check (an older artefact)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for name in names:
        if name not in manifest["files"] and ((folder / name).exists() or (folder / name).is_symlink()):
            raise ArtefactDamaged(f"{folder / name} is not listed in {MANIFEST_FILE}, so it cannot be checked (added "
                                  "or replaced after saving, or the manifest was edited); save the artefact again")


def check_saved_file(folder: str | Path, name: str) -> None:
    """Raise ``ArtefactDamaged`` if ``folder`` is an artefact whose manifest lists ``name`` and that file is missing,
    resized or changed. For the small files a command reads before it loads the artefact (``model_index.json``,
    ``tadq_recipe.json``): a truncated one was reported as invalid JSON to "fix or replace", not as damage to
    save again, and an edited one that still parsed was read as it stood. No manifest, or ``name`` not in it:
    nothing to check here (the loader's ``verify_manifest`` and ``check_listed`` still run)."""
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).exists() and not (folder / MANIFEST_FILE).is_symlink():
        return  # a plain diffusers folder, or an artefact saved before manifests
    entry = read_manifest(folder)["files"].get(name)
    if entry is not None:
        _check_file(folder / name, entry)


def unlisted_files(folder: str | Path) -> list[str]:
    """Files under ``folder`` its manifest does not list (put there after tadq saved it), sorted; ``[]`` without a
    manifest. Raises ``ArtefactDamaged`` for an unreadable manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    return [] if manifest is None else _unlisted(folder, manifest)


def _unlisted(folder: Path, manifest: dict[str, Any]) -> list[str]:
    return sorted(set(_files(folder)) - set(manifest["files"]))


def verify_manifest(folder: str | Path, *, allow_extra: bool = True, required: Iterable[str] = ()) -> bool:
    """Raise ``ArtefactDamaged`` naming the first file that is missing, resized or changed; ``False`` if there is
    no manifest (an older artefact), ``True`` if every file matches.

    Files added after the save are ignored unless ``allow_extra`` is false (``tadq verify`` reports them), except
    those named in ``required`` (the files the loader reads), which must be listed when they exist.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return False
    for name, entry in sorted(manifest["files"].items()):
        try:
            _check_file(folder / name, entry)
        except ArtefactDamaged as error:
            raise _self_check(folder, manifest, error) from None
    recorded = manifest.get("digest")
    if recorded is not None and recorded != _digest(manifest["files"]):
        # every file matches its entry, but the list is not the one saved: a file replaced with its entry rewritten
        # to match passed (the digest was read only once a file had failed)
        raise ArtefactDamaged(f"{folder / MANIFEST_FILE} itself was changed after saving (its file list no longer "
                              "matches its digest), so the files it vouches for cannot be trusted; save the "
                              "artefact again")
    check_listed(folder, required)
    if not allow_extra:
        extra = _unlisted(folder, manifest)  # the manifest read above, not a second read
        if extra:
            raise ArtefactDamaged(f"{folder} holds files the manifest does not list: {extra[:3]}")
    return True


def _check_file(path: Path, entry: dict[str, Any]) -> None:
    """Raise ``ArtefactDamaged`` unless ``path`` is a regular file of the recorded size and SHA-256."""
    if path.exists() and not path.is_file():
        raise ArtefactDamaged(f"{path} is not a regular file (a folder or a device; listed in {MANIFEST_FILE} as "
                              "a file); save the artefact again")
    if not path.is_file():
        raise ArtefactDamaged(f"{path} is missing (listed in {MANIFEST_FILE}); the artefact is incomplete: "
                              "save it again")
    if path.stat().st_size != entry["bytes"]:
        raise ArtefactDamaged(f"{path} has {path.stat().st_size} bytes, {entry['bytes']} when saved (truncated "
                              "or replaced); save the artefact again")
    if file_sha256(path) != entry["sha256"]:
        raise ArtefactDamaged(f"{path} fails its SHA-256 check (bytes changed after saving); save the artefact "
                              "again")
