"""SIGTERM and SIGHUP end a ``tadq`` command the way Ctrl-C does: the stack unwinds, so its cleanup runs.

Python's default for SIGTERM (what ``kill``, ``timeout``, ``docker stop``, Slurm's ``scancel`` and CI cancellation
send) and SIGHUP (a closed terminal) ends the process at once, without running a single ``finally``: a save cut
there left its hidden staging folder (a whole artefact, ``.OUT.tmp-*``) and temp files (``.NAME.*.tmp``) beside the
outputs for good, and a cut between ``--overwrite``'s two renames left ``--out`` empty, the old artefact parked in a
hidden ``.OUT.old-*`` folder. Ctrl-C (``KeyboardInterrupt``) already cleaned up on every one of these paths; here
the other two signals raise ``SystemExit(128 + signal)`` (the shell's exit code for a killed process) instead.

On Windows, which has no SIGHUP, SIGBREAK (Ctrl-Break, a console window closed) takes its place.

A signal the parent process set to be ignored (``nohup`` ignores SIGHUP) stays ignored, and torchrun workers keep
the default: a rank blocked in a collective cannot run a Python handler, and torchrun's SIGKILL after its grace
period would then be the only way out (their chunks are atomic and a rerun deletes their temp files).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

__all__ = ["TORCHRUN_MARK", "stopped_by", "unwind_on_termination"]

TORCHRUN_MARK = "TORCHELASTIC_RUN_ID"  # set by torchrun in every worker it starts
# SIGBREAK: Windows' SIGHUP (Ctrl-Break, and a console window closed), where SIGHUP does not exist
_SIGNAL_NAMES = ("SIGTERM", "SIGHUP", "SIGBREAK")


def _termination_signals() -> tuple[int, ...]:
    return tuple(getattr(signal, name) for name in _SIGNAL_NAMES if hasattr(signal, name))


def stopped_by(code: object) -> str | None:
    """The signal a command's exit code says stopped it: "Ctrl-C" for 130 (typer's code for ``KeyboardInterrupt``),
    "SIGTERM"/"SIGHUP"/"SIGBREAK" for ``128 + signal`` as ``_unwind`` raises it; ``None`` for any other exit."""
    if code == 128 + signal.SIGINT:
        return "Ctrl-C"
    return next((signal.Signals(signum).name for signum in _termination_signals() if code == 128 + signum), None)


def _unwind(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once (one stuck in native code)
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def unwind_on_termination() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP (SIGBREAK on Windows) raise ``SystemExit(128 + signal)`` in the main
    thread; the handlers found on entry are restored on exit. Does nothing outside the main thread, in a torchrun
    worker, or for a signal whose handler is not the default."""
    installed: dict[int, object] = {}
    if os.environ.get(TORCHRUN_MARK) is None:
        for signum in _termination_signals():
            try:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    installed[signum] = signal.signal(signum, _unwind)
            except ValueError:  # not the main thread of the main interpreter: handlers cannot be set there
                break
    try:
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous)
