"""An artefact saved on Windows: the same bytes as on Linux, and saved into an empty folder the user made, with
Linux given Windows' text-file defaults and its ``os.rename`` (which refuses any existing target)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from tests.io.tiny_artefacts import save_tiny_artefact
from tests.test_portability import windows_text_defaults

import tadq
from tadq.io import save_quantized
from tadq.io.manifest import verify_manifest


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("portable") / "artefact", "W8A8")


def _files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_artefact_has_the_same_bytes_whatever_the_os_writes_text_files_with(artefact, tmp_path, monkeypatch):
    """Its JSON files were written in text mode with the OS's defaults: ``\\r\\n`` on Windows, so the same model
    gave other bytes (and manifest hashes) there than on Linux or macOS."""
    qmodel, scheduler = tadq.load(artefact)
    save_quantized(qmodel, tmp_path / "here", scheduler)
    windows_text_defaults(monkeypatch)
    save_quantized(qmodel, tmp_path / "windows", scheduler)
    here, windows = _files(tmp_path / "here"), _files(tmp_path / "windows")
    assert sorted(windows) == sorted(here)
    assert [name for name in here if windows[name] != here[name]] == []


def test_a_scheduler_config_has_the_same_bytes_whatever_the_os_writes_text_files_with(artefact, tmp_path,
                                                                                      monkeypatch):
    """diffusers writes ``scheduler_config.json`` in text mode (``\\r\\n`` on Windows); tadq rewrote it only when
    the scheduler had defaulted keys, so one built with every setting given kept the OS's line ends."""
    qmodel, scheduler = tadq.load(artefact)
    explicit = type(scheduler)(**{key: value for key, value in scheduler.config.items() if not key.startswith("_")})
    save_quantized(qmodel, tmp_path / "here", explicit)
    windows_text_defaults(monkeypatch)
    save_quantized(qmodel, tmp_path / "windows", explicit)
    name = "scheduler/scheduler_config.json"
    assert (tmp_path / "windows" / name).read_bytes() == (tmp_path / "here" / name).read_bytes()
    assert _files(tmp_path / "windows") == _files(tmp_path / "here")


def test_a_save_into_an_empty_folder_works_where_rename_refuses_any_existing_target(artefact, tmp_path,
                                                                                   monkeypatch):
    """POSIX ``rename`` replaces an empty folder, Windows' refuses it: a save into the empty folder the user made
    (accepted by the output checks) was discarded there after all the work, as "filled by another process"."""
    qmodel, scheduler = tadq.load(artefact)
    real_rename = os.rename

    def windows_rename(source, target):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "Cannot create a file when that file already exists", str(target))
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", windows_rename)
    empty = tmp_path / "q"
    empty.mkdir()
    save_quantized(qmodel, empty, scheduler)
    assert verify_manifest(empty, allow_extra=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q"]  # no staging folder left beside it
