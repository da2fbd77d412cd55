"""The conditioning seam: per-sample conditions from (seed, index), guidance in the walker, and its refusals."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import DDPMScheduler

from tadq.sampling import (
    ClassLabels,
    Conditioning,
    ConditioningList,
    IdentityHooks,
    RandomClassLabels,
    SamplerConfig,
    SamplingPlan,
    conditions_for,
    sample,
)

SHAPE = (1, 4, 4)
SAMPLER = SamplerConfig("ddim", num_steps=4, eta=0.5)


def label_denoiser(x: torch.Tensor, t: torch.Tensor, cond: Conditioning | None) -> torch.Tensor:
    """ε = 0.1 x + 0.05 (label + 1): exact per sample, so batching and guidance are checked to the bit."""
    return 0.1 * x + 0.05 * (cond.class_labels.float() + 1).view(-1, 1, 1, 1)


LABELS = RandomClassLabels(3, null_class=3)


def _run(guidance: float = 1.0, conditions=LABELS, **kwargs):
    plan = SamplingPlan.build(DDPMScheduler(), SAMPLER, guidance)
    options = {"num_samples": 6, "seed": 4, "sample_shape": SHAPE, "progress": False, "conditions": conditions}
    return sample(label_denoiser, plan, **(options | kwargs))


def test_random_labels_depend_on_seed_and_index_only() -> None:
    source = RandomClassLabels(10, null_class=10)
    everything = conditions_for(source, 7, range(12))
    parts = [conditions_for(source, 7, chunk) for chunk in ([0, 1, 2, 3, 4], [5, 6], range(7, 12))]
    assert torch.equal(Conditioning.cat(parts).class_labels, everything.class_labels)
    assert torch.equal(conditions_for(source, 7, [9, 2]).class_labels, everything.class_labels[[9, 2]])
    assert not torch.equal(conditions_for(source, 8, range(12)).class_labels, everything.class_labels)
    assert torch.equal(everything.unconditional.class_labels, torch.full((12,), 10))
    assert int(everything.class_labels.max()) < 10


def test_explicit_lists_and_rows() -> None:
    labels = ClassLabels((2, 0, 1), null_class=5)
    assert conditions_for(labels, 0, [2, 0]).class_labels.tolist() == [1, 2]
    with pytest.raises(IndexError, match="holds 3"):
        conditions_for(labels, 0, [3])
    rows = Conditioning(encoder_hidden_states=torch.randn(3, 2, 5), attention_mask=torch.ones(3, 2),
                        added_cond_kwargs={"time_ids": torch.arange(3.0).view(3, 1)},
                        unconditional=Conditioning(encoder_hidden_states=torch.zeros(3, 2, 5),
                                                   attention_mask=torch.ones(3, 2),
                                                   added_cond_kwargs={"time_ids": torch.zeros(3, 1)}))
    picked = conditions_for(ConditioningList(rows, "prompts"), 0, [2, 1])
    assert torch.equal(picked.encoder_hidden_states, rows.encoder_hidden_states[[2, 1]])
    assert picked.added_cond_kwargs["time_ids"].tolist() == [[2.0], [1.0]]
    batch = picked.guidance_batch()
    assert batch.batch_size == 4 and batch.unconditional is None
    assert torch.equal(batch.encoder_hidden_states[:2], torch.zeros(2, 2, 5))
    restored = Conditioning.from_tensors(rows.to_tensors())
    assert torch.equal(restored.added_cond_kwargs["time_ids"], rows.added_cond_kwargs["time_ids"])
    assert torch.equal(restored.unconditional.encoder_hidden_states, rows.unconditional.encoder_hidden_states)


def test_bad_conditions_are_refused() -> None:
    with pytest.raises(ValueError, match="also a real label"):
        RandomClassLabels(4, null_class=2)
    with pytest.raises(ValueError, match="one row per sample"):
        Conditioning(class_labels=torch.zeros(3, dtype=torch.long), encoder_hidden_states=torch.zeros(2, 1, 1))


def test_samples_do_not_depend_on_batching_or_shards() -> None:
    reference = _run(batch_size=6, num_samples=6).images
    assert torch.equal(_run(batch_size=2).images, reference)
    assert torch.equal(_run(num_samples=None, indices=[4, 1], batch_size=2).images, reference[[4, 1]])


def test_guidance_combines_both_branches_of_one_call() -> None:
    calls: list[int] = []

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return label_denoiser(x, t, cond)

    w = 3.0
    plan = SamplingPlan.build(DDPMScheduler(), SAMPLER, w)
    result = sample(counting, plan, num_samples=2, seed=4, sample_shape=SHAPE, progress=False,
                    conditions=ClassLabels((0, 2), null_class=3), record_trajectory=True)
    assert calls == [4] * SAMPLER.num_steps  # [uncond | cond] in one call per step
    x = result.trajectory.model_inputs[0]
    cond_eps = 0.1 * x + 0.05 * torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1)
    uncond_eps = 0.1 * x + 0.05 * 4.0
    assert torch.equal(result.trajectory.eps[0], uncond_eps + w * (cond_eps - uncond_eps))
    assert result.guidance_scale == w and all(step.guidance_scale == w for step in plan.steps)


def test_guidance_one_is_the_conditional_model_alone() -> None:
    conditional = _run(1.0).images
    calls = []
    plan = SamplingPlan.build(DDPMScheduler(), SAMPLER)
    sample(lambda x, t, cond: calls.append(cond.class_labels.clone()) or label_denoiser(x, t, cond), plan,
           num_samples=6, seed=4, sample_shape=SHAPE, progress=False, conditions=RandomClassLabels(3, null_class=3))
    assert all(int(labels.max()) < 3 for labels in calls)  # never the null class
    assert not torch.equal(conditional, _run(2.0).images)


def test_guidance_without_an_unconditional_branch_is_refused() -> None:
    with pytest.raises(ValueError, match="unconditional branch"):
        _run(2.0, conditions=RandomClassLabels(3))
    with pytest.raises(ValueError, match="no conditions"):
        _run(2.0, conditions=None)


class BranchWatcher(IdentityHooks):
    wants_guidance_branches = True

    def __init__(self) -> None:
        self.seen = []

    def after_model(self, eps, x, step):
        self.seen.append((eps, step.branches))
        return eps


class GuidedOnly(IdentityHooks):
    def __init__(self) -> None:
        self.branches = []

    def after_model(self, eps, x, step):
        self.branches.append(step.branches)
        return eps


def test_hooks_see_the_guided_eps_and_only_askers_get_the_branches() -> None:
    watcher, plain = BranchWatcher(), GuidedOnly()
    result = _run(2.0, hooks=[plain, watcher], record_trajectory=True, batch_size=6)
    assert all(branches is None for branches in plain.branches)
    for index, (eps, branches) in enumerate(watcher.seen):
        assert torch.equal(eps, result.trajectory.eps[index])
        guided = branches.unconditional + 2.0 * (branches.conditional - branches.unconditional)
        torch.testing.assert_close(guided, eps, rtol=0, atol=0)


def test_condition_source_keys_tell_different_lists_apart() -> None:
    rows = Conditioning(encoder_hidden_states=torch.zeros(2, 1, 3))
    changed = Conditioning(encoder_hidden_states=torch.ones(2, 1, 3))
    assert ConditioningList(rows).key != ConditioningList(changed).key
    assert ClassLabels((1, 2)).key != ClassLabels((2, 1)).key
    assert RandomClassLabels(3, null_class=3).key != RandomClassLabels(3).key


def test_bfloat16_rows_have_a_key_that_tells_values_apart() -> None:
    """A bf16 pipeline's ``encode_prompt`` returns bf16 embeddings; the key hashed ``tensor.numpy()``, which has no
    bfloat16, so ``tadq.sample``/``tadq.quantize`` failed with numpy's TypeError before the model ran."""
    rows = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    same, other = ConditioningList(Conditioning(encoder_hidden_states=rows.clone())), ConditioningList(
        Conditioning(encoder_hidden_states=rows + 1))
    key = ConditioningList(Conditioning(encoder_hidden_states=rows)).key
    assert key == same.key and key != other.key
    # the hashed bytes are the values' own: a float32 list keeps the key it had (calibration caches stay valid)
    plain = Conditioning(encoder_hidden_states=torch.arange(6, dtype=torch.float32).reshape(2, 1, 3))
    digest = hashlib.sha256()
    for name, value in sorted(plain.to_tensors().items()):
        digest.update(name.encode() + value.numpy().tobytes())
    assert ConditioningList(plain).key.endswith(digest.hexdigest()[:16])


