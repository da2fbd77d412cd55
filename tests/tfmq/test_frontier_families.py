"""TFMQ-DM and SVDQuant (+ TFMQ-DM's cache) on model families beyond the unconditional digits UNet.

For every (family, method) the docs claim: quantize succeeds or is refused by name before any FP forward; sampling
is finite; save -> load samples bit-identically; the same seed gives identical artefact bytes; the per-step tables
follow the step being sampled (the cache serves the FP feature of the very (t, y) the network is called at, another
step count is refused by name); the int8 backend agrees with fake-quant or refuses by name; config validation names
the field. Tiny settings throughout (3-4 DDIM steps, 2-4 trajectories, a few TIAR iterations).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tests.adapters.test_mmdit import build_tiny_flux, build_tiny_sd3, prompts
from tests.adapters.test_transformer2d import build_tiny_dit, build_tiny_pixart, captions, labels_source
from tests.adapters.test_unet_condition import conditions as unet_conditions
from tests.backends.machine import int8_reason
from tests.conftest import build_tiny_sd_unet, build_tiny_sdxl_unet, build_tiny_unet
from torch import nn

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QScheme
from tadq.registry import adapter_for
from tadq.sampling import Conditioning, ConditioningList, RandomClassLabels, SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.tfmq import TFMQConfig, TFMQMethod
from tadq.tfmq.tib import TemporalInformationBlock

SAMPLER = SamplerConfig("ddim", num_steps=3, eta=0.0)
FLOW = SamplerConfig("flow-euler", num_steps=3)
GUIDANCE = 2.0


def _calib(sampler: SamplerConfig) -> CalibrationConfig:
    return CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=2, batch_size=4)


def _tfmq_naive(**overrides) -> TFMQMethod:
    return TFMQMethod(base="naive", tfmq=TFMQConfig(**{"tiar_iters": 5, "num_samples": 2, "fsc_samples_per_step": 2,
                                                       **overrides}))


def _tfmq_svd(**overrides) -> TFMQMethod:
    settings = {"tiar": False, "freeze_time_projections": False, "fsc": "off", "maintenance": "cache_fp",
                "num_samples": 2, "fsc_samples_per_step": 2, **overrides}
    return TFMQMethod(base="svdquant", tfmq=TFMQConfig(**settings), svdquant=SVDQuantMethod(search_samples=4))


def _recipe(method: TFMQMethod, sampler: SamplerConfig = SAMPLER, guidance: float = 1.0, preset: str = "W8A8"):
    if method.base == "svdquant":
        preset = "W4A4"
    recipe = tadq.Recipe.from_preset(preset, method=method, calibration=_calib(sampler),
                                     deployments=(tadq.Deployment(sampler, guidance_scale=guidance),))
    if method.base == "svdquant":
        recipe = dataclasses.replace(
            recipe, weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=1),
            activations=QScheme(bits=4, granularity="per_group", group_size=4, smoothing=True))
    return recipe


def _counted(model: nn.Module) -> tuple[nn.Module, list[int]]:
    calls = [0]
    model.register_forward_pre_hook(lambda _m, _a: calls.__setitem__(0, calls[0] + 1))
    return model, calls


def _sample(qmodel, scheduler, conditions, guidance, sampler=SAMPLER):
    return api.sample(qmodel, scheduler, sampler, num_samples=3, seed=7, batch_size=3, progress=False,
                      conditions=conditions, guidance_scale=guidance).images


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _served_vs_fp(qmodel, fp_model, scheduler, conditions, guidance, sampler=SAMPLER) -> tuple[float, int]:
    """Sample ``qmodel`` and compare every time projection's output, at every call, with the FP temporal feature at
    the (t, labels) of that call: max |served - FP| and the number of calls seen."""
    tib = TemporalInformationBlock(fp_model, adapter_for(fp_model))
    names = [feature.layer for feature in tib.features]
    current: dict[str, object] = {}
    seen = []

    def pre(_m, args, kwargs):
        current["t"] = args[1] if len(args) > 1 else kwargs["timestep"]
        current["y"] = kwargs.get("class_labels")

    handles = [qmodel.model.register_forward_pre_hook(pre, with_kwargs=True)]
    handles += [qmodel.model.get_submodule(name).register_forward_hook(
        lambda _m, _a, out, name=name: seen.append((name, current["t"], current["y"], out.detach().clone())))
        for name in names]
    try:
        _sample(qmodel, scheduler, conditions, guidance, sampler)
    finally:
        for handle in handles:
            handle.remove()
    worst = 0.0
    with torch.no_grad():
        for name, t, labels, out in seen:
            t = t if torch.is_tensor(t) and t.ndim else torch.full((out.shape[0],), float(t))
            t = t.long() if torch.equal(t, t.round()) else t
            reference = tib(t, labels)[names.index(name)]
            worst = max(worst, float((reference - out).abs().max()))
    return worst, len(seen)


# ------------------------------------------------------------------------------------------------ DiT end to end


@pytest.fixture(scope="module")
def dit_models():
    """(FP DiT, scheduler, labels, {name: TFMQ model}) built once: TFMQ on naive (TIB, per-label quantized cache,
    model-wide FSC) and TFMQ's FP cache on SVDQuant."""
    torch.set_num_threads(1)
    model, scheduler, source = build_tiny_dit(), DDIMScheduler(num_train_timesteps=1000), labels_source()
    built = {
        "naive-cache_fp-fsc_model": _tfmq_naive(maintenance="cache_fp", fsc="model"),
        "naive-select": _tfmq_naive(maintenance="select", cache_bits=8),
        "svdquant-cache_fp": _tfmq_svd(),
    }
    return model, scheduler, source, {
        name: api.quantize(model, scheduler, _recipe(method, guidance=GUIDANCE, preset="W4A8"), conditions=source,
                           progress=False) for name, method in built.items()}


