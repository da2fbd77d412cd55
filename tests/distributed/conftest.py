"""Fixtures for sharded sampling: two tiny saved models and their single-process runs, built once per session."""

from __future__ import annotations

import pytest
import torch
from tests.distributed.tiny_runs import RUN_FLAGS, TinySetup, run_cli, save_tiny_model


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sharded")
    candidate_dir, reference_dir = save_tiny_model(root / "candidate", 0), save_tiny_model(root / "reference", 1)
    reference_run, candidate_run = root / "reference-run", root / "candidate-run"
    run_cli(["sample-sharded", str(reference_dir), *RUN_FLAGS, "--out-dir", str(reference_run), "--no-metrics"])
    run_cli(["sample-sharded", str(candidate_dir), *RUN_FLAGS, "--out-dir", str(candidate_run), "--reference-dir",
             str(reference_run)])
    return TinySetup(candidate_dir, reference_dir, reference_run, candidate_run)