@pytest.mark.parametrize("shape", [(2, 5, 16), (2, 3, 12)])
def test_guidance_branches_of_other_shapes_are_refused_when_built(shape) -> None:
    """A negative prompt encoded to another token count or width failed inside torch.cat at the first guided call,
    without naming either branch."""
    with pytest.raises(ValueError, match=r"encoder_hidden_states.*\(3, 16\)"):
        Conditioning(encoder_hidden_states=torch.zeros(2, 3, 16),
                     unconditional=Conditioning(encoder_hidden_states=torch.zeros(shape)))


@pytest.mark.parametrize("source, refusal", [
    # a list of 4 rows for 6 samples in batches of 2 used to fail at the third batch, after two batches of work
    (ConditioningList(Conditioning(class_labels=torch.tensor([0, 1, 2, 0]))), "the condition list holds 4 rows"),
    # ClassLabels had no check_indices: 4 labels for 6 samples ran two batches (or calibration's first walks), then
    # raised an IndexError
    (ClassLabels((1, 2, 0, 1)), "ClassLabels holds 4 labels"),
])
def test_a_finite_condition_source_shorter_than_the_run_is_refused_before_the_first_call(source, refusal) -> None:
    calls = []

    def counting(x, t, cond):
        calls.append(1)
        return label_denoiser(x, t, cond)

    plan = SamplingPlan.build(DDPMScheduler(), SAMPLER, 1.0)
    with pytest.raises(ValueError, match=rf"up to index 5, but {refusal}.*at least 6"):
        sample(counting, plan, num_samples=6, seed=4, sample_shape=SHAPE, progress=False, conditions=source,
               batch_size=2)
    assert calls == []
    assert len(source) == 4
    assert sample(counting, plan, indices=[3, 1], seed=4, sample_shape=SHAPE, progress=False,
                  conditions=source).images.shape == (2, *SHAPE)  # indices within the list run
