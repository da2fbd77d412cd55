"""The sampler-level correction stacks (PTQD, TAC, TCEC and stacks of them) on tiny real UNets,
across every sampler kind and with classifier-free guidance (docs/methods/composition.md, docs/sampling.md
"Corrections on each sampler", src/tadq/corrections/README.md).

For every sampler the docs support: the stack fits with finite tables, samples finite images, acts, does not make
a coarse W4A4 naive model's final-x0 error dramatically worse on the fitting noise, saves and loads to bit-identical
samples, and is refused by name, before any network forward, under another sampler, step count, eta, guidance scale
or training schedule. Unsupported combinations are refused before any expensive work; configs refuse bad values
when built, naming the field.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tests.conftest import build_tiny_sd_unet, build_tiny_unet, counting_forwards

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.corrections.attach import fit_corrections
from tadq.io import load_quantized
from tadq.sampling import Conditioning, ConditioningList, RandomClassLabels, SamplerConfig

STEPS = 4
N = 8  # fitting trajectories = evaluation samples (the fitting seed)
SEED = 1
WORSE_AT_MOST = 3.0  # "not dramatically worse": final-x0 MSE vs FP at most this many times the base's

SAMPLERS = [SamplerConfig("ddim", STEPS, eta=0.0), SamplerConfig("ddim", STEPS, eta=1.0), SamplerConfig("ddpm", STEPS),
            SamplerConfig("euler", STEPS), SamplerConfig("euler-ancestral", STEPS),
            SamplerConfig("dpmsolver++", STEPS), SamplerConfig("flow-euler", STEPS)]
# the default suite runs a deterministic, a stochastic, a multistep and a flow sampler of each test (the every-stack
# test a deterministic and a multistep one: its stochastic and flow cases are the guided test's labels-ddpm and
# labels-flow-euler defaults); the rest run with `make test-slow` (the default suite stays well under CI's 15 minutes
# on a 2-core AVX2 CPU)
EVERY_DEFAULT = {"ddim-4-eta0.0", "dpmsolver++2-4"}
SAVED_DEFAULT = {"ddim-4-eta0.0", "dpmsolver++2-4", "flow-euler-4"}
GUIDED_DEFAULT = {"labels-ddpm-4", "labels-flow-euler-4", "text-dpmsolver++2-4"}


def _split(cases: list, key, default: set[str]) -> list:
    """``cases`` as pytest params, those whose ``key`` is not in ``default`` marked slow."""
    return [case if key(case) in default else pytest.param(*(case if isinstance(case, tuple) else (case,)),
                                                            marks=pytest.mark.slow) for case in cases]


def _stacks(seed: int = SEED) -> dict[str, list]:
    tac, ptqd = TACConfig(num_samples=N, seed=seed), PTQDConfig(num_samples=N, seed=seed)
    tcec = TCECConfig(num_samples=N, seed=seed, selection_samples=N)
    return {"ptqd": [ptqd], "tac": [tac], "tcec": [tcec], "tac+tcec": [tac, tcec], "tac+tcec+ptqd": [tac, tcec, ptqd]}


def _scheduler(sampler: SamplerConfig):
    return FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler.is_flow else DDPMScheduler(num_train_timesteps=1000)


def _calibration(sampler: SamplerConfig) -> CalibrationConfig:
    return CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).square().mean())


@pytest.fixture(scope="module")
def fp_model():
    return build_tiny_unet()


_BASES: dict[str, tuple] = {}


def _base(fp_model, sampler: SamplerConfig):
    """(W4A4 naive model, scheduler, FP images, base images) on the fitting noise, one per sampler."""
    if sampler.key not in _BASES:
        scheduler = _scheduler(sampler)
        qmodel = api.quantize(fp_model, scheduler, QuantConfig.from_preset("W4A4", calibration=_calibration(sampler)),
                              progress=False)
        fp = api.sample(fp_model, scheduler, sampler, num_samples=N, seed=SEED, progress=False).images
        base = api.sample(qmodel, scheduler, sampler, num_samples=N, seed=SEED, progress=False).images
        _BASES[sampler.key] = (qmodel, scheduler, fp, base)
    return _BASES[sampler.key]


# -- every stack on every sampler -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", _split(SAMPLERS, lambda s: s.key, EVERY_DEFAULT), ids=lambda s: s.key)
def test_every_stack_fits_finite_tables_acts_and_keeps_the_error_in_bounds(fp_model, sampler):
    qmodel, scheduler, fp, base = _base(fp_model, sampler)
    base_mse = _mse(base, fp)
    for name, configs in _stacks().items():
        corrected = fit_corrections(qmodel, fp_model, scheduler, sampler, configs, batch_size=8, progress=False)
        for member in corrected.corrections:
            assert member.fitted and member.table_key.sampler_key == sampler.key, name
            for table in member.table_names:
                assert torch.isfinite(getattr(member, table).double()).all(), f"{name}: {table} not finite"
        images = api.sample(corrected, scheduler, sampler, num_samples=N, seed=SEED, progress=False).images
        assert torch.isfinite(images).all(), name
        tcec_off = name == "tcec" and float(corrected.corrections[0].strength) == 0.0  # held-out "off" is allowed
        assert tcec_off or not torch.equal(images, base), f"{name} on {sampler.key} did not change the samples"
        assert _mse(images, fp) <= WORSE_AT_MOST * base_mse, (name, _mse(images, fp), base_mse)


# -- save, load and refusals ----------------------------------------------------------------------------------------
def _others(sampler: SamplerConfig) -> dict[str, tuple[SamplerConfig, object | None]]:
    """Another sampler, step count, eta or training schedule than ``sampler`` was fitted for."""
    kinds = [SamplerConfig("ddim", STEPS), SamplerConfig("ddim", STEPS, eta=1.0), SamplerConfig("ddpm", STEPS),
             SamplerConfig("euler", STEPS), SamplerConfig("euler-ancestral", STEPS),
             SamplerConfig("dpmsolver++", STEPS), SamplerConfig("dpmsolver++", STEPS, order=1)]
    if sampler.is_flow:
        return {"steps": (dataclasses.replace(sampler, num_steps=STEPS + 1), None),
                "shift": (dataclasses.replace(sampler, shift=1.0), None),
                "uniform grid": (dataclasses.replace(sampler, flow_sigmas="uniform"), None),
                "schedule shift": (sampler, FlowMatchEulerDiscreteScheduler(shift=1.0))}
    others = {s.key: (s, None) for s in kinds if s != sampler}
    others["steps"] = (dataclasses.replace(sampler, num_steps=STEPS + 1), None)
    others["cosine betas"] = (sampler, DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"))
    others["500 train steps"] = (sampler, DDPMScheduler(num_train_timesteps=500))
    return others


@pytest.mark.parametrize("sampler", _split(SAMPLERS, lambda s: s.key, SAVED_DEFAULT), ids=lambda s: s.key)
def test_saved_stack_samples_bit_identically_and_refuses_other_grids_before_any_forward(fp_model, sampler, tmp_path):
    qmodel, scheduler, _, _ = _base(fp_model, sampler)
    corrected = fit_corrections(qmodel, fp_model, scheduler, sampler, _stacks()["tac+tcec+ptqd"], batch_size=8,
                                progress=False)
    images = api.sample(corrected, scheduler, sampler, num_samples=N, seed=SEED, progress=False).images
    corrected.save_pretrained(tmp_path / "artefact", scheduler)
    for loader in (tadq.load, load_quantized):
        loaded, loaded_scheduler = loader(tmp_path / "artefact")
        assert [m.table_key for m in loaded.corrections] == [m.table_key for m in corrected.corrections]
        again = api.sample(loaded, loaded_scheduler, sampler, num_samples=N, seed=SEED, progress=False).images
        assert torch.equal(again, images), loader.__name__
    for what, (other, other_scheduler) in _others(sampler).items():
        with counting_forwards(loaded.model) as calls, pytest.raises(ValueError, match="TACCorrection was fitted"):
            api.sample(loaded, other_scheduler or loaded_scheduler, other, num_samples=2, seed=SEED, progress=False)
        assert calls[0] == 0, f"{what}: {calls[0]} network forwards before the refusal"


@pytest.mark.parametrize("sampler, other_scheduler", [
    (SamplerConfig("ddim", STEPS), DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False)),
    (SamplerConfig("dpmsolver++", STEPS), DDPMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")),
], ids=["ddim-final-alpha", "dpmsolver-trailing"])
def test_a_schedule_that_differs_after_the_first_step_is_refused_before_any_forward(fp_model, sampler,
                                                                                     other_scheduler):
    """The schedule check reads only the current step's row, so a training schedule that agrees with the fitted one
    at step 0 (DDIM's final ᾱ_prev with set_alpha_to_one=False; DPM-Solver++'s trailing grid, equal at t = 999) is
    refused only at the first differing step, after that many quantized forwards (and a fit's worth of work in a
    long run)."""
    qmodel, scheduler, _, _ = _base(fp_model, sampler)
    corrected = fit_corrections(qmodel, fp_model, scheduler, sampler, _stacks()["tac"], batch_size=8, progress=False)
    with counting_forwards(corrected.model) as calls, pytest.raises(ValueError, match="another training schedule"):
        api.sample(corrected, other_scheduler, sampler, num_samples=2, seed=SEED, progress=False)
    assert calls[0] == 0, f"{calls[0]} network forwards before the refusal"


def test_ddpm_tables_are_refused_under_another_ddpm_variance_type(fp_model):
    """DDPM's noise is the scheduler's variance_type (SamplerConfig's docstring: DDPM's analogue of DDIM's η, which
    is keyed). Tables fitted under fixed_small (PTQD's σ_q, TAC's bias along those noisy trajectories) silently
    ran under fixed_large, giving other samples."""
    sampler = SamplerConfig("ddpm", STEPS)
    qmodel, scheduler, _, _ = _base(fp_model, sampler)
    corrected = fit_corrections(qmodel, fp_model, scheduler, sampler, _stacks()["tac+tcec+ptqd"][::2], batch_size=8,
                                progress=False)
    large = DDPMScheduler(num_train_timesteps=1000, variance_type="fixed_large")
    with pytest.raises(ValueError, match="fitted"):
        api.sample(corrected, large, sampler, num_samples=2, seed=SEED, progress=False)


# -- guidance: a class-conditional UNet2DModel and a tiny SD UNet2DConditionModel ---------------------------------
GUIDANCE = 2.0
_EMB = torch.randn(N, 5, 16, generator=torch.Generator().manual_seed(0))
TEXT = ConditioningList(Conditioning(encoder_hidden_states=_EMB,
                                     unconditional=Conditioning(encoder_hidden_states=torch.zeros_like(_EMB))))
LABELS = RandomClassLabels(3, null_class=3)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                    clip_sample=False, set_alpha_to_one=False)

GUIDED = [("labels", SamplerConfig("ddpm", STEPS)), ("labels", SamplerConfig("euler", STEPS)),
          ("labels", SamplerConfig("dpmsolver++", STEPS)), ("labels", SamplerConfig("flow-euler", STEPS)),
          ("text", SamplerConfig("ddim", STEPS, eta=1.0)), ("text", SamplerConfig("euler-ancestral", STEPS)),
          ("text", SamplerConfig("dpmsolver++", STEPS))]


@pytest.mark.parametrize("which, sampler", _split(GUIDED, lambda case: f"{case[0]}-{case[1].key}", GUIDED_DEFAULT),
                         ids=lambda v: v if isinstance(v, str) else v.key)
def test_guided_stack_fits_acts_round_trips_and_refuses_other_scales(which, sampler, tmp_path):
    if which == "labels":
        model, cond = build_tiny_unet(num_class_embeds=4), LABELS
        scheduler = _scheduler(sampler)
    else:
        model, cond = build_tiny_sd_unet(), TEXT
        scheduler = DDIMScheduler(**SD_SCHEDULER)
    recipe = tadq.Recipe.from_preset("W4A4", calibration=_calibration(sampler),
                                     deployments=(tadq.Deployment(sampler, guidance_scale=GUIDANCE),))
    qmodel = api.quantize(model, scheduler, recipe, conditions=cond, progress=False)
    # PTQD's VSC off here: under guidance at W4A4 its σ' is clamped to 0 at the large steps (vsc_report), so the
    # stochastic samples leave the FP noise by design (ptqd.md: W4A4 η = 1 loses PSNR) and MSE says nothing
    stack = [*_stacks()["tac+tcec"], PTQDConfig(num_samples=N, seed=SEED, variance=False)]
    corrected = fit_corrections(qmodel, model, scheduler, sampler, stack, batch_size=8,
                                conditions=cond, guidance_scale=GUIDANCE, progress=False)
    assert [m.table_key.guidance_scale for m in corrected.corrections] == [GUIDANCE] * 3
    kwargs = {"num_samples": N, "seed": SEED, "progress": False, "conditions": cond, "guidance_scale": GUIDANCE}
    fp = api.sample(model, scheduler, sampler, **kwargs).images
    base = api.sample(qmodel, scheduler, sampler, **kwargs).images
    images = api.sample(corrected, scheduler, sampler, **kwargs).images
    assert torch.isfinite(images).all() and not torch.equal(images, base)
    assert _mse(images, fp) <= WORSE_AT_MOST * _mse(base, fp)
    corrected.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(api.sample(loaded, loaded_scheduler, sampler, **kwargs).images, images)
    for scale in (1.0, 3.0, 0.0):
        with counting_forwards(loaded.model) as calls, pytest.raises(ValueError, match="guidance scale"):
            api.sample(loaded, loaded_scheduler, sampler, **(kwargs | {"guidance_scale": scale, "num_samples": 2}))
        assert calls[0] == 0


# -- unsupported combinations ---------------------------------------------------------------------------------------
def _next_state_stack():
    return [TACConfig(num_samples=N, seed=SEED), TCECConfig(num_samples=N, seed=SEED, target="next_state")]


def test_next_state_tcec_in_a_stack_on_dpmsolver_2m_is_refused_before_any_forward(fp_model):
    """docs/methods/tcec.md: target="next_state" is refused on 2M. Behind TAC it was refused only after TAC's whole
    sequential fit had run (its FP and quantized walks)."""
    sampler = SamplerConfig("dpmsolver++", STEPS)
    qmodel, scheduler, _, _ = _base(fp_model, sampler)
    with counting_forwards(qmodel.model) as quantized, counting_forwards(fp_model) as fp, \
            pytest.raises(NotImplementedError, match="next_state"):
        fit_corrections(qmodel, fp_model, scheduler, sampler, _next_state_stack(), batch_size=8, progress=False)
    assert (quantized[0], fp[0]) == (0, 0), f"{quantized[0]} quantized / {fp[0]} FP forwards before the refusal"


def test_a_recipe_with_next_state_tcec_on_dpmsolver_2m_is_refused_before_calibration(fp_model):
    """tadq.quantize checks the deployment up front; a correction the deployment cannot take was refused only after
    calibration, quantization and the earlier members' fits."""
    sampler = SamplerConfig("dpmsolver++", STEPS)
    recipe = tadq.Recipe.from_preset("W4A4", calibration=_calibration(sampler), corrections=tuple(_next_state_stack()),
                                     deployments=(tadq.Deployment(sampler),))
    with counting_forwards(fp_model) as fp, pytest.raises(NotImplementedError, match="next_state"):
        api.quantize(fp_model, _scheduler(sampler), recipe, progress=False, fit_batch_size=8)
    assert fp[0] == 0, f"{fp[0]} FP forwards before the refusal"


