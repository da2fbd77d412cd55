"""Paths as users type them, across every command: odd but valid names (spaces, quotes, unicode, a leading dash,
a folder reached through a symlink) work and the output lands exactly where asked; a path no file can be written at
(a name over the file system's limit, an unexpanded ``~``, a dangling symlink, a file where a folder is meant and
the reverse, /dev/null, an unwritable folder, a symlink tadq would replace) is refused in one line naming it, exit
code 2, before any work and with nothing written."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from tests.io.tiny_artefacts import save_tiny_artefact
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()
LONG = "n" * 300  # one name past the 255 bytes Linux file systems take
FAST_QUANTIZE = ("--steps", "2", "--calib-trajectories", "2")


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("odd-paths") / "q", "W8A8")


def _refused(result, *needles: str) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert text.startswith("error:") and text.count("error:") == 1, text
    for needle in needles:
        assert needle in text, text
    return text


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _quantize(model: Path | str, out: Path | str, cache: Path | str, *extra: str) -> list[str]:
    return ["quantize", str(model), "--out", str(out), "--cache-dir", str(cache), *FAST_QUANTIZE, *extra]


def _commands(model: Path, artefact: Path, tmp: Path, **paths: str) -> dict[str, list[str]]:
    """Each command with the tiniest settings and one of its written paths replaced (``flag=path``)."""
    given = {"out": str(tmp / "out"), "cache": str(tmp / "cache"), **paths}
    return {
        "quantize": _quantize(model, given["out"], given["cache"]),
        "run": ["run", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--num-samples", "2",
                "--steps", "2", "--calib-trajectories", "2", "--out", given["out"], "--cache-dir", given["cache"]],
        "bench": ["bench", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--samplers",
                  "ddim-eta0", "--steps", "2", "--num-samples", "2", "--calib-trajectories", "2", "--out",
                  given["out"], "--cache-dir", given["cache"]],
        "recipe": ["recipe", str(model), "--budget-bits", "W8A8", "--presets", "W8A8", "--bases", "naive", "--stacks",
                   "none", "--steps", "2", "--calib-trajectories", "2", "--fit-trajectories", "2",
                   "--selection-samples", "2", "--heldout", "2", "--out", given["out"]],
        "analyze": ["analyze", str(artefact), "--fp-model", str(model), "--num-samples", "2", "--out", given["out"]],
        "evaluate": ["evaluate", str(artefact), "--reference", str(model), "--num-samples", "2", "--steps", "2",
                     "--out", given["out"]],
        "sample-sharded": ["sample-sharded", str(artefact), "--num-samples", "2", "--steps", "2", "--device", "cpu",
                           "--out-dir", given["out"]],
    }


def test_odd_but_valid_names_work_and_land_where_asked(tiny_model_dir, tmp_path, monkeypatch):
    odd = tmp_path / "wörk 数字 it's \"q\""
    odd.mkdir()
    shutil.copytree(tiny_model_dir, odd / "-model é")
    monkeypatch.chdir(odd)  # relative paths that start with a dash, given as ./-name
    result = runner.invoke(app, _quantize("./-model é", "./-art 数 'x'", "./-cache é"))
    assert result.exit_code == 0, result.output
    assert (odd / "-art 数 'x'" / "tadq_output.json").is_file()
    (tmp_path / "real").mkdir()
    (tmp_path / "via link").symlink_to(tmp_path / "real", target_is_directory=True)
    png, tensors = tmp_path / "via link" / "-s é.png", odd / "-t 数.safetensors"
    result = runner.invoke(app, ["sample", "./-art 数 'x'", "--num-samples", "2", "--steps", "2", "--out", str(png),
                                 "--tensor-out", "./-t 数.safetensors"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "real" / "-s é.png").is_file() and tensors.is_file()  # through the link, into its target
    assert (tmp_path / "via link").is_symlink()
    assert sorted(p.name for p in odd.iterdir()) == ["-art 数 'x'", "-cache é", "-model é", "-t 数.safetensors"]


@pytest.mark.parametrize("command", ["quantize", "run", "bench", "recipe", "analyze", "evaluate", "sample-sharded"])
def test_a_name_too_long_is_refused_in_one_line(tiny_model_dir, artefact, tmp_path, command):
    before = _tree(tmp_path)
    result = runner.invoke(app, _commands(tiny_model_dir, artefact, tmp_path, out=str(tmp_path / LONG))[command])
    text = _refused(result, "300 bytes", "at most 255")
    assert LONG not in text  # a 300-character name shortened, not dumped into the line
    assert _tree(tmp_path) == before


def _with(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced, or the flag added."""
    if flag in args:
        return [*args[:args.index(flag) + 1], value, *args[args.index(flag) + 2:]]
    return [*args, flag, value]


