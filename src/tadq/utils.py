"""Small helpers shared across tadq: atomic writes, versions, seeding."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: tadq.fsguard, which the command line checks paths with, needs no torch
    import torch

__all__ = ["PNG_MARK", "atomic_torch_save", "atomic_write_text", "atomic_write_json", "eval_mode", "library_versions",
           "make_staging_dir", "public_config", "remove_stale_temp_files", "save_figure", "stale_temp_file",
           "write_error", "write_utf8", "unique_keys"]

# the PNG text chunk tadq writes into every figure it saves, by which an existing PNG is known as its own
PNG_MARK = {"tadq": "tadq-output"}


# a temp file tadq writes beside its final file: ".NAME.PID-HOST-RANDOM.tmp", the writer's process id and host tag in
# its name, so a later run deletes only the ones whose writer provably died (on this host) and never another live
# process's (a second run into the same folder, another node of a torchrun job on a shared file system)
_TEMP_NAME = re.compile(r"^\..*\.(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+\.tmp$")
_OLDER_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # tadq before the pid and host were in the name
# a temp file left untouched this long has no writer: every write tadq makes takes minutes at most (and the file
# changes all along), so one of another host, or of a tadq that did not name its writer, is stale after it
STALE_AFTER_S = 24 * 3600


def _host_tag() -> str:
    """8 hex digits naming this machine (a hash of its host name) in temp file names: process ids are per host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user's counts as alive)."""
    if pid <= 0:
        return True  # not a process id tadq writes: never taken for a dead writer
    if sys.platform == "win32":  # os.kill(pid, 0) there is TerminateProcess: it ended the process it asked about
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _windows_process_alive(pid: int) -> bool:
    """``_process_alive`` on Windows, asked of the process table without touching the process: one that cannot be
    opened for another reason than "no such process", or any failure of the query, counts as alive."""
    try:
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return True
    query_limited_information, still_active, invalid_parameter = 0x1000, 259, 87
    kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized: not ctypes' default int
    kernel32.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
    kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return ctypes.get_last_error() != invalid_parameter  # ERROR_INVALID_PARAMETER: no process has this id
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def stale_temp_file(path: str | Path) -> bool:
    """Whether ``path`` is a temp file of tadq's atomic writes whose writer is gone: one of an ended process of this
    host (killed in the middle of a write: SIGKILL, a crash, a lost node), or one untouched for ``STALE_AFTER_S``
    (another host's, whose processes cannot be seen from here, or an older tadq's). A temp file of a live process,
    of this process, or of any other name is not stale: it may still be renamed into place."""
    path = Path(path)
    match = _TEMP_NAME.match(path.name)
    if match is None and _OLDER_TEMP_NAME.match(path.name) is None:
        return False
    if match is not None and match.group(2) == _host_tag():
        pid = int(match.group(1))
        return pid != os.getpid() and not _process_alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > STALE_AFTER_S
    except OSError:  # gone meanwhile: its writer renamed it
        return False


def remove_stale_temp_files(folder: str | Path) -> int:
    """Delete the temp files killed writers left in ``folder`` (``stale_temp_file``); returns how many. The temp
    files of live processes, and recent ones of other hosts (whose processes cannot be seen from here), are left
    alone."""
    folder = Path(folder)
    removed = 0
    for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        if stale_temp_file(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def _fitting(name: str, before: str, after: str, reserve: int) -> str:
    """``before + name + after``, with ``name`` shortened where that and ``reserve`` more bytes (what ``tempfile``
    appends) would pass the 255 bytes a file name may take: a final name near the limit was accepted by the output
    checks, then its temp name failed with "File name too long" after the work."""
    while name and len(os.fsencode(f"{before}{name}{after}")) + reserve > 255:
        name = name[:-1]
    return f"{before}{name}{after}"


def _staging_prefix(target: Path) -> str:
    return _fitting(target.name, ".", f".tmp-{os.getpid()}-{_host_tag()}-", len("12345678"))


def make_staging_dir(target: str | Path) -> Path:
    """A new hidden folder beside ``target``, ``.NAME.tmp-PID-HOST-RANDOM``, in which a whole output (an artefact, a
    samples folder) is written before it is renamed into place. Staging folders of ``target`` that a killed save left
    (SIGKILL, the OOM killer: an artefact's size each, kept for good) are removed first when their writer provably
    ended on this host; a live save's, or another host's, is left alone."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = _staging_prefix(target)
    own = re.compile(re.escape(prefix[:prefix.rindex(".tmp-")]) + r"\.tmp-(\d+)-([0-9a-f]{8})-[A-Za-z0-9_]+$")
    for entry in sorted(target.parent.iterdir()):
        match = own.match(entry.name)
        if match is None or match.group(2) != _host_tag() or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=prefix))


def _temp_prefix(path: Path) -> str:
    """``.NAME.PID-HOST-`` (``_TEMP_NAME``), NAME shortened where needed (``_fitting``)."""
    return _fitting(path.name, ".", f".{os.getpid()}-{_host_tag()}-", len("12345678.tmp"))


_OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports a failed write


def write_error(error: BaseException, path: str | Path, *, written: str | Path | None = None) -> OSError | None:
    """The ``OSError`` naming ``path`` that a failed write of it was, or ``None`` for an error of another kind.

    safetensors raises its own ``SafetensorError`` for a full disk ("... (os error 28)"), which the CLI took for a
    bug (a traceback) and callers that go on without a cache on an ``OSError`` did not catch; Python's own writes
    raise ``OSError(ENOSPC)`` naming no file. ``written``: the temp file the error may name instead of ``path``."""
    if isinstance(error, OSError):
        if error.errno is None or error.filename not in (None, str(written) if written is not None else None):
            return None
        return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))  # subclass by errno
    match = _OS_ERROR_IN_MESSAGE.search(str(error))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
        except Exception as error:
            if (converted := write_error(error, path, written=tmp)) is not None:
                raise converted from error
            raise
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written file behind (write to a temp file, then rename)."""
    import torch

    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def write_utf8(text: str, path: str | Path) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line ends: the same bytes on every OS and locale. ``Path.write_text``
    encodes with the locale's encoding (cp1252 on Windows, ASCII under ``LC_ALL=C``: a report's "↓" raised
    ``UnicodeEncodeError`` after the whole run) and writes ``\\r\\n`` on Windows (an artefact's bytes, and so its
    hashes, depended on the OS that saved it)."""
    Path(path).write_text(text, encoding="utf-8", newline="\n")


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text atomically, as UTF-8 with ``\\n`` line ends (``write_utf8``)."""
    _atomic(Path(path), lambda tmp: write_utf8(text, tmp))


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
    import torch

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


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """``module`` and every submodule in eval mode inside the block, each given back its own mode after it (dropout
    in a model built or left in training mode would make sampling and calibration random)."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of ``json.loads`` refusing an object that names one key twice: plain ``json.loads``
    keeps the last silently, so a hand-edited recipe's second ``"bits"`` replaced the first without a word."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object (values {result[key]!r:.60} and "
                             f"{value!r:.60}); keep one")
        result[key] = value
    return result
