"""``RunConfig``'s checks of its counts and seeds, importable without torch: `tadq run` and `tadq bench` refuse a
bad flag with them before they import the library."""

from __future__ import annotations

from tadq.names import check_seed

__all__ = ["RUN_FIELDS", "RUN_FLAGS", "check_run_numbers"]

# how ``check_run_numbers`` names its inputs: RunConfig's fields when called from Python, the flags the user typed
# when `tadq run`/`tadq bench` check them first (they read "num_samples must be >= 2" for --num-samples 1)
RUN_FIELDS: dict[str, str] = {"num_samples": "num_samples", "batch_size": "batch_size", "eval_seed": "eval_seed",
                              "calibration_seed": "calibration.seed"}
RUN_FLAGS: dict[str, str] = {"num_samples": "--num-samples", "batch_size": "--batch-size", "eval_seed": "--seed",
                             "calibration_seed": "--calib-seed"}


def check_run_numbers(*, num_samples: int, batch_size: int, eval_seed: int, calibration_seed: int,
                      evaluation_prompts: tuple[str, ...] = (), names: dict[str, str] = RUN_FIELDS) -> None:
    """RunConfig's checks of its counts and seeds, each input named by ``names`` (``RUN_FIELDS`` or ``RUN_FLAGS``):
    at least 2 samples (FD needs two), at least as many as evaluation prompts, a batch of at least 1 (sampling
    refused it only after calibration), seeds in range and the calibration seed apart from the evaluation one."""
    samples = names["num_samples"]
    if num_samples < 2:
        raise ValueError(f"{samples} must be >= 2, got {num_samples}")
    if num_samples < len(evaluation_prompts):  # as tadq sample refuses it: they were dropped silently
        raise ValueError(f"{samples} {num_samples} for {len(evaluation_prompts)} evaluation prompts: sample i gets "
                         f"prompt i mod the count, so {evaluation_prompts[num_samples]!r} and any after it would "
                         f"never be evaluated; give {samples} {len(evaluation_prompts)} or more, or fewer prompts")
    if batch_size < 1:
        raise ValueError(f"{names['batch_size']} must be >= 1, got {batch_size}")
    check_seed(names["eval_seed"], eval_seed)
    check_seed(names["calibration_seed"], calibration_seed)
    if calibration_seed == eval_seed:
        raise ValueError(f"{names['calibration_seed']} must differ from {names['eval_seed']}: a fit scored on its "
                         "own noise proves nothing")
