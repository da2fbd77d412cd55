"""Run a ``tadq`` command through ``tadq.cli.app.main`` (as the ``tadq`` script does), pausing at one call.

``python _paused_command.py FLAG MODULE:ATTRIBUTE ARGS...``: before the first call of ``MODULE.ATTRIBUTE`` the
process writes the file FLAG and sleeps, so the test can send it a real signal at that exact point (e.g. while a
save has its staging folder on disk). SIGINT gets Python's own handler back: a job started from a non-interactive
shell inherits it ignored.
"""

from __future__ import annotations

import importlib
import signal
import sys
import time
from pathlib import Path

PAUSE_S = 60  # far longer than any test waits: the signal, not the end of the pause, ends the command


def _pause_before(flag: Path, target: str) -> None:
    module_name, attribute = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attribute)
    paused: list[bool] = []

    def pausing(*args, **kwargs):
        if not paused:
            paused.append(True)
            flag.write_text("paused")
            time.sleep(PAUSE_S)
        return original(*args, **kwargs)

    setattr(module, attribute, pausing)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _pause_before(Path(sys.argv[1]), sys.argv[2])
    from tadq.cli.app import main

    sys.argv = ["tadq", *sys.argv[3:]]
    main()
