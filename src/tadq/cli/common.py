"""Shared CLI plumbing: logging, threads, device checks and turning library errors into clean exits."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

if TYPE_CHECKING:  # torch, diffusers and the library are imported by the commands: --help needs none of them
    import torch

    from tadq.experiments.workload import ClassLabelSetting

__all__ = ["console", "err_console", "setup", "fail_cleanly", "ForceForeign", "USER_ERRORS", "read_prompt_file",
           "require_file", "CacheDir", "CalibTrajectories", "GuidanceScale", "CalibPrompts", "EvalPrompts",
           "NegativePrompt", "Labels", "NullClass", "class_conditions_for", "default_or_count", "check_sampling_flags",
           "check_steps_fit", "check_seed_flags", "check_count_flags", "sampler_kind_flag", "hold_output", "set_quiet",
           "note", "check_reference_model", "torch_setup"]

ForceForeign = Annotated[bool, typer.Option(
    "--force-foreign", help="Also write into a folder tadq did not write, or one that is, holds or lies inside the "
                            "input model; without it such paths are refused.")]
# the calibration flags of the commands that calibrate (tadq run, bench, quantize, recipe): one help text each
CacheDir = Annotated[Path, typer.Option(help="Calibration-data cache folder.")]
CalibTrajectories = Annotated[int, typer.Option(help="FP trajectories recorded for calibration.")]
# what conditions a workload (tadq.experiments.workload.load_workload): tadq run and tadq recipe take the same
DistilledGuidance = Annotated[float | None, typer.Option(
    help="Flux only: the guidance scale its transformer embeds (FluxPipeline's guidance_scale; default: the "
         "artefact's recorded one, else 3.5). --guidance-scale stays classifier-free guidance.")]
GuidanceScale = Annotated[float | None, typer.Option(help="Classifier-free guidance of calibration, fits and "
                                                          "evaluation (conditional models; default: the model's own, "
                                                          "1 for unconditional ones).")]
CalibPrompts = Annotated[Path | None, typer.Option(help="Text file, one calibration prompt per line (text-to-image "
                                                        "folders; the shipped t2i model has its own).")]
EvalPrompts = Annotated[Path | None, typer.Option(help="Text file, one evaluation prompt per line, disjoint from the "
                                                       "calibration prompts.")]
NegativePrompt = Annotated[str, typer.Option(help="Prompt of the unconditional branch (text-to-image models).")]
Labels = Annotated[str | None, typer.Option(help="Class-conditional models: null (every sample unconditional, with "
                                                 "the null class) or random (labels from (seed, i); guidance with "
                                                 "--guidance-scale). Default: null for the shipped photos model, else "
                                                 "random.")]
NullClass = Annotated[int | None, typer.Option(help="The class-conditional model's 'no class' label (known for the "
                                                    "shipped photos model).")]
# bad input, bad paths, damaged files: one line and exit code 2 (a traceback only with --verbose)
USER_ERRORS = (ValueError, TypeError, NotImplementedError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)
# the OSErrors that are about the path the user gave or the disk under it, not a bug: also one line, exit code 2
# (a name too long for the file system used to end `tadq sample`/`verify` in a traceback from stat)
PATH_ERRNOS = frozenset({errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                         errno.EISDIR, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOENT})
_state: dict[str, Any] = {"verbose": False, "quiet": False, "threads": None}

# markup and emoji codes off: what tadq prints holds the user's paths, prompts and error messages, and rich read
# "runs/[/x]" as a closing tag (a MarkupError after the whole command had run), "[int8]" as a style (dropped from
# evaluate's table) and ":rocket:" as an emoji (another folder name); the one styled line, fail_cleanly's, asks
console = Console(markup=False, emoji=False)
if not console.is_terminal:
    console = Console(markup=False, emoji=False, width=160)  # logs and CI: the results table on one line per row
# logs, notes on the work under way and error lines go to stderr, as the progress bars do: stdout holds only a
# command's results (tables, paths written), so `tadq ... > results.txt` or a pipe gets no log lines in between
err_console = Console(stderr=True, markup=False, emoji=False)
if not err_console.is_terminal:
    err_console = Console(stderr=True, markup=False, emoji=False, width=160)


class _BarSafeHandler(RichHandler):
    """Rich's log handler, writing each record with the progress bars cleared and redrawn after it: the record was
    printed right after a bar's text ("tadq recipe:   0%|  | 0/2 [...][12/06/26 17:28:52] INFO ...")."""

    def emit(self, record: logging.LogRecord) -> None:
        from tadq.progress import bars_cleared

        with bars_cleared():
            super().emit(record)


