"""One short end-to-end run on the shipped model (the full-size run is `tadq run`, measured in
docs/results/digits.md)."""

import pytest
import torch

from tadq.config import CalibrationConfig
from tadq.experiments.run import RunConfig, run_main_job
from tadq.metrics import load_digit_classifier, predicted_labels
from tadq.models import load_pipeline_parts
from tadq.sampling import SamplerConfig


def test_shipped_model_quantized_end_to_end(tmp_path):
    sampler = SamplerConfig(kind="ddim", num_steps=10)
    config = RunConfig(presets=("W8A8", "W4A4"), methods=("naive",), num_samples=16, sampler=sampler,
                       calibration=CalibrationConfig(sampler=sampler, num_trajectories=16, num_steps_kept=5,
                                                     samples_per_step=16),
                       batch_size=16, out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"))
    rows = {row["bits"]: row for row in run_main_job(config)["rows"]}
    assert rows["W8A8"]["psnr"] > rows["W4A4"]["psnr"]
    assert rows["W8A8"]["final_mse"] < rows["W4A4"]["final_mse"]
    assert rows["W8A8"]["agreement"] >= rows["W4A4"]["agreement"]


def test_shipped_model_makes_digits_of_every_class():
    model, scheduler = load_pipeline_parts(None)
    from tadq.api import sample

    images = sample(model, scheduler, SamplerConfig(kind="ddim", num_steps=20), num_samples=100, seed=123,
                    progress=False).images
    labels = predicted_labels(images.clamp(-1, 1), load_digit_classifier())
    assert len(torch.unique(labels)) == 10


@pytest.mark.slow
def test_full_main_job_on_the_shipped_model(tmp_path):
    """The `tadq run` of docs/results/digits.md at full size (about 15-20 minutes on 2 cores): Q-Diffusion beats
    naive at 4 bits."""
    results = run_main_job(RunConfig(out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache")))
    rows = {(row["method"], row["bits"]): row for row in results["rows"]}
    for bits in ("W4A8", "W4A4"):
        assert rows[("Q-Diffusion", bits)]["psnr"] > rows[("naive PTQ", bits)]["psnr"]
