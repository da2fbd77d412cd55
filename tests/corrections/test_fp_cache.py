"""FPTrajectoryCache: sequential fits that share an FP walk give the same tables as fits that walk their own."""

from __future__ import annotations

import pytest
import torch
from tests.corrections.analytic import AnalyticDenoiser, analytic_scheduler, fit_context
from torch import nn

from tadq.corrections import CorrectionStack, FPTrajectoryCache, TACConfig, TCECConfig, fit_stack
from tadq.corrections.fp_cache import FPTrajectory
from tadq.corrections.sequential import paired_final_error
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig

SAMPLERS = [SamplerConfig(kind="ddim", num_steps=8, eta=0.0), SamplerConfig(kind="dpmsolver++", num_steps=6)]


class FPNetwork(nn.Module):
    """The analytic FP denoiser behind a parameter, so that the cache can fingerprint it."""

    def __init__(self, scheduler) -> None:
        super().__init__()
        self.analytic = AnalyticDenoiser(scheduler)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, t, cond=None):
        return self.analytic(x, t) * self.gain


class Biased:
    """ε̂ = ε_FP(x) + a state-dependent error, so TAC's tables are far from identity."""

    def __init__(self, fp) -> None:
        self.fp = fp

    def __call__(self, x, t, cond=None):
        return self.fp(x, t) * 1.1 + 0.05 * x.tanh()


def _fit(fp, scheduler, sampler, cache, configs):
    stack = CorrectionStack([correction_for(config) for config in configs])
    with torch.no_grad():
        fit_stack(stack, fit_context(fp, Biased(fp), scheduler, sampler, fp_trajectories=cache))
    return stack


def _tables(stack):
    return [{k: v.clone() for k, v in member.state_dict().items() if isinstance(v, torch.Tensor)} for member in stack]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.kind)
def test_fits_sharing_the_cache_give_the_tables_of_fits_without_it(sampler):
    scheduler = analytic_scheduler()
    fp = FPNetwork(scheduler)
    configs = [TACConfig(num_samples=12, ner_target="fp_trajectory"), TCECConfig(select=False, num_samples=12, seed=1)]
    reference = _tables(_fit(fp, scheduler, sampler, None, configs))
    cache = FPTrajectoryCache(fp)
    first = _tables(_fit(fp, scheduler, sampler, cache, configs))
    assert (cache.hits, cache.misses, len(cache)) == (0, 2, 2)  # TAC on seed 0, TCEC on seed 1: two walks kept
    second = _tables(_fit(fp, scheduler, sampler, cache, configs))
    assert (cache.hits, cache.misses) == (2, 2)  # the second stack walked no FP trajectory
    for tables in (first, second):
        for got, want in zip(tables, reference, strict=True):
            assert got.keys() == want.keys()
            for name in want:
                assert torch.equal(got[name], want[name]), name
    assert any(not torch.equal(t, torch.zeros_like(t)) and not torch.equal(t, torch.ones_like(t))
               for t in reference[0].values())  # the comparison is between real fits, not identity tables


def test_the_held_out_score_reads_the_cached_walk_and_equals_the_uncached_one():
    scheduler, sampler = analytic_scheduler(), SAMPLERS[0]
    fp = FPNetwork(scheduler)
    cache = FPTrajectoryCache(fp)
    ctx_cached = fit_context(fp, Biased(fp), scheduler, sampler, fp_trajectories=cache)
    ctx_plain = fit_context(fp, Biased(fp), scheduler, sampler)
    scores = [paired_final_error(ctx_cached, (), num_samples=8, seed=5) for _ in range(2)]
    assert cache.hits == 1 and scores[0] == scores[1] == paired_final_error(ctx_plain, (), num_samples=8, seed=5)
    paired_final_error(ctx_cached, (), num_samples=8, seed=6)  # another noise: another walk
    paired_final_error(ctx_cached, (), num_samples=4, seed=5)  # other trajectories: another walk
    assert (cache.hits, cache.misses) == (1, 3)


def test_an_in_place_change_of_the_fp_network_drops_its_trajectories():
    scheduler, sampler = analytic_scheduler(), SAMPLERS[0]
    fp = FPNetwork(scheduler)
    cache = FPTrajectoryCache(fp)
    ctx = fit_context(fp, Biased(fp), scheduler, sampler, fp_trajectories=cache)
    before = paired_final_error(ctx, (), num_samples=8, seed=5)
    with torch.no_grad():
        fp.gain.mul_(0.5)  # same storage, new version
    after = paired_final_error(ctx, (), num_samples=8, seed=5)
    assert cache.hits == 0 and cache.misses == 2
    assert after == paired_final_error(fit_context(fp, Biased(fp), scheduler, sampler), (), num_samples=8, seed=5)
    assert after != before


def test_memory_bound_and_least_recently_used_eviction():
    fp = nn.Linear(1, 1)

    def trajectory(value: float) -> FPTrajectory:
        return FPTrajectory((torch.full((4,), value),) * 2, (torch.full((4,), value),))  # 3 × 16 bytes

    cache = FPTrajectoryCache(fp, max_bytes=100)
    cache.put("a", trajectory(1.0))
    cache.put("b", trajectory(2.0))  # 96 bytes in all
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("c", trajectory(3.0))  # evicts b
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes <= 100
    small = FPTrajectoryCache(fp, max_bytes=10)
    small.put("big", trajectory(1.0))  # larger than the bound: never kept
    assert len(small) == 0


def test_a_cache_of_another_network_is_refused():
    from tadq.corrections.attach import fit_corrections

    with pytest.raises(TypeError, match="nn.Module"):
        FPTrajectoryCache(lambda x, t: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="another network"):
        fit_corrections(_quantized_stub(), nn.Linear(1, 1), None, SAMPLERS[0], [TACConfig()],
                        fp_trajectories=FPTrajectoryCache(nn.Linear(1, 1)))


def _quantized_stub():
    from tadq.denoiser import QuantizedDenoiser

    return QuantizedDenoiser.__new__(QuantizedDenoiser)


@pytest.mark.parametrize("progress", [True, False])
def test_a_fit_shows_its_progress_only_when_asked(progress, capsys):
    """A TAC fit ran 75 s without a line on the digits model; the walk's steps now have a bar (stderr), and
    ``progress=False`` keeps it quiet. The tables do not depend on it."""
    scheduler = analytic_scheduler()
    fp = FPNetwork(scheduler)
    stack = CorrectionStack([correction_for(TACConfig(num_samples=4))])
    with torch.no_grad():
        fit_stack(stack, fit_context(fp, Biased(fp), scheduler, SAMPLERS[0], progress=progress))
    assert ("fitting TACCorrection" in capsys.readouterr().err) is progress
