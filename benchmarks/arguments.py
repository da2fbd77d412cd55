"""argparse types the benchmark scripts share, so a bad value is refused when the flags are parsed: before any model
is loaded, calibrated, quantized or sampled (``--samples 0`` used to surface as a library traceback after minutes of
calibration and FP sampling). Light on purpose: no torch or tadq import at module level, so ``--help`` stays fast."""

from __future__ import annotations

import argparse


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def count(text: str) -> int:
    """A count that must be at least 1 (samples, steps, calls, batch sizes, threads where 0 has no meaning)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


CALIBRATION_SEED = 0
"""The calibration noise seed of the benchmarks that calibrate (``CalibrationConfig``'s default, ``tadq run``'s
``--calib-seed``); their evaluation seed must differ from it."""


def evaluation_seed(text: str) -> int:
    """An evaluation noise seed of a script that calibrates with seed ``CALIBRATION_SEED``: a whole number of at
    least 0 that is not the calibration seed (refused as ``tadq run --seed`` refuses its ``--calib-seed``): samples
    from it would start from the noise, and draw the labels, the model was calibrated on."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    if value == CALIBRATION_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is the calibration seed: the evaluation samples would start from "
                                         "the noise (and labels) the model was calibrated on; give another (tadq "
                                         "run's is 1000)")
    return value


def count_or_zero(text: str) -> int:
    """A count where 0 is meaningful (``--threads 0``: torch's default; no iterations; no per-kernel listing)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def preset_name(text: str) -> str:
    """One tadq preset name (W8A8, W4A8, ...), checked against ``tadq.quant.qscheme.PRESETS``; returned as given."""
    from tadq.quant.qscheme import preset_key

    try:
        preset_key(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def preset_names(text: str) -> str:
    """A comma-separated list of tadq preset names, each checked (``preset_name``); returned as given."""
    names = [part for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no preset")
    for name in names:
        preset_name(name)
    return text


def model_name(text: str) -> str:
    """A shipped model's name (digits, t2i, photos, dit) or a folder that exists, as ``tadq run --model`` takes it;
    returned as given. A typo is refused while parsing, with the names to choose from."""
    from tadq.zoo.paths import SHIPPED_MODELS, resolve_model_path

    if not resolve_model_path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) nor a "
                                         "model folder")
    return text


def _numbers(text: str, kind: type, what: str) -> list:
    values = []
    for part in (part.strip() for part in text.split(",")):
        if not part:
            continue
        try:
            values.append(kind(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not {what}") from None
    return values


def float_list(text: str) -> list[float]:
    """A comma-separated list of numbers (empty entries skipped), as floats."""
    return _numbers(text, float, "a number")


def int_list(text: str) -> list[int]:
    """A comma-separated list of whole numbers (empty entries skipped)."""
    return _numbers(text, int, "a whole number")


def count_list(text: str) -> list[int]:
    """A comma-separated list of counts, each at least 1 (batch sizes); at least one."""
    values = int_list(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers of at least 1, comma-separated")
    return values


OUTPUT_KIND = "benchmark"
"""The ``tadq.fsguard`` marker kind of a benchmark script's ``--out`` folder."""


def add_force_foreign_flag(parser: argparse.ArgumentParser, what: str = "folder") -> None:
    """``--force-foreign``: write into an ``--out`` folder (or over an ``--out`` file) tadq did not write (the CLI's
    flag of the same name)."""
    if what == "file":
        text = "replace an --out file tadq did not write (refused by default: a user's file is never overwritten)"
    else:
        text = ("write into an --out folder tadq did not write (refused by default: nothing there that tadq did not "
                "write is overwritten)")
    parser.add_argument("--force-foreign", action="store_true", help=text)


def _earlier_report(path) -> bool:
    """A report these scripts wrote before they recorded tadq's version: a JSON object whose ``command`` runs one
    of them."""
    import json

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, UnicodeDecodeError):
        return False
    return isinstance(document, dict) and str(document.get("command", "")).startswith("python benchmarks/")


def output_file(out, *, force_foreign: bool = False, what: str = "--out"):
    """``out`` as a ``Path``, checked before any work as the CLI checks its output files
    (``tadq.fsguard.check_output_file``): a folder, a path without ``.json`` or a file tadq did not write (a user's
    notes, another tool's JSON) is refused with exit code 2 unless ``force_foreign``; a report tadq wrote (it records
    tadq's version, ``write_report``) is replaced. The scripts overwrote whatever the path held."""
    import sys
    from pathlib import Path

    from tadq.fsguard import check_output_file

    out = Path(out)
    try:
        check_output_file(out, what=what, suffixes=(".json",),
                          force_foreign=force_foreign or (out.is_file() and _earlier_report(out)))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    return out


def write_report(document: dict, out) -> None:
    """``document`` with tadq's versions (what makes the file recognisable as tadq's, for a rerun to replace) as
    indented strict JSON at ``out`` (checked by ``output_file``; a NaN, such as the held-out score of a correction
    with nothing to choose, is written ``null`` as in tadq's own reports), through a temp file and a rename: an
    interrupted write leaves the earlier report whole."""
    from pathlib import Path

    from tadq.report.tables import dumps_json
    from tadq.utils import atomic_write_text, library_versions

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dumps_json({**document, "versions": document.get("versions", library_versions())}), out)


def output_folder(out, *, force_foreign: bool = False, what: str = "--out"):
    """``out`` as a ``Path``, checked as the CLI checks its outputs (``tadq.fsguard.check_output_dir``), created and
    marked, before any work: a folder tadq did not write (a user's, an input model's, one inside an artefact) or one
    of another kind (an artefact, a ``tadq run`` folder) is refused with exit code 2 instead of having results
    written into it; a benchmark's own earlier folder is filled again (its results replaced, as before)."""
    import sys
    from pathlib import Path

    from tadq.fsguard import check_output_dir, mark_output

    out = Path(out)
    try:
        check_output_dir(out, kind=OUTPUT_KIND, what=what, resume=True, force_foreign=force_foreign)
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, OUTPUT_KIND)  # so a rerun may fill it again
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    return out


def seed_apart_from(evaluation: int, flag: str):
    """An argparse type for a calibration seed of a script that evaluates from seed ``evaluation``: a whole number in
    [0, 2**32 - 1] that is not ``evaluation`` (noise is drawn per (seed, index), so only an equal seed shares the
    evaluation noise; refused as ``tadq run`` refuses ``--calib-seed`` equal to ``--seed``)."""

    def parse(text: str) -> int:
        value = _whole_number(text)
        if not 0 <= value <= 2**32 - 1:
            raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 2**32 - 1]")
        if value == evaluation:
            raise argparse.ArgumentTypeError(f"{flag} {text} is the evaluation seed: the model would be calibrated on "
                                             "the noise it is scored on; give another")
        return value

    return parse
