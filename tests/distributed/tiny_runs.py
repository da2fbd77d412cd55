"""Helpers for the sharded-sampling tests: tiny saved models, the run flags, in-process and torchrun launches.

Everything is small on purpose (8x8 images, 3 DDIM steps, 10 samples in 5 chunks of 2) so the multi-process tests,
which pay ~5 s of interpreter start-up per launch, stay fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from diffusers import DDPMPipeline, DDPMScheduler
from tests.conftest import build_tiny_unet
from typer.testing import CliRunner

from tadq.cli.app import app

NUM_SAMPLES = 10
STEPS = 3
BATCH = 2
SEED = 7
RUN_FLAGS = ["--num-samples", str(NUM_SAMPLES), "--steps", str(STEPS), "--batch-size", str(BATCH), "--seed",
             str(SEED), "--threads", "1", "--record-trajectory"]


@dataclass(frozen=True)
class TinySetup:
    """Saved candidate and reference models, and their single-process runs (CLI, with metrics)."""

    candidate_dir: Path
    reference_dir: Path
    reference_run: Path
    candidate_run: Path


def save_tiny_model(path: Path, seed: int) -> Path:
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=build_tiny_unet(seed), scheduler=scheduler).save_pretrained(path)
    return path


def run_cli(args: list[str]) -> str:
    """``tadq ARGS`` in this process (one rank); returns the output, fails the test on a non-zero exit."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc-per-node N ARGS`` (gloo on this CPU machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