# -- config validation ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_type, field, value", [
    (TACConfig, "mask_threshold", float("nan")), (TACConfig, "ridge", float("nan")),
    (TCECConfig, "mask_threshold", float("nan")),
    (TACConfig, "selection_samples", 2.5), (TCECConfig, "selection_samples", 2.5),
    (TACConfig, "relative_weight", "0.5"),
], ids=lambda v: v.__name__ if isinstance(v, type) else str(v))
def test_bad_correction_config_values_are_refused_when_built_naming_the_field(config_type, field, value):
    """TAC's doc table: mask_threshold and ridge ≥ 0 (NaN is not); PTQDConfig refuses selection_samples=2.5 naming
    it, TAC and TCEC took it (and failed at fit time, after the earlier members' work)."""
    with pytest.raises(ValueError, match=field):
        config_type(**{field: value})


def test_recipe_validation_refuses_correction_misuse_by_name():
    from tadq.tfmq import TFMQConfig

    sampler = SamplerConfig("ddim", STEPS)
    calibration = _calibration(sampler)
    with pytest.raises(ValueError, match="deployments and a correction stack"):
        tadq.Recipe(calibration=calibration, corrections=(TACConfig(),),
                    deployments=(tadq.Deployment(sampler), tadq.Deployment(SamplerConfig("ddim", 8))))
    with pytest.raises(ValueError, match=r"corrections\[0\].*not a registered correction"):
        tadq.Recipe(calibration=calibration, corrections=({"type": "TACConfig"},),
                    deployments=(tadq.Deployment(sampler),))
    with pytest.raises(ValueError, match=r"corrections\[1\].*TFMQ"):
        tadq.Recipe(calibration=calibration, corrections=(TACConfig(), TFMQConfig()),
                    deployments=(tadq.Deployment(sampler),))
    with pytest.raises(ValueError, match="guidance_scale"):
        tadq.Deployment(sampler, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match="IBC"):
        TACConfig(trajectory="teacher_forced")
    with pytest.raises(ValueError, match="selection_seed"):
        TCECConfig(seed=3, selection_seed=3)
    with pytest.raises(ValueError, match="ibc=False and ner=False"):
        TACConfig(ibc=False, ner=False)
