"""An artefact saved on Windows has the same bytes as on Linux (Linux given Windows' text-file defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.io.tiny_artefacts import save_tiny_artefact
from tests.test_portability import windows_text_defaults

import tadq
from tadq.io import save_quantized


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