def set_quiet(quiet: bool) -> bool:
    """``tadq --quiet``: no progress bar, no info log record or note, for the commands of this invocation (warnings
    and errors are still written to stderr). Returns the setting it replaced, for the caller to restore."""
    from tadq.progress import set_progress

    before = _state["quiet"]
    _state["quiet"] = quiet
    set_progress(not quiet)
    return before


def check_reference_model(qmodel: Any, reference: Any, given: Path | None, flag: str,
                          shipped: str = "the shipped digits DDPM") -> None:
    """Refuse an FP reference the artefact was not quantized from (``check_same_architecture``) before sampling;
    when the user named none (``given`` is None) the reference is a shipped model (``shipped``), and the refusal says
    so and names ``flag``: "pass the FP model it was quantized from" left the user of another model guessing how."""
    from tadq.provenance import check_same_architecture

    try:
        check_same_architecture(qmodel, reference)
    except ValueError as error:
        if given is not None:
            raise
        raise ValueError(f"{error} (no {flag} given, so the reference is {shipped}: pass {flag} "
                         "FP_FOLDER, the diffusers folder the artefact was quantized from)") from error


def note(text: str) -> None:
    """A note on the work under way (the sampler chosen, a compile ahead) on stderr, left out under ``--quiet``."""
    if not _state["quiet"]:
        err_console.print(text)


def setup(verbose: bool, threads: int) -> None:
    """Logging, and the flags of it and of ``torch_setup`` that need no torch (``BadParameter``): a command calls it
    first, then checks its other flags, then calls ``torch_setup``, so a typo is refused before torch is imported."""
    if verbose and _state["quiet"]:  # debug records or none: one of the two asks for the opposite of the other
        raise typer.BadParameter("--verbose and tadq --quiet contradict each other; give one of them")
    _state["verbose"] = verbose
    level = logging.DEBUG if verbose else logging.WARNING if _state["quiet"] else logging.INFO
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[_BarSafeHandler(console=err_console, show_path=False)], force=True)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if threads < 0:
        raise typer.BadParameter("--threads must be >= 0")


def torch_setup(threads: int, device: str = "cpu", dtype: str = "float32") -> tuple[torch.device, torch.dtype]:
    """Threads set, and the device and dtype resolved (``BadParameter`` naming one torch does not have): imports
    torch, so a command calls it after ``setup`` and its checks that need no model (usage errors come first). A
    dtype name torch does not have is refused before torch is imported."""
    from tadq.names import check_dtype_name

    try:
        check_dtype_name(dtype)
    except ValueError as error:
        raise typer.BadParameter(f"--device/--dtype: {error}") from error
    try:
        _set_threads(threads)
    except (ValueError, RuntimeError, OverflowError) as error:  # torch's bare "Overflow when unpacking long", a
        # traceback: setup runs before fail_cleanly
        raise typer.BadParameter(f"--threads {threads}: torch cannot use that many threads ({error}); give a count "
                                 f"such as this machine's {os.cpu_count()} cores, or 0 for torch's default"
                                 ) from error
    from tadq.device import resolve_device, resolve_dtype

    try:
        return resolve_device(device), resolve_dtype(dtype)
    except ValueError as error:
        raise typer.BadParameter(f"--device/--dtype: {error}") from error


def _set_threads(threads: int) -> None:
    """``--threads N`` sets torch's thread count; ``--threads 0`` ("torch's default") undoes what an earlier command
    of this process set, so that one command run after another in one process (the CLI invoked from Python, a
    notebook, tests) runs on the threads it would have had in a fresh process: the thread count moves float sums
    and, through them, quantized results (README, What tadq guarantees). A count the caller set with
    ``torch.set_num_threads`` after tadq's is theirs and is kept."""
    import torch

    earlier = _state["threads"]  # (count tadq set, count before it) or None
    if threads:
        before = torch.get_num_threads() if earlier is None or torch.get_num_threads() != earlier[0] else earlier[1]
        torch.set_num_threads(threads)
        _state["threads"] = (threads, before)
    elif earlier is not None:
        if torch.get_num_threads() == earlier[0]:
            torch.set_num_threads(earlier[1])
        _state["threads"] = None


