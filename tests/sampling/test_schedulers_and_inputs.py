"""The public API (tadq.sample / tadq.quantize / tadq.load / SamplerConfig) with the diffusers schedulers and model
inputs real users hand it.

Every scheduler is either sampled as diffusers' own loop samples it (same tiny UNet, same x_T and step noise, same
steps) or refused by name before the network runs; seeds and model inputs outside what tadq can honour are refused
before any forward.
"""

from __future__ import annotations

import copy
import math

import diffusers
import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as scheduling_euler_ancestral
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DModel,
)
from tests.conftest import build_tiny_unet

import tadq
from tadq import SamplerConfig
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.corrections.tac.config import TACConfig
from tadq.recipe import Deployment, QDiffusionMethod, Recipe
from tadq.registry import adapter_for
from tadq.sampling import SamplingPlan, initial_noise, make_scheduler, step_noise

SEED = 3
N = 2
SHAPE = (1, 8, 8)  # the tiny UNet's (C, H, W)
_CLASSES = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler,
            "euler-ancestral": EulerAncestralDiscreteScheduler, "dpmsolver++": DPMSolverMultistepScheduler,
            "flow-euler": FlowMatchEulerDiscreteScheduler}


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return build_tiny_unet()


class _ForwardCounter:
    """Counts forward calls of a module (to assert a refusal came before any network work)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.calls += 1

    def __enter__(self) -> _ForwardCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _diffusers_loop(unet: UNet2DModel, train, kind: str, steps: int, monkeypatch, eta: float = 0.0) -> torch.Tensor:
    """The pipelines' loop on the diffusers class of ``kind`` built from the user's training config, from tadq's
    x_T and per-step noise (patched into DDPM's and Euler ancestral's internal draws)."""
    scheduler = _CLASSES[kind].from_config(train.config)
    scheduler.set_timesteps(steps)
    noises = step_noise(SEED, range(N), steps, SHAPE)
    x = initial_noise(SEED, range(N), SHAPE) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow: z itself
    for index, t in enumerate(scheduler.timesteps):
        scale = getattr(scheduler, "scale_model_input", None)
        model_input = x if scale is None else scale(x, t)
        with torch.no_grad():
            output = unet(model_input, t.expand(N)).sample
        if kind == "ddim":
            x = scheduler.step(output, t, x, eta=eta, variance_noise=noises[index]).prev_sample
            continue
        if kind == "ddpm":
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, _z=noises[index], **k: _z)
        if kind == "euler-ancestral":
            monkeypatch.setattr(scheduling_euler_ancestral, "randn_tensor", lambda *a, _z=noises[index], **k: _z)
        x = scheduler.step(output, t, x).prev_sample
    return x


def _tadq(unet, train, sampler: SamplerConfig, **kwargs) -> torch.Tensor:
    kwargs = {"num_samples": N, "seed": SEED, "progress": False} | kwargs
    return tadq.sample(unet, train, sampler, **kwargs).images


# -- (1) supported schedulers: tadq's loop equals diffusers' loop -----------------------------------------------------
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
PARITY = [
    ("ddpm-default", DDPMScheduler, {}, "ddpm", 10, 0.0),
    ("ddpm-trailing", DDPMScheduler, {"timestep_spacing": "trailing"}, "ddpm", 10, 0.0),
    ("ddpm-steps-offset", DDPMScheduler, {"steps_offset": 1}, "ddpm", 10, 0.0),
    ("ddpm-fixed-large", DDPMScheduler, {"variance_type": "fixed_large"}, "ddpm", 10, 0.0),
    ("ddpm-fixed-small-log", DDPMScheduler, {"variance_type": "fixed_small_log"}, "ddpm", 10, 0.0),
    ("ddpm-squaredcos", DDPMScheduler, {"beta_schedule": "squaredcos_cap_v2"}, "ddpm", 10, 0.0),
    ("ddpm-v", DDPMScheduler, {"prediction_type": "v_prediction"}, "ddpm", 10, 0.0),
    ("ddpm-x0", DDPMScheduler, {"prediction_type": "sample"}, "ddpm", 10, 0.0),
    ("ddim-default-clips", DDIMScheduler, {}, "ddim", 10, 0.0),
    ("ddim-eta1", DDIMScheduler, {}, "ddim", 10, 1.0),
    ("ddim-sd-config", DDIMScheduler, SD | {"set_alpha_to_one": False, "clip_sample": False}, "ddim", 10, 0.0),
    ("ddim-trailing", DDIMScheduler, {"timestep_spacing": "trailing"}, "ddim", 10, 0.0),
    ("ddim-linspace", DDIMScheduler, {"timestep_spacing": "linspace"}, "ddim", 10, 0.0),
    ("ddim-clip-range", DDIMScheduler, {"clip_sample_range": 0.5}, "ddim", 10, 0.0),
    ("ddim-v", DDIMScheduler, {"prediction_type": "v_prediction"}, "ddim", 10, 0.0),
    ("ddim-x0", DDIMScheduler, {"prediction_type": "sample"}, "ddim", 10, 0.0),
    ("ddim-zero-snr-leading", DDIMScheduler, {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
     "ddim", 10, 0.0),
    ("euler-default", EulerDiscreteScheduler, {}, "euler", 10, 0.0),
    ("euler-karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, "euler", 10, 0.0),
    ("euler-exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "euler", 10, 0.0),
    ("euler-sdxl", EulerDiscreteScheduler, SD | {"timestep_spacing": "leading"}, "euler", 10, 0.0),
    ("euler-trailing", EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, "euler", 10, 0.0),
    ("euler-v-continuous", EulerDiscreteScheduler, {"prediction_type": "v_prediction", "timestep_type": "continuous"},
     "euler", 10, 0.0),
    ("euler-sigma-min", EulerDiscreteScheduler, {"final_sigmas_type": "sigma_min"}, "euler", 10, 0.0),
    ("euler-zero-snr", EulerDiscreteScheduler, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                                "prediction_type": "v_prediction"}, "euler", 10, 0.0),
    ("euler-a-default", EulerAncestralDiscreteScheduler, {}, "euler-ancestral", 10, 0.0),
    ("euler-a-trailing-v", EulerAncestralDiscreteScheduler, {"timestep_spacing": "trailing",
                                                             "prediction_type": "v_prediction"},
     "euler-ancestral", 10, 0.0),
    ("dpm-8", DPMSolverMultistepScheduler, {}, "dpmsolver++", 8, 0.0),
    ("dpm-20", DPMSolverMultistepScheduler, {}, "dpmsolver++", 20, 0.0),
    ("dpm-karras-sigma-min", DPMSolverMultistepScheduler, {"use_karras_sigmas": True,
                                                           "final_sigmas_type": "sigma_min"}, "dpmsolver++", 20, 0.0),
    ("dpm-sigma-min-no-lof", DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min",
                                                           "lower_order_final": False}, "dpmsolver++", 10, 0.0),
    ("dpm-euler-at-final", DPMSolverMultistepScheduler, {"euler_at_final": True}, "dpmsolver++", 20, 0.0),
    ("dpm-lu-lambdas", DPMSolverMultistepScheduler, {"use_lu_lambdas": True}, "dpmsolver++", 20, 0.0),
    ("dpm-v", DPMSolverMultistepScheduler, {"prediction_type": "v_prediction"}, "dpmsolver++", 20, 0.0),
    ("dpm-x0", DPMSolverMultistepScheduler, {"prediction_type": "sample"}, "dpmsolver++", 20, 0.0),
    ("dpm-zero-snr", DPMSolverMultistepScheduler, {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                                   "prediction_type": "v_prediction"}, "dpmsolver++", 20, 0.0),
    ("flow-shift-terminal", FlowMatchEulerDiscreteScheduler, {"shift": 3.0, "shift_terminal": 0.1}, "flow-euler", 6,
     0.0),
    ("flow-karras", FlowMatchEulerDiscreteScheduler, {"use_karras_sigmas": True}, "flow-euler", 6, 0.0),
    ("ddim-1-step", DDIMScheduler, {}, "ddim", 1, 0.0),
    ("ddpm-1-step", DDPMScheduler, {}, "ddpm", 1, 0.0),
    ("euler-1-step", EulerDiscreteScheduler, {}, "euler", 1, 0.0),
    ("dpm-1-step", DPMSolverMultistepScheduler, {}, "dpmsolver++", 1, 0.0),
    ("ddpm-every-training-step", DDPMScheduler, {"num_train_timesteps": 40}, "ddpm", 40, 0.0),
]


@pytest.mark.parametrize(("name", "cls", "options", "kind", "steps", "eta"), PARITY, ids=[p[0] for p in PARITY])
def test_the_fp_loop_equals_diffusers_loop(unet, monkeypatch, name, cls, options, kind, steps, eta) -> None:
    train = cls(**options)
    images = _tadq(unet, train, SamplerConfig(kind, num_steps=steps, eta=eta))
    reference = _diffusers_loop(unet, train, kind, steps, monkeypatch, eta)
    # ddim/ddpm/dpmsolver++/flow-euler on ε are bit-identical; euler's VP round trip and the v/x0 → ε conversion
    # cost a few ulps per step (docs/sampling.md#what-is-tested); a wrong coefficient would be orders larger
    bound = 2e-5 * float(reference.abs().max())
    assert float((images - reference).abs().max()) <= bound, name


# -- refused by name before the network runs --------------------------------------------------------------------------
REFUSED_CLASSES = ["HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler",
                   "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                   "TCDScheduler", "EDMEulerScheduler", "DDIMInverseScheduler", "FlowMatchHeunDiscreteScheduler",
                   "IPNDMScheduler", "ScoreSdeVeScheduler", "DDIMParallelScheduler"]


@pytest.mark.parametrize("class_name", REFUSED_CLASSES)
def test_an_undrivable_scheduler_class_is_refused_by_name_before_any_forward(unet, class_name) -> None:
    scheduler = getattr(diffusers, class_name)()
    for kind in ("ddim", "euler"):
        with _ForwardCounter(unet) as counter, pytest.raises(NotImplementedError, match=class_name):
            _tadq(unet, scheduler, SamplerConfig(kind, num_steps=4))
        assert counter.calls == 0


@pytest.mark.parametrize(("scheduler", "kind", "match"), [
    (DDIMScheduler(thresholding=True), "ddim", "thresholding"),
    (DDPMScheduler(thresholding=True), "ddpm", "thresholding"),
    (DPMSolverMultistepScheduler(thresholding=True), "dpmsolver++", "thresholding"),
    (DPMSolverMultistepScheduler(solver_type="heun"), "dpmsolver++", "heun"),
    (DDPMScheduler(variance_type="learned_range"), "ddpm", "learned_range"),
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), "flow-euler", "stochastic_sampling"),
    (FlowMatchEulerDiscreteScheduler(invert_sigmas=True), "flow-euler", "invert_sigmas"),
    (FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "flow-euler", "use_dynamic_shifting"),
    (DDIMScheduler(rescale_betas_zero_snr=True, timestep_spacing="trailing"), "ddim", "zero-terminal-SNR"),
    (FlowMatchEulerDiscreteScheduler(), "ddim", "flow"),
    (DDPMScheduler(), "flow-euler", "flow"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_an_option_tadq_does_not_implement_is_refused_before_any_forward(unet, scheduler, kind, match) -> None:
    with _ForwardCounter(unet) as counter, pytest.raises((NotImplementedError, ValueError), match=match):
        _tadq(unet, scheduler, SamplerConfig(kind, num_steps=4))
    assert counter.calls == 0


@pytest.mark.parametrize("cls", [PNDMScheduler, diffusers.LMSDiscreteScheduler])
def test_pndm_and_lms_have_no_default_sampler_but_drive_a_named_one(unet, monkeypatch, cls) -> None:
    with pytest.raises(NotImplementedError, match=cls.__name__):
        tadq.sampling.default_sampler(cls())
    train = cls(**SD)  # an SD 1.x-like folder, every key explicit as in its JSON
    images = _tadq(unet, train, SamplerConfig("ddim", num_steps=6))
    assert torch.equal(images, _diffusers_loop(unet, train, "ddim", 6, monkeypatch))


def test_steps_above_the_training_steps_are_refused_for_integer_grids(unet) -> None:
    for kind in ("ddim", "ddpm"):
        with pytest.raises(ValueError, match="1001"):
            _tadq(unet, DDPMScheduler(), SamplerConfig(kind, num_steps=1001))
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig("ddim", num_steps=0)


# -- DPM-Solver++ 2M with as many steps as training timesteps ---------------------------------------------------------
@pytest.mark.parametrize("steps", [1000, 1001])
def test_dpmsolver_with_at_least_the_training_steps_is_refused_with_a_clear_error(steps) -> None:
    """diffusers' linspace grid repeats a timestep from S = N on (its own loop turns NaN); tadq should say so, not
    die in its coefficient maths with a bare ZeroDivisionError."""
    try:
        SamplingPlan.build(DPMSolverMultistepScheduler(), SamplerConfig("dpmsolver++", num_steps=steps))
    except ZeroDivisionError as error:
        pytest.fail(f"refused with a bare ZeroDivisionError ({error}) instead of a message naming the step count")
    except (ValueError, NotImplementedError) as error:
        assert str(steps) in str(error) or "timestep" in str(error)


# -- the sampler follows the training config's values, however the scheduler was made ---------------------------------
ROUND_TRIPS = [(PNDMScheduler, "ddim"), (DDPMScheduler, "euler"), (DDIMScheduler, "dpmsolver++"),
               (EulerDiscreteScheduler, "ddim")]


@pytest.mark.parametrize(("cls", "kind"), ROUND_TRIPS, ids=[f"{c.__name__}-{k}" for c, k in ROUND_TRIPS])
def test_the_sampler_is_the_one_diffusers_from_config_builds_and_tadq_saves_keep_it(tmp_path, cls, kind) -> None:
    """A scheduler built in memory leaves keys at its class defaults, which diffusers' ``from_config`` into the
    sampler's class replaces with that class's defaults (PNDM's set_alpha_to_one=False → DDIM's True; DDPM's
    'leading' → Euler's 'linspace'); tadq builds the same sampler a user's ``X.from_config(scheduler.config)`` gets,
    the cache key of that scheduler is the same in every process, and tadq's scheduler save keeps the defaulted keys
    out so the loaded one builds the same sampler again (diffusers' own save names every key, which changes it)."""
    from tadq.io.save import _save_scheduler

    in_memory = cls()
    sampler = SamplerConfig(kind, num_steps=10)
    built = make_scheduler(in_memory, sampler)
    reference = _CLASSES[kind].from_config(in_memory.config)
    reference.set_timesteps(10)
    assert built.timesteps.tolist() == reference.timesteps.tolist()
    for key in ("timestep_spacing", "set_alpha_to_one", "steps_offset", "clip_sample"):
        assert built.config.get(key) == reference.config.get(key), key
    _save_scheduler(in_memory, tmp_path / "tadq")
    reloaded = cls.from_pretrained(tmp_path / "tadq")
    assert SamplingPlan.build(reloaded, sampler).steps == SamplingPlan.build(in_memory, sampler).steps
    key = tadq.sampling.scheduler_config_key(in_memory.config)["_use_default_values"]
    assert key == sorted(key) and set(key) == set(in_memory.config["_use_default_values"])


def test_an_artefact_samples_with_the_scheduler_it_was_saved_with(unet, tmp_path) -> None:
    """quantize (TAC on euler) with a default-built DDPMScheduler, save it with that scheduler, load it: the loaded
    artefact must sample with its own saved scheduler (it failed with 'TACCorrection was fitted on another training
    schedule' while the in-memory scheduler's spacing was dropped for the sampler class's default)."""
    sampler = SamplerConfig("euler", num_steps=6)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=3, samples_per_step=4,
                                    batch_size=8)
    recipe = Recipe(calibration=calibration, deployments=(Deployment(sampler),),
                    corrections=(TACConfig(num_samples=8),))
    scheduler = DDPMScheduler()
    qmodel = tadq.quantize(unet, scheduler, recipe, progress=False)
    expected = _tadq(qmodel, scheduler, sampler)
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, saved_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_tadq(loaded, saved_scheduler, sampler), expected)


