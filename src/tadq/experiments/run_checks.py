"""``RunConfig``'s checks of its counts, seeds and row names, importable without torch: `tadq run` and `tadq bench`
refuse a bad flag with them before they import the library."""

from __future__ import annotations

import sys

from tadq.names import check_seed

__all__ = ["RUN_FIELDS", "RUN_FLAGS", "check_run_numbers", "BUILT_IN_ROWS", "check_method_names", "known_rows",
           "BENCH_SAMPLES"]

BUILT_IN_ROWS: tuple[str, ...] = (
    "best", "naive", "qdiffusion", "ptqd", "ptqd-select", "ptqd-select-log", "quanto", "modelopt-int8",
    "modelopt-smoothquant", "modelopt-w4a8-awq", "torchao-int8-dynamic", "ibc", "ner", "tac", "tac-select", "tcec",
    "tac+tcec", "svdquant", "svdquant+tac", "svdquant+tcec", "svdquant+ptqd", "svdquant-rot", "svdquant-rot+tac",
    "svdquant-rot+tcec", "svdquant-rot+ptqd", "svdquant+tfmq", "svdquant+tfmq+tac", "svdquant-rot+tfmq",
    "svdquant-rot+tfmq+tac", "tfmq", "tfmq-model", "tfmq-cache", "tfmq-select", "tfmq-tiar", "qdiffusion+fsc",
    "qdiffusion+fsc-model", "qdiffusion+cache", "tfmq+ptqd", "tfmq+tac", "tfmq-model+tac", "tfmq+tac+tcec")
"""The rows ``tadq.experiments.rows`` registers, in registration order (``method_names()`` in a process that
registered no row of its own; a test holds the two in step): what the command line, which registers none, checks
``--methods`` against before it imports the registry (torch and diffusers)."""

BENCH_SAMPLES: dict[str, int] = {"default": 1000, "quick": 256}
"""Samples per row of each ``tadq bench`` matrix (``tadq.experiments.bench.matrix``)."""

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


def check_method_names(methods: tuple[str, ...], known: tuple[str, ...]) -> None:
    """Refuse any of ``methods`` that is not one of the ``known`` rows (``method_names()`` for ``RunConfig`` and
    ``BenchConfig``, ``BUILT_IN_ROWS`` for the command line), listing them."""
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(known)}")


def known_rows() -> tuple[str, ...]:
    """The rows a command line's ``--methods`` may name: the registry's once it is imported (rows the caller of the
    CLI registered in its process included), else ``BUILT_IN_ROWS``, known without importing it."""
    registry = sys.modules.get("tadq.experiments.rows.base")
    return BUILT_IN_ROWS if registry is None else registry.method_names()