@contextlib.contextmanager
def fail_cleanly() -> Iterator[None]:
    """Print a one-line error for bad input (``USER_ERRORS``) and exit with code 2; the traceback with --verbose.
    The outputs ``hold_output`` locked in the block are released when it ends, however it ends."""
    outer = _state.get("held")
    try:
        with contextlib.ExitStack() as held:
            _state["held"] = held
            yield
    except (*USER_ERRORS, OSError) as error:
        if not isinstance(error, USER_ERRORS) and error.errno not in PATH_ERRNOS:
            raise  # an OSError tadq does not know as the user's: a bug, with its traceback
        if _state["verbose"]:
            err_console.print_exception()
        message = " ".join(str(error).split()) or type(error).__name__
        if isinstance(error, OSError) and error.filename is not None and error.strerror:  # "[Errno 36] ...: '...'"
            message = f"{_shorten(str(error.filename))}: {error.strerror}"
            if error.filename2 is not None:  # a rename: both ends
                message = f"{_shorten(str(error.filename))} -> {_shorten(str(error.filename2))}: {error.strerror}"
        elif isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
            message = f"{_shorten(str(error.filename))}: {message}"
        if isinstance(error, FileNotFoundError | NotADirectoryError) and any(
                word.startswith("~") for word in message.split()):  # outputs: fsguard.check_path_shape says it
            message += " (a quoted ~ is not expanded to a home folder; write the full path)"
        err_console.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from error
    finally:
        _state["held"] = outer


def hold_output(out: Path, what: str = "--out") -> None:
    """Lock ``out`` (``tadq.fsguard.output_lock``) until the enclosing ``fail_cleanly`` block ends: a second
    command writing the same folder or file is refused, naming the pid that holds it, before its expensive work.
    Call it right after the output's own checks (``check_output_dir``/``check_output_file``)."""
    from tadq.fsguard import output_lock

    held = _state.get("held")
    if held is None:
        raise RuntimeError("hold_output is called inside a fail_cleanly block, which releases the lock")
    held.enter_context(output_lock(out, what))


def _shorten(name: str) -> str:
    """A path for a one-line message: whole, unless it is too long to read (a name past the file system's limit)."""
    return name if len(name) <= 160 else f"{name[:80]}...{name[-60:]}"


def default_or_count(flag: str, value: int) -> int | None:
    """A count flag whose -1 means "the config's default": ``None`` for -1, the count for 0 or more, a clear error
    naming the flag for anything below -1 (it used to fall back to the default silently)."""
    if value < -1:
        raise ValueError(f"{flag} must be >= 0, or -1 for the default; got {value}")
    return None if value == -1 else value


def check_sampling_flags(*, num_samples: int | None = None, batch_size: int | None = None, seed: int | None = None,
                         guidance_scale: float | None = None) -> None:
    """Refuse, by the flag's name and before any model is read, the sampling flags every command checks the same
    way: --num-samples and --batch-size >= 1 (--num-samples at most 2**32, the noise's sample indices), --seed in
    [0, 2**32 - 1], --guidance-scale finite and >= 0 (``None``: not given, or not a flag of the command). The
    library checks them again, but only after the model was loaded (minutes for a large one), and names its own
    parameter rather than the flag."""
    from tadq.names import MAX_SEED, check_seed

    for flag, count in (("--num-samples", num_samples), ("--batch-size", batch_size)):
        if count is not None and count < 1:
            raise ValueError(f"{flag} must be >= 1, got {count}")
    if num_samples is not None and num_samples > MAX_SEED + 1:  # an OverflowError traceback from the loop
        raise ValueError(f"--num-samples must be at most 2**32 (sample i's noise is drawn from (seed, i), i in "
                         f"[0, 2**32 - 1]), got {num_samples}")
    if seed is not None:
        check_seed("--seed", seed)
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"--guidance-scale must be a finite number >= 0 (1: no guidance), got {guidance_scale}")


def sampler_kind_flag(value: str | None) -> str | None:
    """The ``--sampler`` of every command, as typer's callback: case and surrounding spaces dropped, as every other
    name flag takes them (--methods, --preset, --fp-layers; `tadq bench --samplers`), or a usage error naming the
    kinds before anything is read. `tadq recipe` lower-cased it while sample, quantize and run refused ``DDIM``."""
    if value is None:
        return None
    from tadq.names import SAMPLER_KINDS

    kind = value.strip().lower()
    if kind not in SAMPLER_KINDS:
        raise typer.BadParameter(f"{value!r} is not a sampler; choose one of {', '.join(SAMPLER_KINDS)}")
    return kind


def check_seed_flags(**seeds: int | None) -> None:
    """Refuse each given seed flag (``calib_seed=...`` is ``--calib-seed``; ``None``: not given) outside
    [0, 2**32 - 1] by its flag's name: the configs refused them as ``eval_seed`` or ``CalibrationConfig.seed``."""
    from tadq.names import check_seed

    for name, value in seeds.items():
        if value is not None:
            check_seed(f"--{name.replace('_', '-')}", value)


