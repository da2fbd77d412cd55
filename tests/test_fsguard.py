"""tadq.fsguard: which folders tadq may fill or replace, decided before any work."""

from __future__ import annotations

import json

import pytest

from tadq.fsguard import MARKER_FILE, OutputRefused, check_output_dir, check_output_file, is_tadq_output, mark_output


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
            check_output_dir(out, overwrite=True, inputs=[model])
    check_output_dir(model / "q", inputs=[model], force_foreign=True)  # named explicitly
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    with pytest.raises(OutputRefused, match="--overwrite"):
        check_output_dir(foreign)
    with pytest.raises(OutputRefused, match="did not write"):
        check_output_dir(foreign, overwrite=True)
    with pytest.raises(OutputRefused, match="did not write"):
        check_output_dir(foreign, resume=True)
    check_output_dir(foreign, overwrite=True, force_foreign=True)
    mark_output(foreign, "report")
    check_output_dir(foreign, resume=True)
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    with pytest.raises(OutputRefused, match="is a file"):
        check_output_dir(foreign / "x", overwrite=True, force_foreign=True)
    with pytest.raises(OutputRefused, match="not writable"):
        check_output_dir("/sys/tadq-fsguard-test")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "foreign", "model"]  # no probe left behind


def test_file_rules(tmp_path):
    with pytest.raises(OutputRefused, match=r"must end in \.png"):
        check_output_file(tmp_path / "grid", what="--out", suffixes=(".png",))
    (tmp_path / "d.png").mkdir()
    with pytest.raises(OutputRefused, match="is a folder"):
        check_output_file(tmp_path / "d.png", what="--out", suffixes=(".png",))
    with pytest.raises(OutputRefused, match="not writable"):
        check_output_file("/sys/x.png", what="--out", suffixes=(".png",))
    check_output_file(tmp_path / "new" / "s.png", what="--out", suffixes=(".png",))
