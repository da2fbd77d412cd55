"""What a command prints goes where a user piping it expects: its results (the lines naming what it wrote, its
tables) on stdout, and everything about the work under way (log lines, notes, error lines, progress bars) on
stderr. The log handler wrote to stdout, so `tadq quantize ... > out.txt` got every INFO line mixed into the
results."""

from __future__ import annotations

import logging
import re
import signal
import sys

import pytest
import tqdm.std
import typer
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.common import setup
from tadq.progress import progress_bar

SMALL = ["--steps", "2", "--calib-trajectories", "2", "--threads", "1"]


@pytest.fixture
def artefact(tiny_model_dir, tmp_path):
    """``tadq quantize`` of the tiny model, with the result of the command."""
    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--cache-dir",
                                      str(tmp_path / "cache"), *SMALL])
    assert result.exit_code == 0, result.output
    return out, result


def test_quantize_prints_only_its_results_on_stdout_and_its_logs_on_stderr(artefact):
    out, result = artefact
    lines = result.stdout.splitlines()
    assert lines and lines[0].startswith(f"saved {out}"), result.stdout
    assert all(line.startswith(("saved ", "artefact ")) for line in lines), result.stdout  # no log line
    assert "INFO" in result.stderr and "quantized" in result.stderr, result.stderr  # the logs, on stderr


def test_sample_stdout_names_only_what_it_wrote(artefact, tmp_path):
    out, _ = artefact
    png = tmp_path / "s.png"
    result = CliRunner().invoke(app, ["sample", str(out), "--out", str(png), "--num-samples", "2", "--steps", "2",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert str(png) in result.stdout


def test_an_error_line_goes_to_stderr(tmp_path):
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "q"), *SMALL])
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error:") and "missing" in result.stderr, result.stderr


def test_a_log_record_starts_on_a_line_of_its_own_below_a_bar(capsys):
    """A record logged while a bar was drawn (the recipe search logs inside its candidate bar) was printed right
    after the bar's text; the bars are now cleared around it and drawn again after."""
    setup(False, 0)
    with progress_bar(total=3, desc="the bar", file=sys.stderr) as bar:
        bar.update(1)
        logging.getLogger("tadq.test").info("a record")
    err = capsys.readouterr().err
    line = next(segment for segment in re.split("[\r\n]", err) if "a record" in segment)
    assert "the bar" not in line, err
    assert "the bar" in err.rsplit("a record", 1)[1]  # drawn again below the record


@pytest.mark.parametrize(("stop", "code", "word"), [(KeyboardInterrupt, 130, "Ctrl-C"),
                                                    (SystemExit(128 + signal.SIGTERM), 128 + signal.SIGTERM,
                                                     "SIGTERM")])
def test_a_stopped_command_ends_with_one_line_below_its_closed_bar(stop, code, word, monkeypatch, capsys):
    """Ctrl-C ended a command with exit code 130 and not a word (typer's way), and the interrupted loop's bar was
    drawn again at exit: now the bar is closed and one line says what stopped the command."""
    import tadq.cli.app as cli

    command = typer.Typer()

    @command.command()
    def work() -> None:  # a bar updated by hand, as the reconstruction's: its frame, kept by the traceback, holds it
        bar = progress_bar(total=10, desc="the bar", file=sys.stderr)
        bar.update(3)
        raise stop

    monkeypatch.setattr(cli, "app", command)
    monkeypatch.setattr(sys, "argv", ["tadq"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [segment for segment in re.split("[\r\n]", err) if segment.strip()][-1] == f"tadq: stopped by {word}", err
    assert not [bar for bar in tqdm.std.tqdm._instances if not bar.disable]  # closed, not left for the exit