@pytest.mark.parametrize("flag, value", [("--cache-dir", LONG), ("--checkpoint", LONG + ".pt")])
def test_a_long_cache_or_checkpoint_name_is_refused_before_quantizing(tiny_model_dir, tmp_path, flag, value):
    args = _quantize(tiny_model_dir, tmp_path / "q", tmp_path / "cache", "--method", "qdiffusion")
    _refused(runner.invoke(app, _with(args, flag, str(tmp_path / value))), flag, "per name")
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag, value", [("--out", LONG + ".png"), ("--tensor-out", LONG + ".safetensors")])
def test_sample_refuses_a_long_file_name_before_sampling(artefact, tmp_path, flag, value):
    paths = {"--out": str(tmp_path / "s.png"), "--tensor-out": str(tmp_path / "t.safetensors"), flag:
             str(tmp_path / value)}
    result = runner.invoke(app, ["sample", str(artefact), "--num-samples", "2", "--steps", "2",
                                 *[part for item in paths.items() for part in item]])
    _refused(result, flag, "per name")
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("command", ["verify", "sample", "analyze"])
def test_a_long_input_name_is_one_line_not_a_traceback(tmp_path, command):
    result = runner.invoke(app, [command, str(tmp_path / LONG)])  # stat raised ENAMETOOLONG, exit code 1
    text = _refused(result, "File name too long")
    assert LONG not in text


@pytest.mark.parametrize("command", ["quantize", "run", "bench", "analyze", "evaluate", "sample-sharded"])
def test_an_unexpanded_tilde_is_refused_not_made_a_folder(tiny_model_dir, artefact, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, _commands(tiny_model_dir, artefact, tmp_path, out="~/tadq-out")[command])
    _refused(result, "~/tadq-out", "not expanded", str(Path("~/tadq-out").expanduser()))
    assert not (tmp_path / "~").exists()  # it became a folder literally named ~ in the working folder


def test_tilde_in_a_cache_or_tensor_path_is_refused(tiny_model_dir, artefact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "q", "~/cache")), "--cache-dir", "~/cache")
    _refused(runner.invoke(app, ["sample", str(artefact), "--out", str(tmp_path / "s.png"), "--tensor-out",
                                 "~/t.safetensors"]), "--tensor-out", "not expanded")
    assert not (tmp_path / "~").exists() and not (tmp_path / "q").exists()


def test_a_tilde_folder_that_exists_is_used_literally(artefact, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~").mkdir()
    result = runner.invoke(app, ["sample", str(artefact), "--num-samples", "2", "--steps", "2", "--out", "~/s.png"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "~" / "s.png").is_file()


@pytest.mark.parametrize("command", ["quantize", "run", "analyze", "sample-sharded"])
def test_a_dangling_symlink_out_is_refused_before_work(tiny_model_dir, artefact, tmp_path, command):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    result = runner.invoke(app, _commands(tiny_model_dir, artefact, tmp_path, out=str(tmp_path / "link"))[command])
    _refused(result, "link is a symlink to", "does not exist")
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "cache").exists()  # refused before calibration (quantize failed at the final rename)


def test_a_dangling_symlink_on_the_way_or_as_cache_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    _refused(runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "link" / "q", tmp_path / "c")), "on the way")
    # the cache was silently not written (the run succeeded without one)
    _refused(runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "q", tmp_path / "link")), "--cache-dir")
    assert not (tmp_path / "q").exists() and not (tmp_path / "nowhere").exists()


