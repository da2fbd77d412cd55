"""Progress bars where stderr is not a terminal (CI logs, ``2> run.log``): redrawn every
``NON_TERMINAL_INTERVAL_S`` seconds, not ten times a second. tqdm's default wrote one carriage-return copy of the
bar per 0.1 s of work, tens of thousands of copies over an hour-long calibration or sampling run."""

from __future__ import annotations

import ast
import io
from pathlib import Path

import pytest
import torch
import tqdm.auto
import tqdm.std

import tadq
from tadq.metrics.frechet import digit_features
from tadq.progress import NON_TERMINAL_INTERVAL_S, progress_bar, show_next
from tadq.sampling import SamplerConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "tadq"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _default_mininterval() -> float:
    with tqdm.std.tqdm(file=io.StringIO()) as bar:
        return bar.mininterval


def test_a_bar_on_a_stream_that_is_not_a_terminal_redraws_rarely(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == NON_TERMINAL_INTERVAL_S
    with progress_bar(range(3), file=_Terminal()) as bar:  # a terminal keeps tqdm's live bar
        assert bar.mininterval == _default_mininterval() < NON_TERMINAL_INTERVAL_S
    with progress_bar(range(3), file=io.StringIO(), mininterval=1.5) as bar:  # the caller's own wins
        assert bar.mininterval == 1.5
    monkeypatch.setenv("TQDM_MININTERVAL", "2.5")  # so does tqdm's variable (which tqdm reads when imported)
    with progress_bar(range(3), file=io.StringIO()) as bar:
        assert bar.mininterval == _default_mininterval()


def test_sampling_to_a_log_file_writes_a_few_bars_not_one_per_step(tiny_unet, ddpm_scheduler, monkeypatch):
    """A fake clock (one second per reading): tqdm's 0.1 s interval redrew the bar at every step."""
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    clock = iter(range(10**6))
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    steps = 40
    tadq.sample(tiny_unet, ddpm_scheduler, SamplerConfig("ddim", num_steps=steps), num_samples=1, seed=0)
    elapsed = next(clock)
    redraws = log.getvalue().count("\r")
    assert 0 < redraws <= elapsed / NON_TERMINAL_INTERVAL_S + 2, log.getvalue()  # + the first and the last
    assert redraws < steps


def test_a_note_per_step_waits_for_the_bars_interval(monkeypatch):
    """The reconstruction's unit names and the training loops' losses: ``set_postfix``'s default refresh redrew the
    bar once per unit or step however long its interval. On a terminal the note is drawn at once."""
    clock = iter(range(10**6))
    monkeypatch.setattr(tqdm.std, "time", lambda: float(next(clock)))
    steps = 60
    log = io.StringIO()
    for step in (bar := progress_bar(range(steps), file=log)):
        show_next(bar, f"unit {step}")
    elapsed = next(clock)
    redraws = log.getvalue().count("\r")
    assert redraws <= 2 * (elapsed / NON_TERMINAL_INTERVAL_S) + 2 < steps, log.getvalue()
    assert "unit 59" in log.getvalue().rsplit("\r", 1)[-1]  # the closing bar names the last one
    terminal = _Terminal()
    with progress_bar(total=2, file=terminal) as bar:
        show_next(bar, "the first unit")
        assert "the first unit" in terminal.getvalue()


def test_no_module_draws_a_bar_past_the_helper():
    """Every bar of the library goes through ``tadq.progress.progress_bar`` (imports for annotations aside)."""
    direct = []
    for path in SRC.rglob("*.py"):
        if path.name == "progress.py" and path.parent == SRC:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        checked = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
        direct += [f"{path.relative_to(SRC)}:{node.lineno}" for node in ast.walk(tree)
                   if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in checked
                   and any((getattr(node, "module", None) or alias.name).split(".")[0] == "tqdm"
                           for alias in node.names)]
    assert not direct, f"tqdm imported directly (use tadq.progress.progress_bar): {direct}"


@pytest.mark.parametrize("stream", [None, io.StringIO()])
def test_a_disabled_bar_writes_nothing(stream, monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    for _ in progress_bar(range(5), disable=True, file=stream):
        pass
    assert log.getvalue() == "" and (stream is None or stream.getvalue() == "")


def test_a_bar_opened_under_another_is_erased_when_it_ends():
    """``tadq recipe``'s candidates: each one's inner bars (sampling, reconstruction) stayed on screen after it."""
    with progress_bar(range(3), file=io.StringIO()) as outer:
        assert outer.leave is True
        with progress_bar(range(3), file=io.StringIO()) as inner:
            assert inner.leave is False
        with progress_bar(range(3), file=io.StringIO(), leave=True) as kept:  # the caller's own wins
            assert kept.leave is True
    with progress_bar(range(3), file=io.StringIO(), disable=True):  # a hidden bar owns no line
        with progress_bar(range(3), file=io.StringIO()) as alone:
            assert alone.leave is True


def test_the_sampling_bar_under_an_outer_bar_is_transient(tiny_unet, ddpm_scheduler, monkeypatch):
    import tadq.sampling.loop as loop

    bars = []

    def recorded(*args, **options):
        bars.append(progress_bar(*args, **options))
        return bars[-1]

    monkeypatch.setattr(loop, "progress_bar", recorded)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    tadq.sample(tiny_unet, ddpm_scheduler, SamplerConfig("ddim", num_steps=2), num_samples=1, seed=0)
    with progress_bar(range(1), desc="tadq recipe"):
        tadq.sample(tiny_unet, ddpm_scheduler, SamplerConfig("ddim", num_steps=2), num_samples=1, seed=0)
    assert [bar.desc for bar in bars] == ["sampling", "sampling"]
    assert [bar.leave for bar in bars] == [True, False]


@pytest.fixture
def bars_off():
    from tadq.progress import set_progress

    set_progress(False)
    yield
    set_progress(True)


def test_the_process_switch_hides_bars_their_caller_asked_for(bars_off, monkeypatch):
    """``tadq --quiet``: a bar with no switch of its own (training loops) or one its caller turned on still drew."""
    from tadq.progress import set_progress

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    for _ in progress_bar(range(5), desc="no switch"):
        pass
    for _ in progress_bar(range(5), desc="asked for", disable=False):
        pass
    assert log.getvalue() == ""
    set_progress(True)  # and the bars come back when it is turned on again
    for _ in progress_bar(range(5), desc="shown"):
        pass
    assert "shown" in log.getvalue()


def test_every_bar_of_the_library_is_closed_by_a_with_block():
    """A bar is closed when its loop ends, not when an error leaves it: its frame, kept by the traceback (a notebook
    keeps the last one), held it open, so every later bar counted it as an outer bar and defaulted to leave=False."""
    unclosed = []
    for path in SRC.rglob("*.py"):
        if path.name == "progress.py" and path.parent == SRC:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        managed = {id(item.context_expr) for node in ast.walk(tree) if isinstance(node, ast.With)
                   for item in node.items}
        unclosed += [f"{path.relative_to(SRC)}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "progress_bar"
                     and id(node) not in managed]
    assert not unclosed, f"bars opened outside a with block (left open by an error): {unclosed}"


class _FailingClassifier(torch.nn.Module):
    """Features of the first images, then an error (the extraction stopped midway)."""

    num_features = 2

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls, self.fail_at = 0, fail_at

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("stopped")
        return images.flatten(1)[:, :self.num_features]


def test_a_bar_stopped_by_an_error_leaves_later_bars_alone(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    kept = []
    try:
        digit_features(torch.zeros(40, 1, 4, 4), _FailingClassifier(fail_at=3), batch_size=1)
    except RuntimeError as error:
        kept.append(error)  # as a notebook keeps the last error (sys.last_exc), and its frames
    assert kept and not [bar for bar in tqdm.auto.tqdm._instances if not bar.disable]
    with progress_bar(range(2), file=io.StringIO()) as later:
        assert later.leave is True
