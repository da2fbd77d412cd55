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
