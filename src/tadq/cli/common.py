"""Shared CLI plumbing: logging, threads, device checks and turning library errors into clean exits."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler

__all__ = ["console", "setup", "fail_cleanly"]

console = Console()
if not console.is_terminal:
    console = Console(width=160)  # logs and CI: keep the results table on one line per row


def setup(verbose: bool, threads: int, device: str, dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Logging and threads; the device and dtype resolved (``BadParameter`` naming one torch does not have)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)], force=True)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads < 0:
        raise typer.BadParameter("--threads must be >= 0")
    if threads:
        torch.set_num_threads(threads)
    from tadq.device import resolve_device, resolve_dtype

    try:
        return resolve_device(device), resolve_dtype(dtype)
    except ValueError as error:
        raise typer.BadParameter(f"--device/--dtype: {error}") from error


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Print a one-line error for bad input (ValueError, FileNotFoundError, TypeError) and exit with code 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, TypeError, NotImplementedError) as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(code=2) from error