@pytest.mark.parametrize("name", ["naive-cache_fp-fsc_model", "svdquant-cache_fp"])
def test_dit_cache_serves_the_fp_feature_of_each_guided_call(dit_models, name):
    """Guided sampling calls the DiT with real and null labels; the per-label cache must serve each row's own FP
    modulation at the step being sampled."""
    model, scheduler, source, built = dit_models
    worst, calls = _served_vs_fp(built[name], model, scheduler, source, GUIDANCE)
    assert calls >= SAMPLER.num_steps * 3  # every step, every modulation
    assert worst < 1e-5


@pytest.mark.parametrize("name", ["naive-cache_fp-fsc_model", "naive-select", "svdquant-cache_fp"])
def test_dit_tfmq_samples_reload_bit_identically_and_refuses_other_grids(dit_models, name, tmp_path):
    _, scheduler, source, built = dit_models
    qmodel = built[name]
    images = _sample(qmodel, scheduler, source, GUIDANCE)
    assert torch.isfinite(images).all()
    qmodel.save_pretrained(tmp_path / "a", scheduler)
    loaded, _ = tadq.load(tmp_path / "a")
    assert torch.equal(_sample(loaded, scheduler, source, GUIDANCE), images)
    with pytest.raises(ValueError, match="per-step tables were calibrated for ddim-3"):
        _sample(loaded, scheduler, source, GUIDANCE, SamplerConfig("ddim", num_steps=4, eta=0.0))
    trailing = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="TFMQ's tables were built for timestep"):
        _sample(loaded, trailing, source, GUIDANCE, SamplerConfig("ddim", num_steps=3, eta=0.0))


def test_dit_tfmq_artefact_bytes_are_deterministic(dit_models, tmp_path):
    model, scheduler, source, built = dit_models
    recipe = _recipe(_tfmq_naive(maintenance="select", cache_bits=8), guidance=GUIDANCE, preset="W4A8")
    again = api.quantize(model, scheduler, recipe, conditions=source, progress=False)
    built["naive-select"].save_pretrained(tmp_path / "a", scheduler)
    again.save_pretrained(tmp_path / "b", scheduler)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@pytest.mark.skipif(int8_reason() is not None, reason=f"int8 CPU backend: {int8_reason()}")
def test_dit_int8_backend_agrees_or_refuses_by_name(dit_models):
    from tadq.backends import to_backend

    _, scheduler, source, built = dit_models
    fake = built["naive-cache_fp-fsc_model"]  # 4-bit weights: runs on any int8 CPU kernel
    integer = to_backend(fake, "int8")
    # per step, one forward on the same input (real and null labels): whole samples are not compared, a single
    # code flip is amplified by the toy trajectory (tests/backends/test_tfmq.py explains)
    x, labels = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 4, 10])
    for step in range(SAMPLER.num_steps):
        t = torch.full((3,), int(fake.corrections[0].grid_timesteps[step]))
        with torch.no_grad(), fake.corrections[0].at_step(step), integer.corrections[0].at_step(step):
            expected = fake.model(x, timestep=t, class_labels=labels).sample
            got = integer.model(x, timestep=t, class_labels=labels).sample
        assert float((got - expected).abs().max()) < 1e-5, step
    assert torch.isfinite(_sample(integer, scheduler, source, GUIDANCE)).all()
    with pytest.raises(ValueError, match=r"backend 'int8' runs int8 kernels.*quantized per_group at run time"):
        to_backend(built["svdquant-cache_fp"], "int8")


