"""What tadq does on the machines users have besides Linux, checked here by giving Linux their behaviour: Windows'
``os.kill`` (which terminates), its missing ``os.pathconf``, its text-file defaults (the locale's code page and
``\\r\\n``), and its path separator."""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import os
import sys
from pathlib import Path, PureWindowsPath
from types import SimpleNamespace

import pytest

import tadq.utils as utils
from tadq.fsguard import OutputRefused, check_output_dir, check_output_file, lock_path, output_lock
from tadq.io.manifest import relative_name
from tadq.pipelines.components import _check_tokenizers_file
from tadq.utils import atomic_write_json, atomic_write_text, stale_temp_file


def windows_text_defaults(monkeypatch) -> None:
    """Text files opened as on Windows when no encoding or newline is named: the locale's code page (cp1252) and
    ``\\r\\n`` line ends written, for ``open`` (what diffusers and transformers call) and ``Path``'s methods."""
    real_open, write, read = builtins.open, Path.write_text, Path.read_text

    def windows_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, *args, **kwargs):
        if "b" not in mode:
            encoding = "cp1252" if encoding in (None, "locale") else encoding
            newline = "\r\n" if newline is None and any(flag in mode for flag in "wax+") else newline
        return real_open(file, mode, buffering, encoding, errors, newline, *args, **kwargs)

    def write_text(self, data, encoding=None, errors=None, newline=None):
        return write(self, data, encoding=encoding or "cp1252", errors=errors,
                     newline="\r\n" if newline is None else newline)

    def read_text(self, encoding=None, errors=None):
        return read(self, encoding=encoding or "cp1252", errors=errors)

    monkeypatch.setattr(builtins, "open", windows_open)
    monkeypatch.setattr(io, "open", windows_open)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(Path, "read_text", read_text)


def _fake_kernel32(running: dict[int, int]) -> SimpleNamespace:
    """The three calls ``_windows_process_alive`` makes, answering for one process table (pid → exit code; 259:
    still active)."""
    kernel32 = SimpleNamespace(error=0)

    def open_process(access, inherit, pid):
        if pid not in running:
            kernel32.error = 87  # ERROR_INVALID_PARAMETER
            return None
        return pid

    def get_exit_code_process(handle, code):
        code._obj.value = running[handle]
        return 1

    kernel32.OpenProcess, kernel32.GetExitCodeProcess = open_process, get_exit_code_process
    kernel32.CloseHandle = lambda handle: 1
    return kernel32


def test_process_liveness_on_windows_never_sends_a_signal(tmp_path, monkeypatch):
    """``os.kill(pid, 0)`` is TerminateProcess on Windows: checking whether a stale lock's or temp file's writer
    still ran ended that process (or an unrelated one that got its id)."""
    def kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) would terminate the process on Windows")

    kernel32 = _fake_kernel32({4242: 259, 4343: 0})
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error=False: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: kernel32.error, raising=False)
    assert utils._process_alive(4242)
    assert not utils._process_alive(4343)  # ended, its handle still open somewhere
    assert not utils._process_alive(4444)  # no such process
    dead = tmp_path / f".out.json.4444-{utils._host_tag()}-abcdefgh.tmp"
    dead.write_bytes(b"")
    assert stale_temp_file(dead)

    def no_kernel32(name, use_last_error=False):
        raise OSError(f"{name} not found")

    monkeypatch.setattr(ctypes, "WinDLL", no_kernel32, raising=False)
    assert utils._process_alive(4444)  # the query failed: never taken for a dead writer


def test_output_checks_run_where_os_has_no_pathconf(tmp_path, monkeypatch):
    """Windows has no ``os.pathconf``: every output check and every lock raised ``AttributeError`` there."""
    monkeypatch.delattr(os, "pathconf", raising=False)
    check_output_dir(tmp_path / "run", kind="run")
    check_output_file(tmp_path / "samples.png", what="--out", suffixes=(".png",))
    with output_lock(tmp_path / "run") as lock:
        assert lock == lock_path(tmp_path / "run") and lock.is_file()


def test_text_files_are_utf8_with_lf_whatever_the_os_writes_by_default(tmp_path, monkeypatch):
    """Reports hold "↓" and "×": under cp1252 (Windows) or ASCII (``LC_ALL=C``) their write raised
    ``UnicodeEncodeError`` after the whole run, and JSON came out with ``\\r\\n`` on Windows."""
    windows_text_defaults(monkeypatch)
    text = "| FD-digits ↓ | 8×8 |\n|---|---|\n"
    atomic_write_text(text, tmp_path / "results.md")
    assert (tmp_path / "results.md").read_bytes() == text.encode("utf-8")
    atomic_write_json({"size": "8×8", "n": [1, 2]}, tmp_path / "results.json")
    written = (tmp_path / "results.json").read_bytes()
    assert b"\r\n" not in written and json.loads(written.decode("utf-8")) == {"size": "8×8", "n": [1, 2]}


def test_a_tokenizer_file_holding_non_ascii_tokens_is_read_as_utf8(tmp_path, monkeypatch):
    """tokenizers writes its files as UTF-8 ("▁" in every SentencePiece vocabulary): read with the locale's code
    page, a whole T5 tokenizer was refused as "damaged: not JSON" on Windows."""
    windows_text_defaults(monkeypatch)
    file = tmp_path / "tokenizer.json"
    file.write_bytes(json.dumps({"model": {"vocab": {"▁the": 0, "▁": 1}}, "added_tokens": []},
                                ensure_ascii=False).encode("utf-8"))
    _check_tokenizers_file(file)


def test_manifest_names_use_slashes_on_every_os():
    """``str()`` of a relative path is ``unet\\config.json`` on Windows, which ``read_manifest`` refuses as a path
    outside the artefact: an artefact saved on Windows could not be loaded anywhere."""
    folder = PureWindowsPath(r"C:\runs\artefact")
    assert relative_name(folder / "unet" / "config.json", folder) == "unet/config.json"
    assert relative_name(folder / "tadq_config.json", folder) == "tadq_config.json"


def test_a_path_past_the_systems_path_limit_is_refused_before_work(tmp_path, monkeypatch):
    """macOS takes paths below 1024 bytes (its PATH_MAX), not Linux's 4096: a longer path passed the check and
    the write failed after the work; a file system that reports no fixed limit (-1) refused every path."""
    real = os.pathconf
    limits = {"PC_PATH_MAX": 1024}
    monkeypatch.setattr(os, "pathconf", lambda path, name: limits.get(name) or real(path, name))
    deep = tmp_path.joinpath(*["d" * 100] * 12, "run")
    assert 1024 <= len(os.fsencode(str(deep))) < 4096
    with pytest.raises(OutputRefused, match=r"bytes long; the system takes paths shorter than 1024 bytes"):
        check_output_dir(deep, kind="run")
    check_output_dir(tmp_path / "run", kind="run")
    limits.update(PC_PATH_MAX=-1, PC_NAME_MAX=-1)
    check_output_dir(tmp_path / "run", kind="run")
    with pytest.raises(OutputRefused, match="255 bytes per name"):
        check_output_dir(tmp_path / ("n" * 256), kind="run")
