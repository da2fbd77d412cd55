"""Correction fits walk their states where and as the quantized model runs (``FitContext.of``), as ``tadq.sample``
does, and the FP reference runs where and as it is (``as_denoiser``)."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.corrections.conftest import TINY_SAMPLER

from tadq import api
from tadq.corrections import PTQDConfig, TACConfig
from tadq.corrections.attach import fit_corrections

SAMPLER = TINY_SAMPLER
N = 4


def _input_dtypes(module: torch.nn.Module) -> tuple[set[torch.dtype], torch.utils.hooks.RemovableHandle]:
    seen: set[torch.dtype] = set()
    handle = module.register_forward_pre_hook(lambda _m, args: seen.add(args[0].dtype))
    return seen, handle

@pytest.mark.parametrize("configs", [[PTQDConfig(num_samples=N)], [TACConfig(num_samples=N)]],
                         ids=["pair", "sequential"])
def test_a_float64_model_is_fitted_on_float64_states_beside_a_float32_reference(tiny_w4a8, configs):
    fp, scheduler, qmodel = tiny_w4a8
    wide = copy.deepcopy(qmodel).to(torch.float64)
    seen_q, handle_q = _input_dtypes(wide.model)
    seen_fp, handle_fp = _input_dtypes(fp)
    try:
        corrected = fit_corrections(wide, fp, scheduler, SAMPLER, configs, batch_size=N, progress=False)
    finally:
        handle_q.remove()
        handle_fp.remove()
    assert seen_q == {torch.float64}  # the states tadq.sample walks this model with
    assert seen_fp == {torch.float32}  # the reference in its own dtype
    for member in corrected.corrections:
        for name in member.table_names:
            assert torch.isfinite(getattr(member, name).double()).all(), name
    images = api.sample(corrected, scheduler, SAMPLER, num_samples=2, seed=7, progress=False).images
    assert images.dtype == torch.float64 and torch.isfinite(images).all()
