"""What tadq does on the machines users have besides Linux, checked here by giving Linux their behaviour: Windows'
``os.kill`` (which terminates), its missing ``os.pathconf``, its text-file defaults (the locale's code page and
``\\r\\n``), and its path separator."""

from __future__ import annotations

import ctypes
import os
import sys
from types import SimpleNamespace

import tadq.utils as utils
from tadq.fsguard import check_output_dir, check_output_file, lock_path, output_lock
from tadq.utils import stale_temp_file


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
