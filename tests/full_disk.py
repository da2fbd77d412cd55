"""A full disk, simulated: what safetensors' ``save_file`` does when the disk fills up halfway through a file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from safetensors import SafetensorError

DISK_FULL = f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})"


def full_disk_save_file(tensors, filename, metadata=None) -> None:
    """Part of the bytes, then safetensors' own error type (not an ``OSError``), as its Rust writer raises it."""
    Path(filename).write_bytes(b"\0" * 64)
    raise SafetensorError(DISK_FULL)


def full_disk_write_text(self: Path, text: str, *args, **kwargs) -> int:
    """``Path.write_text`` on a disk that fills up halfway: half the text lands under the name, then ``ENOSPC``
    with no file name, as a full disk raises it."""
    with open(self, "w") as handle:
        handle.write(text[: len(text) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
