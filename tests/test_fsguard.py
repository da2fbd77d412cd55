"""tadq.fsguard: which folders tadq may fill or replace, decided before any work."""

from __future__ import annotations

import json

import pytest

from tadq.fsguard import (
    MARKER_FILE,
    OutputRefused,
    check_output_dir,
    check_output_file,
    is_tadq_file,
    is_tadq_output,
    mark_output,
)


def test_marker_is_deterministic_and_recognised(tmp_path):
    (tmp_path / "a").mkdir()
    mark_output(tmp_path / "a", "run")
    mark_output(tmp_path / "a", "run")  # idempotent
    (tmp_path / "b").mkdir()
    mark_output(tmp_path / "b", "run")
    assert (tmp_path / "a" / MARKER_FILE).read_bytes() == (tmp_path / "b" / MARKER_FILE).read_bytes()
    assert is_tadq_output(tmp_path / "a")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / MARKER_FILE).write_text('{"format": "something-else"}')
    assert not is_tadq_output(tmp_path / "c")


@pytest.mark.parametrize(("name", "document", "ours"), [
    ("tadq_config.json", {"format": "tadq-quantized"}, True),
    ("results.json", {"rows": [], "versions": {"tadq": "0.1"}}, True),
    ("manifest.json", {"format": "tadq-sharded-samples"}, True),
    ("results.json", {"rows": []}, False),
    ("model_index.json", {"_class_name": "DDPMPipeline"}, False),
])
def test_folders_of_older_tadq_are_recognised_by_their_files(tmp_path, name, document, ours):
    (tmp_path / name).write_text(json.dumps(document))
    assert is_tadq_output(tmp_path) is ours


