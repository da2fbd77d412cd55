"""Two gloo processes under torchrun give the same files and metrics as one, and a killed run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.distributed._interrupted_worker import EXIT_CODE, run_interrupted
from tests.distributed.tiny_runs import BATCH, NUM_SAMPLES, RUN_FLAGS, SEED, STEPS, TinySetup, run_cli, torchrun

from tadq.distributed import ShardedRun
from tadq.distributed.store import _read_chunk_file as load_chunk_file
from tadq.safefiles import load_checked


def load_samples(path):
    """samples.safetensors as one dict: its tensors and its JSON metadata."""
    tensors, meta = load_checked(path, "samples")
    return {**meta, **tensors}


def _chunk_payloads(run_dir: Path) -> dict[str, dict]:
    return {path.name: load_chunk_file(path) for path in sorted((run_dir / "chunks").glob("*.safetensors"))}


def _assert_same_run(run_dir: Path, expected_dir: Path) -> None:
    got, expected = _chunk_payloads(run_dir), _chunk_payloads(expected_dir)
    assert sorted(got) == sorted(expected)
    for name, payload in expected.items():
        assert payload["key"] == got[name]["key"]
        assert torch.equal(payload["images"], got[name]["images"]), name
        assert torch.equal(payload["states"], got[name]["states"]), name
    samples = load_samples(run_dir / "samples.safetensors")["images"]
    assert torch.equal(samples, load_samples(expected_dir / "samples.safetensors")["images"])


@pytest.mark.slow  # ≈ 25 s (two processes start torch and gloo); the sharding tests keep the single-process path
def test_two_gloo_processes_match_one_process(tiny_setup: TinySetup, tmp_path: Path) -> None:
    out = tmp_path / "two-ranks"
    result = torchrun(["-m", "tadq.cli.app", "sample-sharded", str(tiny_setup.candidate_dir), *RUN_FLAGS,
                       "--out-dir", str(out), "--reference-dir", str(tiny_setup.reference_run)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((out / "manifest.json").read_text())["settings"]["world_size"] == 2
    _assert_same_run(out, tiny_setup.candidate_run)
    two = json.loads((out / "metrics.json").read_text())["metrics"]
    one = json.loads((tiny_setup.candidate_run / "metrics.json").read_text())["metrics"]
    assert two == one  # exact: per-sample values are gathered in chunk order, never summed in rank order
    assert one["psnr"] is not None and len(one["per_step_mse"]) == STEPS + 1


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_setup: TinySetup, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    settings = {"num_samples": NUM_SAMPLES, "steps": STEPS, "batch_size": BATCH, "seed": SEED}
    error = run_interrupted(tiny_setup.candidate_dir, out, settings)
    assert error is not None and error.exit_code == EXIT_CODE  # rank 1 died; rank 0 was torn down
    survivors = {path.name: path.stat() for path in (out / "chunks").glob("*.safetensors")}
    # rank 1 samples chunks 1 and 3 (round-robin) and dies right after saving chunk 1
    assert "0000002-0000004.safetensors" in survivors and "0000006-0000008.safetensors" not in survivors
    assert not json.loads((out / "manifest.json").read_text())["complete"]

    output = run_cli(["sample-sharded", str(tiny_setup.candidate_dir), *RUN_FLAGS, "--out-dir", str(out),
                      "--no-metrics"])  # resumed by one process: the world size may change between attempts
    assert f"{len(survivors)} chunks reused" in output
    for name, before in survivors.items():  # the chunks already on disk were not recomputed (nor rewritten)
        after = (out / "chunks" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name
    _assert_same_run(out, tiny_setup.candidate_run)
    assert ShardedRun.open(out).num_samples == NUM_SAMPLES