def check_count_flags(**counts: int | None) -> None:
    """Refuse each given count flag (``calib_trajectories=...`` is ``--calib-trajectories``; ``None``: not given)
    below 1 by its flag's name: the configs refused ``--steps 0`` as "SamplerConfig.num_steps" and
    ``--calib-trajectories 0`` as "num_trajectories", names the command line does not have."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_steps_fit(source: Path | None, steps: int, flag: str = "--steps") -> None:
    """Refuse more sampler steps than the discrete schedule of the model at ``source`` (``None``: the shipped one)
    has training timesteps, from its scheduler config alone: diffusers refused them only when the sampling plan was
    built, after the model was loaded (``tadq evaluate`` had started sampling the FP model), in words naming
    ``num_inference_steps``. A flow-matching schedule is continuous and takes any count."""
    from tadq.models import load_scheduler
    from tadq.sampling import command_sampler_kind

    try:
        scheduler = load_scheduler(source)
    except (*USER_ERRORS, OSError):  # not a readable model folder: its loader says why, in the command's own words
        return
    train = scheduler.config.get("num_train_timesteps")
    if command_sampler_kind(scheduler) == "ddim" and isinstance(train, int) and steps > train:
        raise ValueError(f"{flag} {steps}: {source if source is not None else 'the shipped model'} was trained on "
                         f"{train} timesteps, so a sampler takes at most {train} steps")


def require_file(path: Path, flag: str, expected: str = "") -> None:
    """Raise unless ``path`` is a regular file, saying what it is instead: a folder, a device such as /dev/null,
    or nothing (every one of these used to read "does not exist")."""
    if path.is_file():
        return
    hint = f" ({expected})" if expected else ""
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; name a file{hint}")
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{flag} {path} is a symlink to {os.readlink(path)}, which does not exist{hint}")
    if path.exists():
        raise ValueError(f"{flag} {path} is not a regular file (a device, pipe or socket); name a file{hint}")
    raise FileNotFoundError(f"{flag} {path} does not exist{hint}")


def read_prompt_file(path: Path | None, flag: str) -> tuple[str, ...]:
    """Non-empty lines of a prompt file (UTF-8), in order; ``()`` without a file; a clear error for a missing or
    empty file."""
    if path is None:
        return ()
    require_file(path, flag, "one prompt per line")
    # utf-8-sig: a byte-order mark (Windows editors write one) would otherwise become part of the first prompt
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:  # numpy-style "'utf-8' codec can't decode byte 0xff" named neither
        raise ValueError(f"{flag} {path} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8, "
                         "one prompt per line") from error
    # lines end at "\n" only (read_text turned "\r\n" and "\r" into it): str.splitlines also splits at U+2028, form
    # feeds, NEL and the ASCII separators \x1c-\x1e, which an editor shows inside a line (text pasted from the web
    # or JSON), so one prompt became two and every later sample took another prompt than the file's line
    prompts = tuple(line.strip() for line in text.split("\n") if line.strip())
    if not prompts:
        raise ValueError(f"{flag} {path} holds no prompt (one prompt per line)")
    return prompts


def class_conditions_for(model: torch.nn.Module, source: Path, command: str, *, labels: str | None,
                         null_class: int | None, guidance_scale: float | None) -> ClassLabelSetting | None:
    """How ``tadq quantize``/``tadq sample`` condition ``model``: ``None`` for an unconditional one (which takes no
    --labels/--null-class), the labels, null class and guidance of a class-conditional one (``class_label_setting``:
    the shipped models' defaults, the architecture's null class), checked before any calibration or sampling. A
    model conditioned on other inputs (text embeddings without a pipeline's text encoder...) is refused here."""
    from tadq.registry import adapter_for

    wanted = tuple(adapter_for(model).conditioning_inputs(model))
    if not wanted:
        if labels is not None or null_class is not None:
            raise ValueError(f"--labels/--null-class/--class-label given, but {source} holds an unconditional "
                             f"{type(model).__name__}: it takes no class labels")
        return None
    if wanted != ("class_labels",):
        how = {"quantize": "as a text-to-image pipeline folder (model_index.json, its text encoder and tokenizer; "
                           "--calib-prompt)",
               "sample": "as a text-to-image pipeline folder or artefact (its text encoder and tokenizer; --prompt)"}
        for scoring in ("evaluate", "analyze"):
            how[scoring] = ("as a text-to-image pipeline artefact (its text encoder and tokenizer; --eval-prompts)")
        raise ValueError(f"{source} holds a {type(model).__name__} conditioned on {list(wanted)}: `tadq {command}` "
                         + (f"drives such a model only {how[command]}" if command in how else
                            "takes unconditional and class-conditional models; a text-to-image pipeline is "
                            "sampled by `tadq sample --prompt` and scored by `tadq evaluate --eval-prompts`"))
    from tadq.experiments.workload import class_label_setting

    return class_label_setting(source, model, guidance_scale=guidance_scale, labels=labels, null_class=null_class)
