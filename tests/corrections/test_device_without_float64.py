"""Corrections on a device without float64 (MPS): their tables are float64 by design (saved so), and the fits
accumulate in float64. MPS refuses every float64 tensor, so ``tadq.load(dir, device="mps")`` with corrections and
fitting them there raised. The tables now stay float64 on the CPU there, and the fits follow ``wide_dtype``
(float32 on MPS). No MPS here: the meta device stands in for it, or the rule is switched to float32 on the CPU."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from tests.dtype_probe import DtypeRecorder

from tadq.corrections import TACConfig, TCECConfig
from tadq.corrections.scaling import fit_channel_affine, fit_through_coefficient
from tadq.corrections.sequential import final_state_score
from tadq.corrections.tcec.propagation import step_coefficients
from tadq.registry import correction_for
from tadq.sampling import SamplerConfig, SamplingPlan

EPS32 = torch.finfo(torch.float32).eps


def test_tables_stay_float64_on_the_cpu_when_the_device_has_no_float64(monkeypatch):
    """``.to(device)`` moved the float64 tables and settings there as float64, which MPS refuses (load with
    device="mps" raised); there they stay on the CPU, every other buffer moves, and the state's order is kept."""
    monkeypatch.setattr("tadq.corrections.base.table_device",
                        lambda device: torch.device("cpu") if torch.device(device).type == "meta" else device)
    correction = correction_for(TCECConfig())
    correction.k, correction.b = torch.rand(3, 2, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64)
    correction.register_buffer("probe", torch.zeros(2))  # a float32 buffer: moves as before
    before = {name: value.clone() for name, value in correction.state_dict().items() if torch.is_tensor(value)}
    correction.to("meta")
    after = {name: value for name, value in correction.state_dict().items() if torch.is_tensor(value)}
    assert list(after) == list(before)
    assert correction.probe.is_meta
    for name in ("k", "b", "mix", "damping", "strength", "start"):
        table = getattr(correction, name)
        assert table.device.type == "cpu" and table.dtype == torch.float64 and torch.equal(table, before[name])


def _float32_rule(monkeypatch) -> None:
    for module in ("tadq.corrections.scaling", "tadq.corrections.tac.correction", "tadq.corrections.sequential",
                   "tadq.corrections.tcec.propagation"):
        monkeypatch.setattr(f"{module}.wide_dtype", lambda device: torch.float32)


@pytest.mark.parametrize("offset", [False, True])
def test_fits_follow_the_wide_dtype(monkeypatch, offset):
    """The affine fits, TAC's input bias, TCEC's clip-aware coefficients and the selection score made float64
    tensors of the device's states (``.double()``). With the rule switched to float32 none is made (but the
    float64 table row the fit is written into) and the fits agree with float64 to accumulation length × ε."""
    torch.manual_seed(0)
    estimate, target = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)
    estimate = estimate + 0.5 * target  # correlated: a well-posed fit
    coefficient = torch.rand(16, 3, 4, 4) + 0.5
    steps = SamplingPlan.build(DDIMScheduler(clip_sample=True, clip_sample_range=1.0), SamplerConfig("ddim", 4)).steps
    tac = correction_for(TACConfig(ibc_resolution="channel"))
    tac.reset_tables(steps, (3, 4, 4))

    def run():
        affine = fit_channel_affine(estimate, target, relative_weight=0.5, offset=offset)
        through = fit_through_coefficient(estimate, coefficient, target, offset=offset)
        a, b = step_coefficients(steps[0], 3 * target, estimate)
        tac.fit_input_row(0, estimate, target)
        return (affine.scale, affine.offset, through.scale, through.offset, a, b, tac.input_bias[0].clone(),
                torch.tensor(final_state_score(estimate, target, "log_mse")))

    expected = run()
    _float32_rule(monkeypatch)
    with DtypeRecorder() as recorder:
        got = run()
    table_write = {"aten.select.int", "aten.copy_.default", "aten.clone.default"}  # the float64 row of tac's table
    assert recorder.float64_ops() <= table_write
    length = estimate.numel() // estimate.shape[1]  # the values one channel's sums add up
    for value, reference in zip(got, expected, strict=True):
        tolerance = length * EPS32 * (1 + float(reference.abs().max()))
        assert torch.allclose(value.double(), reference.double(), rtol=0.0, atol=tolerance)


def test_settings_read_at_every_step_stay_on_the_cpu():
    """TCEC's a, κ, strength and start and PTQD's k and σ_q are read as Python floats at every step: moved with
    the network to a GPU, each read waited for the queued work (a device sync, several per step). They stay on the
    CPU (the meta device stands in for the GPU: a read there fails); the tables that act on ε move."""
    from tadq.corrections import PTQDConfig

    tcec, ptqd = correction_for(TCECConfig()), correction_for(PTQDConfig())
    tcec.k = torch.rand(3, 2, dtype=torch.float64)
    ptqd.k, ptqd.mu, ptqd.sigma_q = (torch.rand(3, dtype=torch.float64), torch.rand(3, 2, dtype=torch.float64),
                                     torch.rand(3, dtype=torch.float64))
    applied = ptqd.k_applied
    tcec.to("meta")
    ptqd.to("meta")
    assert tcec.k.is_meta and ptqd.mu.is_meta
    for correction in (tcec, ptqd):
        for name in correction.host_tables:
            assert getattr(correction, name).device.type == "cpu", name
    assert float(tcec.mix) == TCECConfig().mix and tcec.first_step == 0
    assert torch.equal(ptqd.k_applied, applied)


def test_fitted_tables_are_placed_beside_the_network(monkeypatch):
    """``tadq.quantize(..., device="cuda")`` with corrections left the fitted tables on the CPU (``tadq.load`` puts
    them on the device): every step copied a row of each to the GPU. They are moved beside the network after the
    fit (the meta device stands in for the GPU; the fit itself is faked, a meta network computes nothing); the
    per-step settings stay on the CPU."""
    from diffusers import DDPMScheduler
    from tests.conftest import build_tiny_unet

    from tadq import api
    from tadq.config import QuantConfig
    from tadq.corrections.attach import fit_corrections
    from tadq.corrections.base import TableKey

    fp, scheduler = build_tiny_unet(), DDPMScheduler(num_train_timesteps=1000)
    on_meta = api.build_quantized_structure(fp, QuantConfig.from_preset("W4A8")).to("meta")  # no calibration needed
    sampler = SamplerConfig("ddim", 3)

    def fake_fit(stack, ctx, start=0):
        for member in tuple(stack)[start:]:
            member.k = torch.rand(3, 1, dtype=torch.float64)
            member.b = torch.zeros(3, 1, dtype=torch.float64)
            member.table_key = TableKey.from_steps(ctx.plan.steps, ctx.bits)
        return stack

    monkeypatch.setattr("tadq.corrections.attach.fit_stack", fake_fit)
    corrected = fit_corrections(on_meta, fp, scheduler, sampler, [TCECConfig()], progress=False)
    tcec = corrected.corrections[-1]
    assert tcec.k.is_meta and tcec.b.is_meta and tcec.k.dtype == torch.float64
    assert all(getattr(tcec, name).device.type == "cpu" for name in tcec.host_tables)