# -- quantize with precomputed calibration checks the scheduler before the method -------------------------------------
def test_quantize_refuses_an_undrivable_scheduler_before_block_reconstruction(unet, monkeypatch) -> None:
    import tadq.methods as methods

    sampler = SamplerConfig("ddim", num_steps=6)
    calibration_config = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=2,
                                           batch_size=4)
    calibration = collect_calibration_set(unet, adapter_for(unet), DDPMScheduler(), calibration_config,
                                          progress=False)
    calls = []
    original = methods.reconstruct
    monkeypatch.setattr(methods, "reconstruct", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    recipe = Recipe(method=QDiffusionMethod(ReconstructionConfig(weight_iters=1, batch_size=2)),
                    calibration=calibration_config, deployments=(Deployment(sampler),),
                    corrections=(TACConfig(num_samples=4),))
    undrivable = diffusers.UniPCMultistepScheduler()
    with pytest.raises(NotImplementedError, match="UniPCMultistepScheduler"):
        tadq.quantize(unet, undrivable, recipe, calibration=calibration, progress=False)
    assert calls == [], "block reconstruction ran before the scheduler was refused"
    with pytest.raises(NotImplementedError, match="UniPCMultistepScheduler"):  # was accepted silently
        tadq.quantize(unet, undrivable, QuantConfig(calibration=calibration_config), calibration=calibration,
                      progress=False)


# -- seeds ------------------------------------------------------------------------------------------------------------
def test_same_seed_twice_is_identical_for_every_stochastic_kind(unet) -> None:
    for sampler, train in ((SamplerConfig("ddpm", 6), DDPMScheduler()), (SamplerConfig("ddim", 6, eta=1.0),
                                                                         DDIMScheduler()),
                           (SamplerConfig("euler-ancestral", 6), EulerAncestralDiscreteScheduler()),
                           (SamplerConfig("dpmsolver++", 6), DPMSolverMultistepScheduler())):
        first = _tadq(unet, train, sampler, num_samples=3, seed=11)
        assert torch.equal(first, _tadq(unet, train, sampler, num_samples=3, seed=11))
        assert not torch.equal(first, _tadq(unet, train, sampler, num_samples=3, seed=12))


def test_bad_counts_and_seeds_are_refused_before_any_forward(unet) -> None:
    sampler = SamplerConfig("ddim", num_steps=4)
    with _ForwardCounter(unet) as counter:
        for bad in ({"num_samples": 0}, {"num_samples": -1}, {"seed": -1}):
            with pytest.raises(ValueError):
                _tadq(unet, DDPMScheduler(), sampler, **bad)
        for bad in ({"num_samples": 1.0}, {"num_samples": True}, {"seed": True}, {"seed": 1.5}):
            with pytest.raises(TypeError):
                _tadq(unet, DDPMScheduler(), sampler, **bad)
    assert counter.calls == 0


def test_default_calibration_and_evaluation_seeds_draw_disjoint_noise() -> None:
    calibration = initial_noise(CalibrationConfig().seed, range(64), SHAPE)  # seed 0, as tadq run
    evaluation = initial_noise(1000, range(64), SHAPE)  # tadq run's evaluation seed
    overlap = (calibration.flatten(1)[:, None, :] == evaluation.flatten(1)[None, :, :]).all(-1)
    assert not bool(overlap.any())


@pytest.mark.parametrize("k", [1, 3])
def test_a_large_seed_is_refused_rather_than_replaying_another_seeds_noise(unet, k) -> None:
    """sample_generator hashes (seed, index, stream) with numpy's SeedSequence, which splits an int into 32-bit
    words and zero-pads to its pool: (s + k·2**32, i, stream) would be the same entropy as (s, k, i), so seed
    7 + k·2**32's sample 0 would be seed 7's sample k — a 'disjoint' evaluation seed replaying calibration noise.
    Seeds above 2**32 - 1 are therefore refused, before any forward."""
    sampler = SamplerConfig("ddim", num_steps=4)
    with _ForwardCounter(unet) as counter:
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32 - 1\]"):
            _tadq(unet, DDIMScheduler(), sampler, num_samples=1, seed=7 + k * 2**32)
    assert counter.calls == 0
    with pytest.raises(ValueError, match="seed"):
        initial_noise(2**32, [0], SHAPE)
    with pytest.raises(ValueError, match="index"):
        initial_noise(0, [2**32], SHAPE)
    assert not torch.equal(initial_noise(2**32 - 1, [0], SHAPE), initial_noise(0, [0], SHAPE))  # the bound runs


