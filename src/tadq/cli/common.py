"""Shared CLI plumbing: logging, threads, device checks and turning library errors into clean exits."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

__all__ = ["console", "setup", "fail_cleanly", "ForceForeign", "USER_ERRORS"]

ForceForeign = Annotated[bool, typer.Option(
    "--force-foreign", help="Also write into (or with --overwrite replace) a folder tadq did not write, or one that "
                            "is, holds or lies inside the input model; without it such paths are refused.")]
# bad input, bad paths, damaged files: one line and exit code 2 (a traceback only with --verbose)
USER_ERRORS = (ValueError, TypeError, NotImplementedError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)
_state = {"verbose": False}

console = Console()
if not console.is_terminal:
    console = Console(width=160)  # logs and CI: keep the results table on one line per row


def setup(verbose: bool, threads: int, device: str, dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Logging and threads; the device and dtype resolved (``BadParameter`` naming one torch does not have)."""
    _state["verbose"] = verbose
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
    """Print a one-line error for bad input (``USER_ERRORS``) and exit with code 2; the traceback with --verbose."""
    try:
        yield
    except USER_ERRORS as error:
        if _state["verbose"]:
            console.print_exception()
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
            message = f"{Path(error.filename)}: {message}"
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from error