def test_sample_refuses_a_symlink_png_it_would_replace(artefact, tmp_path):
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _refused(runner.invoke(app, ["sample", str(artefact), "--num-samples", "2", "--steps", "2", "--out",
                                 str(tmp_path / "gone.png")]), "symlink")
    assert (tmp_path / "gone.png").is_symlink()  # was replaced by the grid, the link lost
    first = tmp_path / "first.png"
    assert runner.invoke(app, ["sample", str(artefact), "--num-samples", "2", "--steps", "2", "--out",
                               str(first)]).exit_code == 0
    (tmp_path / "alias.png").symlink_to(first)
    _refused(runner.invoke(app, ["sample", str(artefact), "--num-samples", "2", "--steps", "2", "--out",
                                 str(tmp_path / "alias.png")]), "alias.png is a symlink", str(first))
    assert (tmp_path / "alias.png").is_symlink()


def test_overwrite_through_a_symlink_to_an_artefact_is_refused(tiny_model_dir, tmp_path):
    target = tmp_path / "art"
    assert runner.invoke(app, _quantize(tiny_model_dir, target, tmp_path / "c")).exit_code == 0
    before = _tree(target)
    (tmp_path / "alias").symlink_to(target, target_is_directory=True)
    result = runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "alias", tmp_path / "c", "--overwrite"))
    _refused(result, "alias is a symlink", str(target))  # the link was replaced, the target kept the old files
    assert (tmp_path / "alias").is_symlink() and _tree(target) == before


@pytest.mark.parametrize("flag", ["--out", "--cache-dir", "--checkpoint", "--config"])
def test_quantize_refuses_dev_null(tiny_model_dir, tmp_path, flag):
    args = _quantize(tiny_model_dir, tmp_path / "q", tmp_path / "cache", "--method", "qdiffusion")
    text = _refused(runner.invoke(app, _with(args, flag, os.devnull)), flag, os.devnull)
    assert "does not exist" not in text  # /dev/null exists; it is a device, not a file or folder
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("flag", ["--out", "--tensor-out"])
def test_sample_refuses_dev_null(artefact, tmp_path, flag):
    paths = {"--out": str(tmp_path / "s.png"), flag: os.devnull}
    _refused(runner.invoke(app, ["sample", str(artefact), *[p for item in paths.items() for p in item]]), flag)
    assert _tree(tmp_path) == []


@pytest.mark.parametrize("flag", ["--config", "--calib-prompts"])
def test_a_folder_where_a_file_is_meant_says_so(tiny_model_dir, tmp_path, flag):
    text = _refused(runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "q", tmp_path / "c", flag,
                                                 str(tmp_path))), flag, "is a folder")
    assert "does not exist" not in text


def test_verify_says_a_missing_folder_does_not_exist(tmp_path):
    _refused(runner.invoke(app, ["verify", str(tmp_path / "typo")]), "typo does not exist")
    (tmp_path / "file").write_text("x")
    _refused(runner.invoke(app, ["verify", str(tmp_path / "file")]), "is not a folder")


def test_sample_sharded_reference_dir_checked_as_a_path(artefact, tmp_path):
    base = ["sample-sharded", str(artefact), "--num-samples", "2", "--steps", "2", "--device", "cpu",
            "--out-dir", str(tmp_path / "run")]
    _refused(runner.invoke(app, [*base, "--reference-dir", str(tmp_path / "nope")]), "--reference-dir",
             "does not exist")
    (tmp_path / "f").write_text("x")
    _refused(runner.invoke(app, [*base, "--reference-dir", str(tmp_path / "f")]), "--reference-dir", "is a file")
    assert not (tmp_path / "run").exists()
    assert runner.invoke(app, [*base, "--no-metrics"]).exit_code == 0
    # the run compared with itself: agreement 1, PSNR 100, reported as a result
    _refused(runner.invoke(app, [*base, "--reference-dir", str(tmp_path / "run")]), "is the --out-dir itself")


