"""Where tadq may write: output folders carry a marker, and only marked folders are ever replaced or filled.

``--overwrite`` used to delete whatever was at ``--out``: an unrelated folder, a plain file, or the input model's
own folder. Now every folder tadq creates gets ``tadq_output.json`` (artefacts: also ``tadq_manifest.json``), and
``check_output_dir`` refuses, before any work starts, to replace or fill a folder without it, a plain file, or a
folder that is, holds or lies inside an input model, unless the caller passes ``force_foreign`` (the CLI's
``--force-foreign``). It also checks that the folder can be written, so a read-only target fails first, not after
an hour of quantization.

``check_path_shape`` (run by each check) refuses paths nothing can be written at, or that would surprise: a name
past the file system's limit, a ``~`` the shell did not expand, a symlink that points nowhere; outputs may not
lie inside another artefact either (its manifest would no longer match), and a symlink at a path tadq replaces
whole (an artefact folder, any output file) is refused rather than replaced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

# PNG_MARK re-exported: by it a PNG is known as tadq's own
from tadq.utils import PNG_MARK, _host_tag, _process_alive, atomic_write_text, stale_temp_file

__all__ = ["MARKER_FILE", "PNG_MARK", "OutputRefused", "check_output_dir", "check_output_file", "check_path_shape",
           "check_writable_dir", "is_tadq_file", "is_tadq_output", "lock_path", "mark_output", "output_kind",
           "output_lock"]

MARKER_FILE = "tadq_output.json"
# JSON files by which folders written before the marker existed are still recognised as tadq's
_LEGACY_FILES = ("tadq_config.json", "results.json", "report.json", "manifest.json", "training_info.json")
# tadq's own files in a folder that is not marked (a shipped model's, kept free of the marker) while training runs
_UNMARKED_TADQ_FILES = ("train_checkpoint.safetensors",)
FORCE_HINT = "pass --force-foreign (force_foreign=True) to write there anyway"
LOCK_SUFFIX = ".tadq-lock"
# a lock file with no readable holder this long after it was made is a leftover: its maker writes the holder at once
_UNREADABLE_LOCK_STALE_S = 60.0


class OutputRefused(ValueError):
    """Writing to this path could destroy data tadq did not write; nothing was written or deleted."""


def is_tadq_output(folder: str | Path) -> bool:
    """Whether ``folder`` carries tadq's marker (or is an artefact of an older tadq)."""
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("format") == "tadq-output"
        except (ValueError, AttributeError, OSError, UnicodeDecodeError):
            return False
    return any(_written_by_tadq(folder / name) for name in _LEGACY_FILES) \
        or any(is_tadq_file(folder / name) for name in _UNMARKED_TADQ_FILES)


def output_kind(folder: str | Path) -> str | None:
    """The kind of output (``artefact``, ``run``, ``samples``...) ``folder``'s marker records; ``None`` without a
    readable marker (no folder, a foreign one, or one written before the marker existed)."""
    marker = Path(folder) / MARKER_FILE
    try:
        document = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
    except (ValueError, OSError, UnicodeDecodeError):
        return None
    if isinstance(document, dict) and document.get("format") == "tadq-output":
        kind = document.get("kind")
        return kind if isinstance(kind, str) else None
    return None


def _written_by_tadq(path: Path) -> bool:
    """A JSON file tadq writes: its format says tadq, or it records tadq's version."""
    if not path.is_file() or path.stat().st_size > 1 << 24:
        return False
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError):
        return False
    if not isinstance(document, dict):
        return False
    versions = document.get("versions")
    return str(document.get("format", "")).startswith("tadq") or (isinstance(versions, dict) and "tadq" in versions)


