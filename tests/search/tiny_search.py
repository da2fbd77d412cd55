"""What the recipe-search tests share: a 4-step DDIM sampler, a tiny calibration / reconstruction / fit budget, and
one search run on the tiny UNet under a budget every candidate fits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq.config import CalibrationConfig, ReconstructionConfig
from tadq.sampling import SamplerConfig
from tadq.search import Budget, SearchSpace, run_search
from tadq.search.report import write_report

SAMPLER = SamplerConfig(kind="ddim", num_steps=4, eta=0.0)


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def tiny_space(**fields: Any) -> SearchSpace:
    """A search space with the tests' tiny build settings; ``fields`` (presets, bases, stacks...) override them."""
    settings = dict(
        sampler=SAMPLER,
        calibration=CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=4, samples_per_step=8,
                                      seed=0, batch_size=8),
        reconstruction=ReconstructionConfig(weight_iters=2, activation_iters=2, batch_size=8),
        fit_trajectories=4, selection_samples=4,
        fp_layers=("none",),  # names without the -fp_ suffix; the floating-point layers axis has its own tests
    )
    return SearchSpace(**(settings | fields))


def run_tiny_search(space: SearchSpace, out: Path) -> dict[str, Any]:
    """One search of ``space`` on a fresh tiny UNet under a budget everything fits, with its report written."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, scheduler = build_tiny_unet(), tiny_scheduler()
    result = run_search(model, scheduler, space, Budget("gbitops", 1e6, "test"), out, heldout_trajectories=4,
                        progress=False)
    write_report(result, out)
    return {"model": model, "space": space, "out": out, "result": result}