def test_a_calibration_seed_torch_cannot_take_is_refused_before_the_fp_run(unet) -> None:
    """CalibrationConfig(seed=2**64) is accepted, the whole FP calibration run is sampled, then _subsample's
    torch.Generator().manual_seed fails with a bare 'Overflow when unpacking long long'."""
    try:
        config = CalibrationConfig(sampler=SamplerConfig("ddim", num_steps=4), num_trajectories=2, num_steps_kept=2,
                                   samples_per_step=2, batch_size=2, seed=2**64)
    except (ValueError, TypeError):
        return  # refused when built: the fix this asks for
    with _ForwardCounter(unet) as counter:
        with pytest.raises((ValueError, TypeError)):
            tadq.quantize(unet, DDPMScheduler(), QuantConfig(calibration=config), progress=False)
    assert counter.calls == 0, f"{counter.calls} FP forward calls ran before the seed was refused"


# -- model inputs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_samples_in_its_dtype_as_diffusers_does(unet, dtype) -> None:
    sampler, train = SamplerConfig("ddim", num_steps=6), DDPMScheduler()
    model = copy.deepcopy(unet).to(dtype)
    images = _tadq(model, train, sampler)
    assert images.dtype == dtype
    assert torch.equal(images, _tadq(unet, train, sampler, dtype=dtype))  # dtype= is the same cast
    scheduler = DDIMScheduler.from_config(train.config)
    scheduler.set_timesteps(6)
    x = initial_noise(SEED, range(N), SHAPE).to(dtype)
    for t in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(model(x, t.expand(N)).sample, t, x).prev_sample
    assert torch.equal(images, x)


