"""Sharded sampling of a class-conditional model with guidance: each chunk is what any rank would compute alone
(labels and noise come from (seed, index)), and the run key holds the conditions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq.distributed.sampling import sample_sharded
from tadq.registry import adapter_for
from tadq.sampling import RandomClassLabels, SamplerConfig, SamplingPlan, sample

SAMPLER = SamplerConfig("ddim", num_steps=3, eta=0.5)
LABELS = RandomClassLabels(3, null_class=3)


def test_chunks_equal_what_a_lone_rank_samples_and_the_key_holds_the_conditions(tmp_path):
    model, scheduler = build_tiny_unet(num_class_embeds=4), DDPMScheduler()
    options = {"num_samples": 6, "seed": 3, "batch_size": 2, "chunk_size": 2, "progress": False,
               "conditions": LABELS, "guidance_scale": 2.0}
    images = sample_sharded(model, scheduler, SAMPLER, out_dir=tmp_path / "run", **options).run.read()
    adapter = adapter_for(model)
    plan = SamplingPlan.build(scheduler, SAMPLER, 2.0)
    for start in (4, 0, 2):  # any order, any "rank"
        alone = sample(lambda x, t, cond: adapter.predict_eps(model, x, t, cond), plan, indices=[start, start + 1],
                       seed=3, sample_shape=(1, 8, 8), batch_size=2, conditions=LABELS, progress=False)
        assert torch.equal(alone.images, images[start: start + 2])
    with pytest.raises(ValueError):
        sample_sharded(model, scheduler, SAMPLER, out_dir=tmp_path / "run", **(options | {"guidance_scale": 3.0}))