def test_sample_sharded_names_its_own_flag(artefact, tmp_path):
    (tmp_path / "f").write_text("x")
    _refused(runner.invoke(app, ["sample-sharded", str(artefact), "--device", "cpu", "--out-dir",
                                 str(tmp_path / "f")]), "--out-dir")


def test_an_unwritable_folder_is_refused_before_quantizing(tiny_model_dir, tmp_path, monkeypatch):
    """The sandbox runs as root, where a chmod does not stop writes; the write probe is refused as it would be."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = tempfile.mkstemp

    def refuse(*args, **kwargs):
        if Path(kwargs.get("dir", "")) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _refused(runner.invoke(app, _quantize(tiny_model_dir, locked / "q", tmp_path / "c")), "--out", "not writable")
    _refused(runner.invoke(app, _quantize(tiny_model_dir, tmp_path / "q", locked / "c")), "--cache-dir",
             "not writable")
    assert _tree(locked) == [] and not (tmp_path / "q").exists() and not (tmp_path / "c").exists()


def test_a_symlink_loop_on_the_way_is_refused(artefact, tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    _refused(runner.invoke(app, ["sample", str(artefact), "--out", str(tmp_path / "loop" / "s.png")]),
             "loop on the way", "cannot be followed")


@pytest.mark.parametrize("args", [["sample", "~/no-model"], ["run", "--model", "~/no-model"],
                                  ["verify", "~/no-model"]])
def test_a_missing_input_under_tilde_says_tilde_is_not_expanded(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    _refused(runner.invoke(app, args), "~/no-model", "does not exist", "quoted ~ is not expanded")


def test_outputs_inside_another_artefact_are_refused(tiny_model_dir, artefact, tmp_path):
    """Not the input, but an artefact all the same: files added inside it made `tadq verify` fail it."""
    before = _tree(artefact)
    for args, flag in [(_quantize(tiny_model_dir, artefact / "nested", tmp_path / "c"), "--out"),
                       (_quantize(tiny_model_dir, tmp_path / "q", artefact / "cache"), "--cache-dir"),
                       (["sample", str(tiny_model_dir), "--out", str(artefact / "s.png")], "--out"),
                       (_commands(tiny_model_dir, artefact, tmp_path, out=str(artefact / "r"))["run"], "--out")]:
        _refused(runner.invoke(app, args), flag, "lies inside the tadq artefact")
    assert _tree(artefact) == before
    assert runner.invoke(app, ["verify", str(artefact)]).exit_code == 0


def test_a_path_that_only_passes_through_an_artefact_is_not_inside_it(artefact, tmp_path):
    from tadq.fsguard import check_output_dir, check_output_file

    check_output_dir(artefact / ".." / "beside", kind="run", resume=True)  # resolved: a sibling of the artefact
    check_output_file(artefact / ".." / "beside.png", what="--out", suffixes=(".png",))
    assert not (artefact.parent / "beside").exists()


def test_every_command_prints_paths_as_written_not_as_rich_markup(tmp_path):
    """rich read a path as markup: ``tadq sample --out 'runs/[/x]/s.png'`` wrote the grid and then ended in a
    MarkupError traceback on its last line (only ``tadq bench`` printed literally). The shared console reads no
    markup or emoji codes; its error line keeps its style."""
    from typer.testing import CliRunner

    from tadq.cli.app import app

    folder = tmp_path / "[/x] :rocket:"  # a folder "[" holding "x] :rocket:"
    folder.mkdir(parents=True)
    result = CliRunner().invoke(app, ["sample", "--num-samples", "2", "--steps", "2", "--out", str(folder / "s.png")])
    assert result.exit_code == 0, result.output
    assert (folder / "s.png").is_file() and str(folder / "s.png") in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["verify", str(folder / "none")])
    assert result.exit_code == 2 and "error: " in result.output and "[/x] :rocket:" in result.output, result.output