def is_tadq_file(path: str | Path) -> bool:
    """Whether the file at ``path`` is one tadq wrote (and may replace): a PNG carrying ``PNG_MARK``, a JSON
    document whose format says tadq or that records tadq's version (``utils.library_versions``: results, benchmark
    reports), or a safetensors file with tadq's metadata (``safefiles.save_checked``: samples, checkpoints,
    caches)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".json":
        return _written_by_tadq(path)
    if path.suffix.lower() == ".png":
        from PIL import Image

        try:
            with Image.open(path) as image:
                text = getattr(image, "text", {})
                return all(text.get(key) == value for key, value in PNG_MARK.items())
        except (OSError, ValueError, SyntaxError):
            return False
    from safetensors import safe_open

    from tadq.safefiles import META_KEY

    try:
        with safe_open(str(path), framework="pt") as handle:
            return META_KEY in (handle.metadata() or {})
    except Exception:  # safetensors raises its own error types for a file that is not one of its own
        return False


def mark_output(folder: str | Path, kind: str) -> None:
    """Write the marker (deterministic bytes: no time, no host) so a later ``--overwrite`` may replace ``folder``.

    A folder already marked as another kind keeps its marker and this raises: rewriting it would turn e.g. an
    artefact (whose manifest hashes the marker) into a damaged one (``check_output_dir(kind=)`` refuses such a
    folder before any work; this is the last guard)."""
    existing = output_kind(folder)
    if existing is not None and existing != kind:
        raise OutputRefused(f"{folder} is a tadq {existing} folder; not marking it as a {kind} folder")
    text = json.dumps({"format": "tadq-output", "version": 1, "kind": kind}, indent=2, sort_keys=True) + "\n"
    path = Path(folder) / MARKER_FILE
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        atomic_write_text(text, path)


def _nearest_existing(path: Path) -> Path:
    """The path itself or its nearest parent that is there (a symlink counts, dangling or not: its own check)."""
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _name_limit(path: Path) -> int:
    """The longest name, in bytes, the file system holding ``path`` takes (255 where it will not say, and on
    Windows, which has no ``os.pathconf``: every check of an output path raised ``AttributeError`` there)."""
    return _pathconf(path, "PC_NAME_MAX", 255)


def _path_limit(path: Path) -> int:
    """The length, in bytes, a whole path must stay below: 4096 on Linux, 1024 on macOS (its ``PATH_MAX``: a path
    between the two passed the check and failed after the work); 4096 where the system will not say."""
    return _pathconf(path, "PC_PATH_MAX", 4096)


def _pathconf(path: Path, name: str, default: int) -> int:
    """``os.pathconf`` of the file system holding ``path``; ``default`` where there is none (Windows), where it
    fails, or where it says -1 (no fixed limit)."""
    pathconf = getattr(os, "pathconf", None)
    if pathconf is None:
        return default
    try:
        value = pathconf(path.absolute().anchor or os.sep, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def check_path_shape(path: str | Path, what: str) -> None:
    """Refuse, before any work, a path no file can be written at, or one the user almost surely did not mean:
    a name longer than the file system takes (it used to surface as a traceback from ``stat``), a ``~`` the
    shell did not expand (a quoted ``"~/runs"`` became a folder literally named ``~`` in the working folder),
    and a symlink, on the way or at the path itself, that points nowhere (the write failed after the work, or
    replaced the user's link by a file)."""
    path = Path(path)
    limit = _name_limit(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise OutputRefused(f"{what} {shown!r}: that name is {size} bytes; the file system takes at most {limit} "
                                "bytes per name. Choose a shorter name")
    size, longest = len(os.fsencode(str(path.absolute()))), _path_limit(path)
    if size >= longest:
        raise OutputRefused(f"{what}: the path is {size} bytes long; the system takes paths shorter than {longest} "
                            "bytes. Choose a shorter path")
    first = path.parts[0] if path.parts else ""
    if first.startswith("~") and not os.path.lexists(first):
        try:
            meant = f"{Path(first).expanduser().joinpath(*path.parts[1:])} or another absolute path"
        except RuntimeError:  # no home folder known (or no such user)
            meant = "an absolute path"
        raise OutputRefused(f"{what} {path}: '{first}' was not expanded to a home folder (the shell leaves a quoted "
                            f"~ alone, and tadq does not guess); write {meant} (to mean a folder literally named "
                            f"{first}, create it first)")
    try:
        at = _nearest_existing(path.absolute())
    except OSError as error:  # a symlink loop on the way, a name the file system refuses
        raise OutputRefused(f"{what} {path}: {error.strerror}") from error
    if at.is_symlink() and not at.exists():
        at_path = "" if at == path.absolute() else f": {at} on the way"
        reason = "which does not exist"
        try:
            os.stat(at)
        except OSError as error:  # ELOOP: links that point at each other
            if error.errno != errno.ENOENT:
                reason = f"which cannot be followed ({error.strerror})"
        raise OutputRefused(f"{what} {path}{at_path} is a symlink to {os.readlink(at)}, {reason}; create its target "
                            "or choose another path (the link is left alone)")


def check_writable_dir(folder: str | Path, what: str, *, inputs: Sequence[str | Path] = (),
                       force_foreign: bool = False) -> None:
    """Raise unless ``folder`` (existing, or the nearest existing parent that will hold it) is a writable folder;
    with ``inputs`` (model folders the command reads), also when it is, holds or lies inside one (a cache would
    write into the model), unless ``force_foreign``."""
    folder = Path(folder)
    check_path_shape(folder, what)
    if inputs and not force_foreign and (relation := _overlap(folder, inputs)):
        raise OutputRefused(f"{what} {folder} {relation}; tadq would write into the model folder it reads. Choose "
                            f"another folder, or {FORCE_HINT}")
    if inputs and not force_foreign:  # a cache folder (callers that name no inputs check the folder themselves)
        _refuse_inside_artefact(folder, what, itself=True)
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise OutputRefused(f"{what} {folder}: {existing} is a file, not a folder; choose another path")
    try:  # a real probe: os.access says yes to root even on a read-only mount
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tadq-write-probe-")
    except OSError as error:
        raise OutputRefused(f"{what} {folder}: {existing} is not writable ({error.strerror}); choose a folder you "
                            "can write to") from error
    os.close(fd)
    os.unlink(probe)


def _enclosing_artefact(path: Path, *, itself: bool) -> Path | None:
    """The tadq artefact ``path`` lies inside (or is, with ``itself``), if any: a file added there makes its
    manifest incomplete, so ``tadq verify`` fails it and ``--overwrite`` refuses to replace it."""
    start = path.resolve()  # resolved: "art/../x" is not inside art, and a link may lead into one
    for folder in ([start] if itself else []) + list(start.parents):
        if (folder / "tadq_manifest.json").is_file() and output_kind(folder) == "artefact":
            return folder
    return None


def _refuse_inside_artefact(path: Path, what: str, *, itself: bool) -> None:
    if (artefact := _enclosing_artefact(path, itself=itself)) is not None:
        where = "is" if artefact == path.resolve() else "lies inside"
        raise OutputRefused(f"{what} {path} {where} the tadq artefact {artefact}; a file written there would make "
                            f"`tadq verify` fail it (its manifest does not list it). Choose another path, or "
                            f"{FORCE_HINT}")


def _overlap(out: Path, inputs: Sequence[str | Path]) -> str | None:
    target = out.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if target == source:
            return f"is the input {given} itself"
        if source in target.parents:
            return f"lies inside the input {given}"
        if target in source.parents:
            return f"contains the input {given}"
    return None


def check_output_dir(out: str | Path, *, kind: str, what: str = "--out", overwrite: bool = False,
                     resume: bool = False, force_foreign: bool = False, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output folder tadq must not write; raises ``OutputRefused`` (a ``ValueError``).

    Args:
        out: the folder tadq will create (or replace, or fill).
        kind: the kind of output the caller writes (its ``mark_output`` kind); a folder marked as another kind is
            refused even with ``force_foreign``: filling a run report with an artefact's files, or replacing a
            run folder (and the user's notes in it) by an artefact, is never what was meant.
        what: the flag or argument naming it, for messages.
        overwrite: the caller will replace an existing folder (artefacts).
        resume: the caller adds to an existing folder (run folders, reports).
        force_foreign: the user asked explicitly to write into a folder tadq did not mark (or an input's).
        inputs: folders the command reads (model folders); ``out`` may not be, hold or lie inside one.
    """
    out = Path(out)
    check_path_shape(out, what)
    if not force_foreign and (relation := _overlap(out, inputs)):
        raise OutputRefused(f"{what} {out} {relation}; writing there could destroy what it reads. Choose another "
                            f"folder, or {FORCE_HINT}")
    if not force_foreign:
        _refuse_inside_artefact(out, what, itself=False)
    if out.exists() and not out.is_dir():
        raise OutputRefused(f"{what} {out} is a file, not a folder; tadq writes a folder there: choose a folder path "
                            "(the file is left alone)")
    if out.is_symlink() and (overwrite or kind == "artefact"):
        # an artefact is renamed into place whole: it took the link's place, and the target kept its old files
        raise OutputRefused(f"{what} {out} is a symlink to {os.readlink(out)}; replacing a folder whole would replace "
                            f"the link, not its target. Give the target itself ({out.resolve()})")
    existing = output_kind(out) if out.is_dir() else None
    if existing is not None and existing != kind:
        raise OutputRefused(f"{what} {out} is a tadq '{existing}' folder, not a '{kind}' one; writing there would "
                            f"{'replace' if overwrite else 'mix files into'} it. Choose another folder")
    # a temp file a killed tadq left (its first write into a new folder) is not a file of someone else's
    if out.is_dir() and any(not stale_temp_file(entry) for entry in out.iterdir()):
        if not force_foreign and not is_tadq_output(out):  # first: --overwrite alone would not be enough
            also = "" if (overwrite or resume) else " (with --overwrite, overwrite=True)"
            raise OutputRefused(f"{what} {out} holds files tadq did not write (no {MARKER_FILE}); it is left alone. "
                                f"Choose another folder, or {FORCE_HINT}{also}")
        if not (overwrite or resume):
            raise OutputRefused(f"{what} {out} already exists and is not empty; choose a new folder or pass "
                                "--overwrite (overwrite=True from Python)")
        if overwrite and not force_foreign and (added := _added_to_artefact(out)):
            raise OutputRefused(f"{what} {out} is a tadq artefact, but {len(added)} file(s) in it were put there "
                                f"after tadq saved it ({', '.join(added[:3])}); --overwrite would delete them. Move "
                                f"them out, or {FORCE_HINT}")
    check_writable_dir(out, what)
    if out.is_dir() and overwrite:
        check_writable_dir(out.absolute().parent, f"{what} {out}: its parent")  # replacing renames inside it


# what diffusers and transformers write into a pipeline's component folders (weights, configs, tokenizer files): in
# an artefact without a readable manifest, any other file in a component folder is taken to be a user's
_COMPONENT_FILE_NAMES = frozenset({
    "config.json", "scheduler_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "tokenizer.model",
    "sentencepiece.bpe.model", "generation_config.json", "preprocessor_config.json", "chat_template.jinja"})
_COMPONENT_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model", "pytorch_model")
_COMPONENT_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")


def _component_file(name: str) -> bool:
    return name in _COMPONENT_FILE_NAMES or (name.startswith(_COMPONENT_WEIGHT_PREFIXES)
                                             and name.endswith(_COMPONENT_WEIGHT_SUFFIXES))


def _added_to_artefact(folder: Path) -> list[str]:
    """Files in an artefact folder that its manifest does not list: someone else's, which replacing the folder would
    delete. Without a readable manifest (damaged, deleted, or an artefact older than manifests: the usual reasons to
    overwrite) it falls back to the names tadq writes: its own top-level files, and in the component folders
    ``model_index.json`` names the files diffusers and transformers write there (a user's ``my-eval/results.csv``
    beside them, or ``vae/notes.txt`` inside one, was deleted with the rest)."""
    from tadq.corrections.io import CORRECTIONS_FILE
    from tadq.io.manifest import ArtefactDamaged, unlisted_files
    from tadq.io.manifest import read_manifest as read

    try:
        if read(folder) is not None:
            return unlisted_files(folder)
    except ArtefactDamaged:
        pass
    index = folder / "model_index.json"
    try:
        components = {name for name in json.loads(index.read_text(encoding="utf-8")) if not name.startswith("_")}
    except (ValueError, OSError, UnicodeDecodeError, AttributeError, TypeError):
        components = set()
    ours = {"model_index.json", CORRECTIONS_FILE, MARKER_FILE}

    def tadq_wrote(relative: Path) -> bool:
        if len(relative.parts) == 1:
            return relative.name.startswith("tadq_") or relative.name in ours
        return relative.parts[0] in components and _component_file(relative.name)

    return sorted(relative.as_posix() for relative in (path.relative_to(folder) for path in folder.rglob("*")
                                                 if path.is_file() or path.is_symlink()) if not tadq_wrote(relative))


def check_output_file(path: str | Path, *, what: str, suffixes: Sequence[str] = (),
                      inputs: Sequence[str | Path] = (), force_foreign: bool = False) -> None:
    """Refuse a file path that names a folder, has the wrong suffix, lies inside an input, cannot be written, or
    holds a file tadq did not write (``is_tadq_file``; ``force_foreign`` replaces it anyway)."""
    path = Path(path)
    check_path_shape(path, what)
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputRefused(f"{what} {path} must end in {' or '.join(suffixes)} (e.g. {path.with_suffix(suffixes[0])}"
                            f" or {path / ('samples' + suffixes[0])})")
    if path.is_dir():
        example = path / ("samples" + (suffixes[0] if suffixes else ""))
        raise OutputRefused(f"{what} {path} is a folder; name a file, e.g. {example}")
    if path.is_symlink():  # files are written whole to a temp file and renamed: the link, not its target, is replaced
        raise OutputRefused(f"{what} {path} is a symlink to {os.readlink(path)}; tadq would replace the link, not its "
                            f"target. Give the target itself ({path.resolve()}) or another path")
    if not force_foreign and (relation := _overlap(path, inputs)):
        raise OutputRefused(f"{what} {path} {relation}; choose another path, or {FORCE_HINT}")
    if not force_foreign:
        _refuse_inside_artefact(path, what, itself=False)
    if path.exists() and not force_foreign and not is_tadq_file(path):
        raise OutputRefused(f"{what} {path} exists and tadq did not write it; choose another path, or {FORCE_HINT}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputRefused(f"{what} {path} is not writable; choose another path")
    check_writable_dir(path.absolute().parent, what)


def lock_path(out: str | Path) -> Path:
    """The lock file of output ``out`` (a folder or a file): ``.NAME.tadq-lock`` beside it, not inside, since an
    artefact folder is replaced whole; symlinks resolved, so two names of one folder share one lock."""
    target = Path(os.path.realpath(out))
    name = f".{target.name}{LOCK_SUFFIX}"
    if len(name.encode()) > _name_limit(target):  # an output name near the limit: a shortened, still unique one
        digest = hashlib.sha256(target.name.encode()).hexdigest()[:16]
        name = f".{target.name[:32]}-{digest}{LOCK_SUFFIX}"
    return target.parent / name


def _lock_holder(lock: Path) -> dict | None:
    """The holder a lock file records (pid, host, token, since); ``None`` when it cannot be read (being written)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _lock_is_stale(lock: Path, holder: dict | None) -> bool:
    """Whether the lock's holder has provably ended: a process of this host that no longer runs (one of another
    host cannot be seen from here), or an unreadable lock file older than its maker needs to write it."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _UNREADABLE_LOCK_STALE_S
        except OSError:
            return True  # gone meanwhile
    return holder.get("host") == _host_tag() and not _process_alive(holder["pid"])


def _held_message(out: Path, what: str, lock: Path, holder: dict | None) -> str:
    if holder is None:
        who = "another tadq process (its lock file is being written)"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
        where = "" if holder.get("host") == _host_tag() else f" on another host ({holder.get('host')})"
        who = f"another tadq process (pid {holder['pid']}{where}, since {since})"
    return (f"{what} {out} is being written by {who}; two commands writing one folder would interleave their files. "
            f"Wait for it to end, or choose another path. If no such process runs, delete {lock}")


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "--out") -> Iterator[Path]:
    """Hold ``out`` for this process while a command writes it: a lock file beside it (``lock_path``) made with
    ``O_EXCL``, recording this process's pid and host; removed on exit. ``OutputRefused`` naming the folder and the
    holder's pid while a live process holds it. A lock whose holder has ended (killed: SIGKILL, a crash) is taken
    over: it is moved aside under a name of this process's own first, and put back if it turns out to be another
    process's new lock, so two processes taking over one stale lock cannot both go on. Folders above ``out`` that
    do not exist yet are made (the command makes them anyway) and removed again if they are still empty."""
    out = Path(out)
    lock = lock_path(out)
    made = [parent for parent in (lock.parent, *lock.parent.parents) if not parent.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    holder = {"pid": os.getpid(), "host": _host_tag(), "token": token, "since": time.time()}
    try:
        for _ in range(8):  # each pass either takes the lock, refuses, or clears one stale lock
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = _lock_holder(lock)
                if not _lock_is_stale(lock, found):
                    raise OutputRefused(_held_message(out, what, lock, found)) from None
                aside = lock.with_name(f"{lock.name}.{os.getpid()}-{token}.stale")
                try:
                    os.rename(lock, aside)
                except FileNotFoundError:  # another process moved it first
                    continue
                if _lock_holder(aside) != found:  # a new lock made meanwhile, not the stale one: put it back
                    with contextlib.suppress(FileExistsError, FileNotFoundError):
                        os.link(aside, lock)
                aside.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                json.dump(holder, handle)
            break
        else:
            raise OutputRefused(f"{what} {out}: its lock {lock} keeps changing hands; another tadq process is "
                                "starting to write there. Wait for it to end, or choose another path")
    except BaseException:
        _remove_made(made)
        raise
    try:
        yield lock
    finally:
        if (_lock_holder(lock) or {}).get("token") == token:
            lock.unlink(missing_ok=True)
        _remove_made(made)


def _remove_made(folders: Sequence[Path]) -> None:
    """Remove the folders ``output_lock`` made (deepest first) that are still empty."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
