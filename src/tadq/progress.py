"""tadq's progress bars: ``tqdm.auto``'s, redrawn rarely where nobody watches them live.

tqdm redraws a bar up to ten times a second, each redraw a carriage return and the whole bar again. On a
terminal that is one line updating in place; in a CI log, a ``2> run.log`` file or a batch job's output it is
tens of thousands of bar copies for an hour-long run. Where stderr is not a terminal (and not a notebook, whose
widget updates in place) every bar here redraws at most every ``NON_TERMINAL_INTERVAL_S`` seconds, and still
shows its start and its end. A ``mininterval`` given by the caller, or tqdm's own ``TQDM_MININTERVAL``
environment variable, wins. A postfix set on every step (a training loss) is passed ``refresh=False`` for the
same reason: tqdm's default redraws the bar at once, whatever its interval. A bar opened while another is
drawn (a candidate's sampling under ``tadq recipe``'s bar) is erased when it ends unless its caller says
``leave``: left, every finished inner bar stayed on screen below the outer one. ``set_progress(False)`` (the
CLI's ``--quiet``) hides every bar of the process, those whose caller has no ``progress`` setting of its own
(training loops, a sharded run's metrics) included.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

from tqdm.auto import tqdm

__all__ = ["NON_TERMINAL_INTERVAL_S", "bars_cleared", "close_bars", "progress_bar", "progress_enabled",
           "set_progress", "show_next"]

NON_TERMINAL_INTERVAL_S = 30.0
_enabled = True  # set_progress's switch: off, no bar of this process draws anything


# the libraries that draw bars of their own while tadq loads a pipeline folder ("Loading pipeline components...",
# "Loading weights"): each has a process-wide switch, ``is_progress_bar_enabled`` / ``disable_progress_bar``
LIBRARY_BAR_SWITCHES = ("diffusers.utils.logging", "transformers.utils.logging")
_library_bars_before: dict[str, bool] = {}  # each library's switch as set_progress(False) found it


def _set_library_bars(enabled: bool) -> None:
    """Hide the libraries' own bars with tadq's, and give each its earlier setting back when tadq's come back on:
    under ``tadq --quiet`` a text-to-image folder still drew diffusers' and transformers' loading bars."""
    if enabled:  # only the libraries set_progress(False) switched off: no import of transformers at every start
        for name, was_enabled in list(_library_bars_before.items()):
            del _library_bars_before[name]
            if was_enabled:
                importlib.import_module(name).enable_progress_bar()
        return
    for name in LIBRARY_BAR_SWITCHES:
        module = importlib.import_module(name)
        _library_bars_before.setdefault(name, bool(module.is_progress_bar_enabled()))
        module.disable_progress_bar()


def set_progress(enabled: bool) -> None:
    """Turn every tadq progress bar of this process on or off (``tadq --quiet``): a caller's ``progress=False``
    hides one call's bars, this hides all of them, bars with no switch of their own included, and the loading bars
    of diffusers and transformers (put back as they were when bars are turned on again)."""
    global _enabled
    _enabled = bool(enabled)
    _set_library_bars(_enabled)


def progress_enabled() -> bool:
    """Whether ``set_progress`` lets bars draw (the default)."""
    return _enabled


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    from tqdm.autonotebook import tqdm as chosen

    return chosen.__module__ != "tqdm.std"


def progress_bar(iterable: Iterable | None = None, **options: Any) -> tqdm:
    """``tqdm(iterable, **options)``, with ``mininterval`` (and ``maxinterval``, tqdm's forced redraw)
    ``NON_TERMINAL_INTERVAL_S`` when its stream (``file``, default stderr) is not a terminal, and ``leave=False``
    when another bar is open (an outer bar owns the line; tqdm drops disabled and closed bars from the open ones);
    disabled whatever the caller says while ``set_progress(False)`` holds."""
    if not _enabled:
        options["disable"] = True
    options.setdefault("leave", not getattr(tqdm, "_instances", ()))
    stream = options.get("file") or sys.stderr
    if ("mininterval" not in options and "TQDM_MININTERVAL" not in os.environ and not _is_terminal(stream)
            and not _in_notebook()):
        options["mininterval"] = NON_TERMINAL_INTERVAL_S
        options.setdefault("maxinterval", NON_TERMINAL_INTERVAL_S)
    return tqdm(iterable, **options)


def show_next(bar: tqdm, text: str) -> None:
    """Name the work a bar starts next (a unit, a candidate) in its postfix, redrawn now if the bar is due a redraw
    (on a terminal: nearly always; on a log: every ``NON_TERMINAL_INTERVAL_S`` seconds), else at its next one."""
    bar.set_postfix_str(text, refresh=False)
    if not bar.disable and bar._time() - bar.last_print_t >= bar.mininterval:
        bar.refresh()
        bar.last_print_t = bar._time()


def bars_cleared() -> AbstractContextManager:
    """Around a write to stderr (a log record): the bars drawn there are cleared first and redrawn after, so the
    line starts on a line of its own instead of after a bar's text (tqdm's ``external_write_mode``)."""
    return tqdm.external_write_mode(file=sys.stderr)


def close_bars() -> None:
    """Close every bar still open: an interrupted loop's stays open (its generator lives on in the traceback) and
    would otherwise be drawn again, at exit, below whatever is printed last."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