def test_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    for out, relation in ((model, "is the input"), (model / "q", "lies inside"), (tmp_path, "contains the input")):
        with pytest.raises(OutputRefused, match=relation):
            check_output_dir(out, kind="report", overwrite=True, inputs=[model])
    check_output_dir(model / "q", kind="report", inputs=[model], force_foreign=True)  # named explicitly
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_output_dir(foreign, kind="report")
    with pytest.raises(OutputRefused, match="did not write"):
        check_output_dir(foreign, kind="report", overwrite=True)
    with pytest.raises(OutputRefused, match="did not write"):
        check_output_dir(foreign, kind="report", resume=True)
    check_output_dir(foreign, kind="report", overwrite=True, force_foreign=True)
    mark_output(foreign, "report")
    check_output_dir(foreign, kind="report", resume=True)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", kind="report")
    with pytest.raises(OutputRefused, match="is a file"):
        check_output_dir(foreign / "x", kind="report", overwrite=True, force_foreign=True)
    with pytest.raises(OutputRefused, match="not writable"):
        check_output_dir("/sys/tadq-fsguard-test", kind="report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "model"]  # no probe left behind


def test_overwrite_refuses_an_artefact_holding_files_added_after_its_save(tmp_path):
    """A marked artefact was replaced whole by --overwrite, deleting a user's file put in it after the save."""
    from tadq.io.manifest import MANIFEST_FILE, write_manifest

    artefact = tmp_path / "artefact"
    artefact.mkdir()
    (artefact / "tadq_weights.safetensors").write_bytes(b"weights")
    mark_output(artefact, "artefact")
    write_manifest(artefact)
    check_output_dir(artefact, kind="artefact", overwrite=True)  # only what tadq wrote: replaced
    (artefact / "notes.txt").write_text("mine")
    with pytest.raises(OutputRefused, match=r"notes\.txt.*--overwrite would delete"):
        check_output_dir(artefact, kind="artefact", overwrite=True)
    check_output_dir(artefact, kind="artefact", resume=True)  # adding to it deletes nothing
    check_output_dir(artefact, kind="artefact", overwrite=True, force_foreign=True)  # named explicitly
    (artefact / MANIFEST_FILE).write_text("damaged")  # unreadable manifest: the names tadq writes decide
    with pytest.raises(OutputRefused, match=r"notes\.txt.*--overwrite would delete"):
        check_output_dir(artefact, kind="artefact", overwrite=True)
    (artefact / "notes.txt").rename(tmp_path / "notes.txt")
    check_output_dir(artefact, kind="artefact", overwrite=True)  # a damaged artefact of tadq's own files: replaceable
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("manifest", ["deleted", "damaged"])
def test_overwrite_without_a_readable_manifest_still_spares_a_users_files(tmp_path, manifest):
    """With its manifest deleted, an artefact's added files went unseen (no manifest listed nothing as added) and
    --overwrite deleted them; with it damaged, a user's file inside a component folder (``vae/notes.txt``) counted
    as tadq's. Without a manifest, the files diffusers and transformers write in component folders are tadq's, any
    other file is a user's."""
    from tadq.io.manifest import MANIFEST_FILE, write_manifest

    artefact = tmp_path / "artefact"
    for name, text in {"tadq_config.json": "{}", "model_index.json": json.dumps({"_class_name": "X", "vae": [
            "diffusers", "AutoencoderKL"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"]}),
            "vae/config.json": "{}", "vae/diffusion_pytorch_model.safetensors": "w", "tokenizer/merges.txt": "m",
            "tokenizer/vocab.json": "{}", "text_encoder/model.safetensors": "w"}.items():
        (artefact / name).parent.mkdir(parents=True, exist_ok=True)
        (artefact / name).write_text(text)
    mark_output(artefact, "artefact")
    write_manifest(artefact)
    if manifest == "deleted":
        (artefact / MANIFEST_FILE).unlink()
    else:
        (artefact / MANIFEST_FILE).write_text("{")
    check_output_dir(artefact, kind="artefact", overwrite=True)  # tadq's and the components' own files only
    for mine in ("notes.txt", "vae/my_vae_notes.txt", "text_encoder/results.csv"):
        (artefact / mine).write_text("mine")
        with pytest.raises(OutputRefused, match=rf"{mine.replace('.', '[.]')}.*--overwrite would delete"):
            check_output_dir(artefact, kind="artefact", overwrite=True)
        (artefact / mine).unlink()


def test_a_folder_marked_as_another_kind_of_output_is_refused_and_keeps_its_marker(tmp_path):
    """tadq run --out ARTEFACT rewrote the artefact's marker (hashed by its manifest: the artefact no longer loaded),
    and quantize --overwrite --out RUN_FOLDER replaced a run folder, the user's notes in it included."""
    from tadq.fsguard import MARKER_FILE, output_kind

    run = tmp_path / "run"
    run.mkdir()
    mark_output(run, "run")
    (run / "notes.txt").write_text("mine")
    marker = (run / MARKER_FILE).read_bytes()
    for overwrite, force_foreign in ((True, False), (True, True), (False, False)):
        with pytest.raises(OutputRefused, match="is a tadq 'run' folder, not a 'artefact' one"):
            check_output_dir(run, kind="artefact", overwrite=overwrite, resume=not overwrite,
                             force_foreign=force_foreign)
    check_output_dir(run, kind="run", resume=True)  # its own kind may refill it
    with pytest.raises(OutputRefused, match="tadq run folder"):
        mark_output(run, "artefact")
    assert (run / MARKER_FILE).read_bytes() == marker and output_kind(run) == "run"
    assert (run / "notes.txt").read_text() == "mine"
    assert output_kind(tmp_path / "missing") is None


def test_file_rules(tmp_path):
    with pytest.raises(OutputRefused, match=r"must end in \.png"):
        check_output_file(tmp_path / "grid", what="--out", suffixes=(".png",))
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OutputRefused, match="is a folder"):
        check_output_file(tmp_path / "d.png", what="--out", suffixes=(".png",))
    with pytest.raises(OutputRefused, match="not writable"):
        check_output_file("/sys/x.png", what="--out", suffixes=(".png",))
    check_output_file(tmp_path / "new" / "s.png", what="--out", suffixes=(".png",))


def test_an_existing_file_is_replaced_only_when_tadq_wrote_it(tmp_path):
    """A PNG or safetensors file at an output path is tadq's (its figure mark, its metadata) or is left alone."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from tadq.report import save_comparison_grid
    from tadq.safefiles import save_checked

    ours_png = save_comparison_grid({"x": torch.zeros(2, 1, 4, 4)}, tmp_path / "ours.png")
    save_checked({"x": torch.zeros(2)}, {"seed": 0}, tmp_path / "ours.safetensors")
    Image.new("RGB", (4, 4)).save(tmp_path / "photo.png")  # someone's PNG
    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))  # someone's safetensors
    (tmp_path / "notes.png").write_text("not an image")
    for name in ("ours.png", "ours.safetensors"):
        assert is_tadq_file(tmp_path / name)
        check_output_file(tmp_path / name, what="--out")
    for name in ("photo.png", "weights.safetensors", "notes.png"):
        assert not is_tadq_file(tmp_path / name)
        before = (tmp_path / name).read_bytes()
        with pytest.raises(OutputRefused, match="tadq did not write it"):
            check_output_file(tmp_path / name, what="--out")
        check_output_file(tmp_path / name, what="--out", force_foreign=True)
        assert (tmp_path / name).read_bytes() == before
    assert ours_png.stat().st_size > 0


def test_sample_refuses_to_overwrite_a_foreign_png_before_sampling(tmp_path, tiny_model_dir):
    from PIL import Image
    from typer.testing import CliRunner

    from tadq.cli.app import app

    target = tmp_path / "mine.png"
    Image.new("RGB", (4, 4)).save(target)
    before = target.read_bytes()
    args = ["sample", str(tiny_model_dir), "--num-samples", "2", "--steps", "2", "--out", str(target)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "tadq did not write it" in result.output and target.read_bytes() == before
    result = CliRunner().invoke(app, [*args, "--force-foreign"])
    assert result.exit_code == 0, result.output
    assert is_tadq_file(target)
    assert CliRunner().invoke(app, args).exit_code == 0  # its own grid is replaced without the flag


def test_a_foreign_folder_is_named_foreign_at_once_not_after_a_first_overwrite(tmp_path):
    """It used to say "pass --overwrite", and only with --overwrite that --force-foreign was needed too."""
    from tadq.fsguard import OutputRefused, check_output_dir

    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputRefused, match="holds files tadq did not write.*--force-foreign") as refused:
            check_output_dir(tmp_path, kind="artefact", overwrite=overwrite)
        assert ("with --overwrite" in str(refused.value)) is not overwrite


@pytest.mark.parametrize("kind", ["samples", "sample-sharded", "run"])
def test_a_new_folder_holding_only_a_killed_runs_temp_file_is_not_refused(tmp_path, kind):
    """A run killed during its first write into a new folder (its marker, a sharded run's manifest) left only a
    hidden temp file there: the next run refused the folder as holding files tadq did not write."""
    import subprocess
    import sys

    from tadq.utils import _host_tag

    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / f".{MARKER_FILE}.{ended.pid}-{_host_tag()}-k3x9q2zw.tmp").write_text("{")
    check_output_dir(out, kind=kind, resume=True)
    (out / "notes.txt").write_text("mine")  # a file of someone else's still is one
    with pytest.raises(OutputRefused, match="did not write"):
        check_output_dir(out, kind=kind, resume=True)


# -- output_lock: one command at a time writes an output ---------------------------------------------------------
def _dead_pid() -> int:
    """The id of a process of this host that has ended (a child, waited for)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(out, pid: int) -> None:
    from tadq.fsguard import lock_path
    from tadq.utils import _host_tag

    lock_path(out).write_text(json.dumps({"pid": pid, "host": _host_tag(), "token": "theirs", "since": 0}))


def test_an_output_held_by_a_live_process_is_refused_naming_it_and_its_pid(tmp_path):
    import os

    from tadq.fsguard import lock_path, output_lock

    out = tmp_path / "run"
    _write_lock(out, os.getpid())
    before = lock_path(out).read_bytes()
    with pytest.raises(OutputRefused, match=f"--out {out} is being written by another tadq process "
                                            f"\\(pid {os.getpid()}, "):
        with output_lock(out):
            pytest.fail("the lock was taken")
    assert lock_path(out).read_bytes() == before  # the holder's lock is left alone
    assert not out.exists()


def test_a_lock_of_an_ended_process_is_taken_over_and_released(tmp_path):
    import os

    from tadq.fsguard import lock_path, output_lock

    out = tmp_path / "run"
    _write_lock(out, _dead_pid())
    with output_lock(out) as lock:
        assert lock == lock_path(out) and json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(OutputRefused, match=f"pid {os.getpid()}"):  # held: a second writer in this process too
            with output_lock(out):
                pass
    assert not lock_path(out).exists() and list(tmp_path.iterdir()) == []


def test_the_lock_lies_beside_the_output_and_its_made_parents_go_with_it(tmp_path):
    from tadq.fsguard import lock_path, output_lock

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert lock_path(tmp_path / "link" / "out") == tmp_path / "real" / ".out.tadq-lock"  # one lock for both names
    with output_lock(tmp_path / "new" / "deeper" / "out.png"):
        assert (tmp_path / "new" / "deeper" / ".out.png.tadq-lock").is_file()
    assert not (tmp_path / "new").exists()  # made for the lock, empty again: removed


def test_an_output_name_at_the_file_system_limit_gets_a_lock_name_that_fits(tmp_path):
    from tadq.fsguard import _name_limit, lock_path, output_lock

    long, other = tmp_path / ("a" * _name_limit(tmp_path)), tmp_path / ("a" * (_name_limit(tmp_path) - 1))
    assert len(lock_path(long).name.encode()) <= _name_limit(tmp_path) and lock_path(long) != lock_path(other)
    with output_lock(long):
        assert lock_path(long).is_file()