# ------------------------------------------------------------------------------------------------ UNet variants


def _pixel_unet(**overrides):
    torch.manual_seed(0)
    from diffusers import UNet2DModel
    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    return UNet2DModel(**(config | overrides)).eval()


def _text_with_labels(count: int) -> ConditioningList:
    generator = torch.Generator().manual_seed(0)
    return ConditioningList(Conditioning(encoder_hidden_states=torch.randn(4, 3, 16, generator=generator),
                                         class_labels=torch.randint(0, count, (4,), generator=generator)))


UNET_CASES = {
    "pixel-scale_shift-classes": (lambda: _pixel_unet(resnet_time_scale_shift="scale_shift", num_class_embeds=4),
                                  lambda: RandomClassLabels(3, null_class=3), GUIDANCE),
    "pixel-resnet_resampling": (lambda: _pixel_unet(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                                                    up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")),
                                lambda: None, 1.0),
    "sd-concat_classes": (lambda: build_tiny_sd_unet(num_class_embeds=3, class_embeddings_concat=True),
                          lambda: _text_with_labels(3), 1.0),
    "sd-act_skip_time_act": (lambda: build_tiny_sd_unet(time_embedding_act_fn="silu", resnet_skip_time_act=True,
                                                        timestep_post_act="silu"),
                             lambda: ConditioningList(Conditioning(encoder_hidden_states=torch.randn(
                                 4, 3, 16, generator=torch.Generator().manual_seed(0)))), 1.0),
}


# one SVDQuant case in the default suite, the others (10 s each on a 2-core AVX2 CPU) with `make test-slow`
@pytest.mark.parametrize("case, base", [
    *((case, "naive") for case in UNET_CASES),
    ("pixel-scale_shift-classes", "svdquant"),
    *(pytest.param(case, "svdquant", marks=pytest.mark.slow) for case in UNET_CASES
      if case != "pixel-scale_shift-classes"),
], ids=lambda value: value)
def test_unet_variants_cache_follows_the_step_and_reloads(case, base, tmp_path):
    build, conditions, guidance = UNET_CASES[case]
    model, scheduler, source = build(), DDIMScheduler(num_train_timesteps=1000), conditions()
    method = _tfmq_naive(maintenance="cache_fp", fsc="model") if base == "naive" else _tfmq_svd()
    qmodel = api.quantize(model, scheduler, _recipe(method, guidance=guidance), conditions=source, progress=False)
    assert len(qmodel.corrections[0].cache_layers) == len(TemporalInformationBlock(model, adapter_for(model)).features)
    worst, _ = _served_vs_fp(qmodel, model, scheduler, source, guidance)
    assert worst < 1e-5
    images = _sample(qmodel, scheduler, source, guidance)
    assert torch.isfinite(images).all()
    qmodel.save_pretrained(tmp_path / "q", scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert torch.equal(_sample(loaded, scheduler, source, guidance), images)


# ------------------------------------------------------------------------------------------------ refusals


FAMILIES = {
    "pixart": (build_tiny_pixart, lambda: DDIMScheduler(num_train_timesteps=1000), SAMPLER,
               lambda: ConditioningList(captions(2, seed=1)), TypeError, "declares no temporal path"),
    "sd3": (build_tiny_sd3, FlowMatchEulerDiscreteScheduler, FLOW, lambda: ConditioningList(prompts(2, seed=1)),
            TypeError, "declares no temporal path"),
    "flux": (build_tiny_flux, FlowMatchEulerDiscreteScheduler, FLOW,
             lambda: ConditioningList(prompts(2, seed=1, guidance=3.5)), TypeError, "declares no temporal path"),
    "sdxl": (build_tiny_sdxl_unet, lambda: DDIMScheduler(num_train_timesteps=1000), SAMPLER,
             lambda: ConditioningList(unet_conditions(2, sdxl=True, seed=1)), NotImplementedError, "SDXL"),
}


@pytest.mark.parametrize("base", ["naive", "qdiffusion", "svdquant"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tfmq_unsupported_families_are_refused_before_any_forward(family, base):
    build, scheduler, sampler, conditions, error, named = FAMILIES[family]
    model, calls = _counted(build())
    method = _tfmq_svd() if base == "svdquant" else TFMQMethod(base=base, tfmq=TFMQConfig(tiar_iters=2))
    with pytest.raises(error, match=named):
        api.quantize(model, scheduler(), _recipe(method, sampler, GUIDANCE), conditions=conditions(), progress=False)
    assert calls[0] == 0


# ------------------------------------------------------------------------------------------------ fractional grid


@pytest.mark.parametrize("maintenance", ["tib", "cache_fp"])
def test_tfmq_on_a_fractional_grid_is_served_or_refused_before_calibration(maintenance):
    """An Euler deployment on a 'linspace' DDPM schedule has fractional timesteps (999, 499.5, 0). TFMQ tabulates
    its TIB, cache and grid with ``.long()`` (499), so quantize succeeds, then sampling with the very sampler and
    scheduler it was built for raises "another timestep spacing". Either the tables must be built at the real
    timesteps (and then serve the FP feature at 499.5), or the grid must be refused by name before calibration."""
    sampler = SamplerConfig("euler", num_steps=3)
    scheduler = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    model, calls = _counted(build_tiny_unet())
    recipe = _recipe(_tfmq_naive(maintenance=maintenance), sampler)
    try:
        qmodel = api.quantize(model, scheduler, recipe, progress=False)
    except (ValueError, NotImplementedError) as refused:
        assert calls[0] == 0, f"refused only after {calls[0]} FP forwards: {refused}"
        assert "fraction" in str(refused) or "timestep" in str(refused)
        return
    grid = qmodel.corrections[0].grid_timesteps
    assert grid.dtype.is_floating_point and float(grid[1]) == 499.5, f"tables built for truncated grid {grid}"
    images = _sample(qmodel, scheduler, None, 1.0, sampler)  # the deployment it was built for
    assert torch.isfinite(images).all()
    if maintenance == "cache_fp":
        worst, _ = _served_vs_fp(qmodel, model, scheduler, None, 1.0, sampler)
        assert worst < 1e-5


# ------------------------------------------------------------------------------------------------ config validation


@pytest.mark.parametrize(("build", "field"), [
    (lambda: TFMQConfig(tiar_lr=math.inf), "tiar_lr"),
    (lambda: TFMQConfig(tiar_lr=True), "tiar_lr"),
    (lambda: TFMQConfig(tiar_lr="0.1"), "tiar_lr"),
    (lambda: SVDQuantMethod(search_samples=2.5), "search_samples"),
    (lambda: SVDQuantMethod(search_samples=True), "search_samples"),
    (lambda: SVDQuantMethod(svd_niter=2.5), "svd_niter"),
    (lambda: SVDQuantMethod(svd_oversample="8"), "svd_oversample"),
    (lambda: TFMQMethod(tfmq=None), "tfmq"),
    (lambda: TFMQMethod(reconstruction=1), "reconstruction"),
], ids=["tiar_lr=inf", "tiar_lr=True", "tiar_lr=str", "search_samples=2.5", "search_samples=True",
        "svd_niter=2.5", "svd_oversample=str", "tfmq=None", "reconstruction=1"])
def test_bad_method_fields_are_refused_by_name_at_construction(build, field):
    with pytest.raises(ValueError, match=field):
        build()


@pytest.mark.parametrize("method", [
    lambda: TFMQMethod(base="naive", tfmq=None),
    lambda: TFMQMethod(base="svdquant", tfmq=_tfmq_svd().tfmq, svdquant=SVDQuantMethod(search_samples=2.5)),
    lambda: TFMQMethod(base="svdquant", tfmq=_tfmq_svd().tfmq, svdquant=SVDQuantMethod(svd_niter=2.5)),
], ids=["tfmq=None", "search_samples=2.5", "svd_niter=2.5"])
def test_bad_method_fields_never_reach_calibration(method):
    """If construction lets them through, quantize must still refuse them by name before sampling anything (it
    failed with an AttributeError / TypeError from deep inside after the calibration trajectories were sampled)."""
    try:
        built = method()
    except ValueError:
        return
    model, calls = _counted(build_tiny_unet())
    with pytest.raises(ValueError):
        api.quantize(model, DDPMScheduler(num_train_timesteps=1000), _recipe(built), progress=False)
    assert calls[0] == 0


def test_quantize_tfmq_refuses_an_svdquant_config_before_any_forward():
    """``quantize_tfmq`` runs TIAR and block reconstruction, never SVDQuant's fit: an svdquant ``QuantConfig``
    returned a model labelled svdquant whose smoothing stayed identity and whose low-rank branches stayed empty."""
    from tadq.config import QuantConfig
    from tadq.tfmq import quantize_tfmq

    config = QuantConfig(weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=1),
                         activations=QScheme(bits=8, granularity="per_group", group_size=4, smoothing=True),
                         method="svdquant", calibration=_calib(SAMPLER))
    model, calls = _counted(build_tiny_unet())
    with pytest.raises(ValueError, match="TFMQMethod\\(base='svdquant'"):
        quantize_tfmq(model, DDPMScheduler(num_train_timesteps=1000), config, TFMQConfig(tiar_iters=2), SAMPLER,
                      progress=False)
    assert calls[0] == 0