def test_a_training_mode_model_with_grads_is_sampled_and_quantized_in_eval_and_left_as_it_was(unet) -> None:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, dropout=0.5).train()
    sampler = SamplerConfig("ddim", num_steps=4)
    first = _tadq(model, DDPMScheduler(), sampler)
    assert torch.equal(first, _tadq(model, DDPMScheduler(), sampler)) and not first.requires_grad
    config = QuantConfig(calibration=CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2,
                                                       samples_per_step=2, batch_size=4))
    tadq.quantize(model, DDPMScheduler(), config, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_a_rectangular_sample_size_is_sampled_at_its_shape(unet) -> None:
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=(8, 16), in_channels=1, out_channels=1, layers_per_block=1,
                        block_out_channels=(4, 8), norm_num_groups=4,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    assert _tadq(model, DDPMScheduler(), SamplerConfig("ddim", num_steps=2)).shape == (N, 1, 8, 16)


def test_a_meta_device_model_is_refused_by_name_before_any_forward() -> None:
    """A model built under torch.device('meta') (weights not loaded): tadq.sample ran a forward and then died in the
    DDIM step with 'Tensor.item() cannot be called on meta tensors'; tadq.quantize with the same message."""
    with torch.device("meta"):
        model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                            block_out_channels=(4, 8), norm_num_groups=4,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    with _ForwardCounter(model) as counter:
        with pytest.raises((ValueError, TypeError, NotImplementedError), match="meta"):
            _tadq(model, DDPMScheduler(), SamplerConfig("ddim", num_steps=2))
        assert counter.calls == 0
        with pytest.raises((ValueError, TypeError, NotImplementedError), match="meta"):
            tadq.quantize(model, DDPMScheduler(), QuantConfig(), progress=False)


def test_flow_scheduler_variants_match_diffusers_bit_for_bit(unet) -> None:
    for options, shift, mu in (({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 2.0, 2.0),
                               ({"use_dynamic_shifting": True}, 2.0, math.log(2.0)),
                               ({"use_beta_sigmas": True}, None, None)):
        train = FlowMatchEulerDiscreteScheduler(**options)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(train.config)
        scheduler.set_timesteps(5, **({} if mu is None else {"mu": mu}))
        x = initial_noise(SEED, range(N), SHAPE)
        for t in scheduler.timesteps:
            with torch.no_grad():
                x = scheduler.step(unet(x, t.expand(N)).sample, t, x).prev_sample
        assert torch.equal(_tadq(unet, train, SamplerConfig("flow-euler", num_steps=5, shift=shift)), x), options


def test_a_conditioning_list_takes_only_a_conditioning():
    """``ConditioningList(ConditioningList(...))`` was accepted and failed later, inside the calibration cache key
    ("'ConditioningList' object has no attribute 'to_tensors'"): refused when it is built."""
    from tadq.sampling import Conditioning, ConditioningList

    rows = ConditioningList(Conditioning(class_labels=torch.tensor([1, 2])))
    with pytest.raises(TypeError, match="takes a Conditioning.*got ConditioningList"):
        ConditioningList(rows)
    assert len(rows) == 2
