"""What happens at the artefact folder while a save writes its staging folder (a pipeline's copy takes minutes):
another run or a user may put files there. ``save_quantized`` checked the folder only before writing, then moved
whatever was there aside and deleted it, ``overwrite`` or not, the user's files included."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tests.io.tiny_artefacts import save_tiny_artefact

import tadq
import tadq.io.save as save_module
from tadq.fsguard import OutputRefused
from tadq.io import save_quantized
from tadq.io.manifest import verify_manifest


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("races") / "artefact", "W8A8")


def _meanwhile(monkeypatch, action) -> None:
    """Run ``action`` once the save has passed its checks and is writing its staging folder."""
    real = save_module._write_tadq_files

    def writing(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(save_module, "_write_tadq_files", writing)


def _hidden(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


def test_a_folder_created_during_a_save_without_overwrite_is_left_alone(artefact, tmp_path, monkeypatch):
    qmodel, scheduler = tadq.load(artefact)
    target = tmp_path / "q"

    def user_creates_it() -> None:
        target.mkdir()
        (target / "notes.txt").write_text("mine")

    _meanwhile(monkeypatch, user_creates_it)
    with pytest.raises(OutputRefused, match="while this model was being saved"):
        save_quantized(qmodel, target, scheduler)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in target.iterdir()) == ["notes.txt"]
    assert _hidden(tmp_path) == []


def test_another_runs_artefact_saved_meanwhile_is_not_replaced_without_overwrite(artefact, tmp_path, monkeypatch):
    qmodel, scheduler = tadq.load(artefact)
    target = tmp_path / "q"
    _meanwhile(monkeypatch, lambda: shutil.copytree(artefact, target))  # a second run that finished first
    with pytest.raises(OutputRefused, match="overwrite"):
        save_quantized(qmodel, target, scheduler)
    assert verify_manifest(target, allow_extra=False)
    assert _hidden(tmp_path) == []


def test_files_added_to_an_artefact_during_an_overwrite_are_kept(artefact, tmp_path, monkeypatch):
    qmodel, scheduler = tadq.load(artefact)
    target = tmp_path / "q"
    shutil.copytree(artefact, target)
    _meanwhile(monkeypatch, lambda: (target / "my-eval.csv").write_text("psnr\n31.2\n"))
    with pytest.raises(OutputRefused, match="my-eval.csv"):
        save_quantized(qmodel, target, scheduler, overwrite=True)
    assert (target / "my-eval.csv").read_text() == "psnr\n31.2\n"
    assert _hidden(tmp_path) == []


def test_an_empty_folder_is_still_filled_and_overwrite_still_replaces(artefact, tmp_path):
    qmodel, scheduler = tadq.load(artefact)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(qmodel, empty, scheduler)
    assert verify_manifest(empty, allow_extra=False)
    save_quantized(qmodel, empty, scheduler, overwrite=True)
    assert verify_manifest(empty, allow_extra=False)
    assert _hidden(tmp_path) == []


def test_a_full_disk_while_saving_is_an_oserror_naming_the_folder(artefact, tmp_path, monkeypatch):
    """safetensors' own error type for a full disk reached the CLI as a traceback; now an ``OSError`` naming the
    artefact folder (one line from the CLI), and the earlier artefact there is left whole, no staging folder beside."""
    import errno

    from tests.full_disk import full_disk_save_file

    qmodel, scheduler = tadq.load(artefact)
    target = tmp_path / "q"
    save_quantized(qmodel, target, scheduler)
    monkeypatch.setattr(save_module, "save_file", full_disk_save_file)
    with pytest.raises(OSError) as caught:
        save_quantized(qmodel, target, scheduler, overwrite=True)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert verify_manifest(target) is True and _hidden(tmp_path) == []


def test_staging_folders_of_killed_saves_are_removed_and_a_live_saves_kept(artefact, tmp_path):
    """A save killed by SIGKILL (the OOM killer) left its whole staging folder, an artefact's size, beside the
    target for good, one more at every killed retry; the next save of that target now removes those whose writer
    ended, never one a live save is writing."""
    import subprocess
    import sys

    from tadq.utils import _host_tag

    qmodel, scheduler = tadq.load(artefact)
    target = tmp_path / "q"
    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed = tmp_path / f".q.tmp-{ended.pid}-{_host_tag()}-ab12cd34"
        writing = tmp_path / f".q.tmp-{live.pid}-{_host_tag()}-ef56gh78"
        other = tmp_path / f".qq.tmp-{ended.pid}-{_host_tag()}-ab12cd34"  # another target's
        for folder in (killed, writing, other):
            shutil.copytree(artefact, folder)
        save_quantized(qmodel, target, scheduler)
        assert _hidden(tmp_path) == sorted([writing.name, other.name])
        assert verify_manifest(target) is True
    finally:
        live.kill()
        live.wait()
