"""``tadq --quiet``: no progress bar, info log or note on stderr; warnings and errors still written there."""

from __future__ import annotations

import logging

from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.progress import progress_enabled

SMALL = ["--steps", "2", "--calib-trajectories", "2", "--threads", "1"]


def test_a_quiet_command_writes_only_its_results(tiny_model_dir, tmp_path):
    args = ["quantize", str(tiny_model_dir), "--cache-dir", str(tmp_path / "cache"), *SMALL]
    quiet = CliRunner().invoke(app, ["--quiet", *args, "--out", str(tmp_path / "quiet")])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "", quiet.stderr  # no sampling/calibration bar, no INFO record
    loud = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "loud")])
    assert loud.exit_code == 0, loud.output
    assert "INFO" in loud.stderr and "calibrate" in loud.stderr, loud.stderr  # what --quiet hid
    assert quiet.stdout.replace(str(tmp_path / "quiet"), "OUT") == loud.stdout.replace(str(tmp_path / "loud"), "OUT")
    assert progress_enabled()  # the switch is the process's: given back once the command ends


def test_quiet_keeps_warnings_and_errors(tmp_path):
    result = CliRunner().invoke(app, ["-q", "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "q"),
                                      *SMALL])
    assert result.exit_code == 2 and result.stderr.startswith("error:") and "missing" in result.stderr
    assert logging.getLogger("tadq").isEnabledFor(logging.WARNING)
    assert not logging.getLogger("tadq").isEnabledFor(logging.INFO)


def test_quiet_and_verbose_together_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["-q", "quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "q"),
                                      "-v", *SMALL])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--quiet" in text and "--verbose" in text, text


def test_quiet_hides_the_bars_diffusers_and_transformers_draw_while_loading_a_pipeline(tmp_path):
    """A text-to-image folder is loaded by diffusers and transformers, which drew their own "Loading pipeline
    components..." and "Loading weights" bars under --quiet; their switches are restored when the command ends."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from tadq.zoo.t2i import shipped_t2i_path

    folder = shipped_t2i_path()
    before = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    result = CliRunner().invoke(app, ["-q", "sample", str(folder), "--prompt", "the digit 7", "--num-samples", "1",
                                      "--steps", "2", "--threads", "1", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "Loading" not in result.stderr and "it/s" not in result.stderr, result.stderr
    assert (diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()) == before
