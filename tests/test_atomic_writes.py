"""Atomic writes (``tadq.utils``): a write that fails or is killed never leaves a half file under the final name, its
temp file is its own process's, and a disk error is an ``OSError`` naming the file (one line from the CLI)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.full_disk import full_disk_save_file, full_disk_write_text

import tadq.safefiles as safefiles
from tadq.safefiles import load_checked, save_checked
from tadq.utils import (
    STALE_AFTER_S,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp_files,
    stale_temp_file,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.endswith(".tmp"))


def test_safetensors_disk_full_is_an_oserror_naming_the_file(tmp_path: Path, monkeypatch) -> None:
    """safetensors raised its own SafetensorError for a full disk: a traceback from the CLI, and callers that go on
    without a cache on an OSError (the calibration cache) crashed after the whole run instead."""
    path = tmp_path / "chunk.safetensors"
    save_checked({"x": torch.arange(4.0)}, {"n": 1}, path)
    monkeypatch.setattr(safefiles, "save_file", full_disk_save_file)
    with pytest.raises(OSError) as caught:
        save_checked({"x": torch.zeros(4)}, {"n": 2}, path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    tensors, meta = load_checked(path, "chunk")  # the earlier file, whole
    assert meta == {"n": 1} and torch.equal(tensors["x"], torch.arange(4.0))
    assert _leftovers(tmp_path) == []


def test_python_write_disk_full_names_the_final_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    atomic_write_json({"old": True}, path)

    monkeypatch.setattr(Path, "write_text", full_disk_write_text)
    with pytest.raises(OSError) as caught:
        atomic_write_json({"new": True}, path)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert json.loads(path.read_text()) == {"old": True} and _leftovers(tmp_path) == []


def test_final_name_near_the_length_limit_is_written(tmp_path: Path) -> None:
    """The temp name adds a prefix and suffix to the final name: one the file system takes (and the output checks
    let through) failed with 'File name too long' at the end of the work."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("n" * (limit - len(".json")) + ".json")
    atomic_write_text("{}", path)
    assert path.read_text() == "{}" and _leftovers(tmp_path) == []


def _temp_file_of(pid: int, folder: Path, final: str = "chunk.safetensors") -> Path:
    """A temp file as ``_atomic`` names it in process ``pid``: made in this process, then renamed to that pid."""
    seen = {}

    def keep(tmp: str) -> None:
        seen["tmp"] = tmp
        Path(tmp).write_text("half")
        raise KeyboardInterrupt  # stand-in for a kill: nothing after it runs in that process

    from tadq.utils import _atomic

    with pytest.raises(KeyboardInterrupt):
        _atomic(folder / final, keep)
    name = Path(seen["tmp"]).name
    assert f".{os.getpid()}-" in name  # the writer's process id is in its temp file's name
    stale = folder / name.replace(f".{os.getpid()}-", f".{pid}-")
    stale.write_text("half")
    return stale


def test_only_temp_files_of_ended_processes_are_stale(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_file, live_file = _temp_file_of(ended.pid, tmp_path), _temp_file_of(live.pid, tmp_path)
        own = _temp_file_of(os.getpid(), tmp_path, "other.json")
        foreign = tmp_path / ".notes.tmp"  # not a name tadq writes: never tadq's to delete
        foreign.write_text("user's")
        other_host = tmp_path / f".chunk.safetensors.{live.pid}-{'0' * 8}-k3x9q2zw.tmp"
        older_tadq = tmp_path / ".chunk.safetensors.k3x9q2zw.tmp"  # mkstemp's name, without pid and host
        for path in (other_host, older_tadq):
            path.write_text("half")
        assert stale_temp_file(dead_file) and not stale_temp_file(live_file) and not stale_temp_file(own)
        assert not stale_temp_file(other_host) and not stale_temp_file(older_tadq)  # may be written right now
        assert remove_stale_temp_files(tmp_path) == 1
        assert _leftovers(tmp_path) == sorted(path.name for path in (live_file, own, foreign, other_host, older_tadq))
        untouched = time.time() - STALE_AFTER_S - 60  # no write takes that long: their writers are gone
        for path in (other_host, older_tadq, foreign, live_file):
            os.utime(path, (untouched, untouched))
        assert remove_stale_temp_files(tmp_path) == 2
        assert _leftovers(tmp_path) == sorted(path.name for path in (live_file, own, foreign))
    finally:
        live.kill()
        live.wait()


def _write_recipe(path: Path, variant: int) -> None:
    from tadq.recipe import Recipe, save_recipe

    save_recipe(Recipe(exclude=(f"layer.{variant}",)), path)


def _write_unit_report(path: Path, variant: int) -> None:
    from tadq.calibration.reconstruction import UnitReport, write_unit_report

    write_unit_report([UnitReport(unit=f"down.{variant}", phase="weights", loss_before=1.0, loss_after=0.5)], path)


@pytest.mark.parametrize("write", [_write_recipe, _write_unit_report], ids=["recipe", "unit-report"])
def test_json_writers_never_leave_a_half_file_under_the_final_name(tmp_path: Path, monkeypatch, write) -> None:
    """``save_recipe`` (the search's exported ``recipe.json``, through a fixed ``.recipe.json.tmp`` there) and the
    reconstruction report wrote the final file in place: a full disk left half a JSON document instead of the
    earlier one."""
    path = tmp_path / "out.json"
    write(path, 1)
    before = path.read_text()

    monkeypatch.setattr(Path, "write_text", full_disk_write_text)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        write(path, 2)
    monkeypatch.undo()
    assert path.read_text() == before and _leftovers(tmp_path) == []
