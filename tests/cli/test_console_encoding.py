"""What ``tadq`` prints reaches a console or pipe that cannot encode every character: Windows writes a redirected
stdout in the code page (cp1252 has no "↓", "≈" or "σ"), ``LC_ALL=C`` in ASCII."""

from __future__ import annotations

import io
import sys

import pytest

from tadq.cli.app import main


def test_a_message_the_output_encoding_lacks_is_printed_not_a_traceback(tmp_path, monkeypatch):
    """rich raised ``UnicodeEncodeError`` on such a stream: the one-line error (and a results table, whose
    columns say "FD-digits ↓", after the whole run) became a traceback."""
    missing = tmp_path / "runs↓σ"
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="cp1252", errors="strict") for name in ("out", "err")}
    monkeypatch.setattr(sys, "stdout", streams["out"])
    monkeypatch.setattr(sys, "stderr", streams["err"])
    monkeypatch.setattr(sys, "argv", ["tadq", "verify", str(missing)])
    with pytest.raises(SystemExit) as exited:
        main()
    printed = b""
    for stream in streams.values():
        stream.flush()
        printed += stream.buffer.getvalue()
    assert exited.value.code == 2, printed
    assert str(tmp_path / "runs??").encode("cp1252") in printed
