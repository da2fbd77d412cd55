"""Transformer denoisers in the configurations released checkpoints use, end to end through the public API: PixArt-α
at 1024 px (resolution and aspect-ratio conditions), SD3.5 (dual attention, RMS q/k norms, a cropped position
table), SD3 with 1×1 patches, Flux.1-dev (distilled guidance input) and -schnell (none), Flux with no single or no
double blocks, DiT with other patch sizes, 1000 classes or no learned variance. Each is quantized (naive W8A8,
attention operands quantized) at a guidance scale, sampled under guidance with its own sampler (DDIM for ε models,
flow-euler for SD3/Flux), run on the int8 backend and saved/loaded. Layouts tadq cannot drive, and diffusers
transformers it has no adapter for, are refused by name before the model runs."""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
)
from tests.adapters.snr import eps_snr_db

import tadq
import tadq.methods
from tadq import api
from tadq.backends import capability, to_backend
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.recipe import Deployment, Recipe
from tadq.registry import adapter_for
from tadq.sampling import ClassLabels, Conditioning, ConditioningList, SamplerConfig

GUIDANCE = 3.0
TOKENS, TEXT, POOLED = 3, 16, 8  # text length, text width, pooled width of the tiny models
NUM_CLASSES = 10
DDIM = SamplerConfig("ddim", num_steps=4, eta=0.0)
FLOW = SamplerConfig("flow-euler", num_steps=4)


def _int8_w8_reason() -> str | None:
    """Why W8A8 cannot run on the int8 CPU backend here (8-bit weight codes need VNNI/AMX), or None."""
    missing = capability.int8_cpu_missing()
    if missing is not None:
        return missing
    bound = capability.int8_cpu_weight_bound()
    return capability.weight_bound_reason(bound) if bound < capability.FULL_INT8_RANGE else None


# ---------------------------------------------------------------- tiny models in released configurations


def _pixart(**overrides) -> PixArtTransformer2DModel:
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=6,
                  num_attention_heads=2, cross_attention_dim=12, caption_channels=TEXT, norm_num_groups=1)
    return PixArtTransformer2DModel(**(config | overrides))


def _sd3(**overrides) -> SD3Transformer2DModel:
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=TEXT, caption_projection_dim=16,
                  pooled_projection_dim=POOLED, out_channels=4)
    return SD3Transformer2DModel(**(config | overrides))


def _flux(sample_size: int | None = 8, **overrides) -> FluxTransformer2DModel:
    config = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=TEXT, pooled_projection_dim=POOLED,
                  guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    model = FluxTransformer2DModel(**(config | overrides))
    model.register_to_config(sample_size=sample_size)
    return model


def _dit(**overrides) -> DiTTransformer2DModel:
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, num_embeds_ada_norm=NUM_CLASSES)
    return DiTTransformer2DModel(**(config | overrides))


def captions(n: int, sizes: dict | None = None, width: int = TEXT) -> ConditioningList:
    """PixArt captions with a zero (empty prompt) unconditional branch; PixArt-α's size conditions in both."""
    generator = torch.Generator().manual_seed(1)
    added = sizes or {}
    return ConditioningList(Conditioning(
        encoder_hidden_states=torch.randn(n, TOKENS, width, generator=generator), added_cond_kwargs=added,
        unconditional=Conditioning(encoder_hidden_states=torch.zeros(n, TOKENS, width), added_cond_kwargs=added)))


def prompts(n: int, guidance: float | None = None, unconditional_guidance: bool = True) -> ConditioningList:
    """SD3/Flux text states and pooled embeddings with a zero unconditional branch; Flux-dev's distilled guidance
    scale in the conditional branch, and in the unconditional one unless ``unconditional_guidance`` is False."""
    generator = torch.Generator().manual_seed(1)
    added = {} if guidance is None else {"guidance": torch.full((n,), guidance)}
    return ConditioningList(Conditioning(
        encoder_hidden_states=torch.randn(n, TOKENS, TEXT, generator=generator),
        pooled_embeds=torch.randn(n, POOLED, generator=generator), added_cond_kwargs=added,
        unconditional=Conditioning(encoder_hidden_states=torch.zeros(n, TOKENS, TEXT),
                                   pooled_embeds=torch.zeros(n, POOLED),
                                   added_cond_kwargs=added if unconditional_guidance else {})))


PIXART_1024_SIZES = {"resolution": torch.tensor([[1024.0, 1024.0]]).repeat(6, 1), "aspect_ratio": torch.ones(6, 1)}

# name → (model builder, its sampler, its conditions); every model seeded in ``_build``
CONFIGS = {
    # PixArt-α 1024: sample_size 128 turns the size conditions on by itself (patch 16 keeps it tiny: 8×8 tokens)
    "pixart-alpha-1024": (lambda: _pixart(sample_size=128, patch_size=16), DDIM,
                          lambda: captions(6, PIXART_1024_SIZES)),
    "pixart-interpolation-no-caption-projection": (
        lambda: _pixart(interpolation_scale=2, caption_channels=None, out_channels=4), DDIM,
        lambda: captions(6, width=12)),
    "sd3.5-dual-attention-rms-norm": (
        lambda: _sd3(dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=16), FLOW,
        lambda: prompts(6)),
    "sd3-patch-1-one-block": (lambda: _sd3(patch_size=1, num_layers=1), FLOW, lambda: prompts(6)),
    "flux-dev-no-single-blocks": (lambda: _flux(num_single_layers=0, axes_dims_rope=(4, 2, 2)), FLOW,
                                  lambda: prompts(6, guidance=3.5)),
    "flux-schnell-no-double-blocks": (lambda: _flux(num_layers=0, guidance_embeds=False), FLOW,
                                      lambda: prompts(6)),
    "dit-patch-4-1000-classes": (lambda: _dit(patch_size=4, num_embeds_ada_norm=1000), DDIM,
                                 lambda: ClassLabels([1, 400, 999, 2, 9, 0], null_class=1000)),
    "dit-patch-1-no-learned-sigma": (lambda: _dit(patch_size=1, out_channels=None, sample_size=6), DDIM,
                                     lambda: ClassLabels([1, 4, 7, 2, 9, 0], null_class=NUM_CLASSES)),
}


def _build(name: str):
    builder, sampler, source = CONFIGS[name]
    torch.manual_seed(0)
    model = builder().eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler is FLOW else DDIMScheduler()
    return model, scheduler, sampler, source()


def _recipe(sampler: SamplerConfig) -> Recipe:
    """Naive W8A8 with the attention operands quantized, calibrated and deployed at ``GUIDANCE``."""
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=8)
    config = QuantConfig.from_preset("W8A8", calibration=calibration, quantize_attention=True)
    return Recipe.from_quant_config(config, deployments=(Deployment(sampler, guidance_scale=GUIDANCE),))


def _sample(denoiser, scheduler, sampler, source, guidance: float = GUIDANCE) -> torch.Tensor:
    return api.sample(denoiser, scheduler, sampler, num_samples=3, seed=7, batch_size=3, progress=False,
                      conditions=source, guidance_scale=guidance).images


class _CallCounter:
    """Counts forward calls of a model and of every copy of it (``deepcopy`` keeps the hook, which is shared)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_args) -> None:
        self.calls += 1


# ---------------------------------------------------------------- released configurations end to end


@pytest.mark.parametrize("name", list(CONFIGS))
def test_released_configuration_quantizes_samples_and_round_trips(name, tmp_path):
    torch.set_num_threads(1)
    model, scheduler, sampler, source = _build(name)
    recipe = _recipe(sampler)
    calib = collect_calibration_set(model, adapter_for(model), scheduler, recipe.calibration, progress=False,
                                    conditions=source, guidance_scale=GUIDANCE)
    assert calib.cond.unconditional_rows is not None and bool(calib.cond.unconditional_rows.any())  # guided
    qmodel = api.quantize(model, scheduler, recipe, calibration=calib, progress=False)
    # every Linear/Conv2d has a role and is quantized (the W8A8 preset keeps none in float)
    assert len(adapter_for(model).layers(model)) == len(qmodel.plans)
    assert all(plan.quantized for plan in qmodel.plans)
    # naive W8A8 measured 37.5-40.6 dB on these tiny random models (calibration inputs, both guidance branches), as
    # on the adapter tests' configurations; an input dropped or fed wrongly, or a quantizer left uncalibrated,
    # falls far below 30 dB
    assert eps_snr_db(model, qmodel, calib) > 30.0

    images = _sample(qmodel, scheduler, sampler, source)
    assert images.shape == (3, *adapter_for(model).sample_shape(model)) and torch.isfinite(images).all()
    assert not torch.equal(images, _sample(qmodel, scheduler, sampler, source, guidance=1.0))  # guidance acts

    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert type(loaded_scheduler) is type(scheduler)
    assert torch.equal(_sample(loaded, loaded_scheduler, sampler, source), images)

    reason = _int8_w8_reason()
    if reason is not None:
        pytest.skip(f"int8 CPU backend, 8-bit weights: {reason}")
    integer = to_backend(qmodel, "int8")
    _assert_backend_agrees(integer, qmodel, model, calib)
    assert torch.isfinite(_sample(integer, scheduler, sampler, source)).all()


def _assert_backend_agrees(backend, qmodel, model, calib) -> None:
    """One network call on the calibration inputs (both guidance branches). The int8 kernels run the fake-quant
    arithmetic with exact integer sums: they differ from it by float rounding and, rarely, a code flipped at a
    rounding tie (measured 8e-6 to 1e-5 of the quantization error, in norm, on these models). A wrong zero point,
    scale or input would be as large as the quantization error itself: the difference must stay 20 dB under it.
    (Whole samples are not compared: one flip early in a trajectory moves that sample by about the quantization
    error, as tests/backends says; measured once on the compiled SD3.5 layout, one sample in three.)"""
    cond = calib.cond.without_markers()
    with torch.no_grad():
        reference = adapter_for(model).predict_eps(model, calib.x, calib.t, cond)
        fake = qmodel(calib.x, calib.t, cond)
        ran = backend(calib.x, calib.t, cond)
    assert (ran - fake).norm() < 0.1 * (fake - reference).norm()


# ---------------------------------------------------------------- conditioning inputs are read, never defaulted


def _embedding_output(network: torch.nn.Module, module_name: str, call) -> torch.Tensor:
    """The output of ``network.<module_name>`` (its first element when a tuple) during ``call()``."""
    seen = []
    handle = network.get_submodule(module_name).register_forward_hook(
        lambda _module, _args, output: seen.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("name, module_name, key, other", [
    ("pixart-alpha-1024", "adaln_single", "resolution", [512.0, 2048.0]),
    ("pixart-alpha-1024", "adaln_single", "aspect_ratio", [4.0]),  # PixArt-α's widest aspect-ratio bin
    ("flux-dev-no-single-blocks", "time_text_embed", "guidance", 1.0),
])
def test_size_conditions_and_distilled_guidance_reach_the_quantized_embedding(name, module_name, key, other):
    """PixArt-α's resolution / aspect ratio and Flux-dev's guidance scale move the quantized model's adaLN
    embedding (quantized size / guidance MLPs) as they move the FP model's: read, never dropped or defaulted.
    Calibrated on both values, as a deployment that samples both would be."""
    torch.set_num_threads(1)
    model, scheduler, sampler, source = _build(name)
    base = source(0, range(6))
    changed_value = torch.tensor(other).expand_as(base.added_cond_kwargs[key]).clone()
    changed = base.conditional_only()
    changed = dataclasses.replace(changed, added_cond_kwargs=changed.added_cond_kwargs | {key: changed_value})
    changed = dataclasses.replace(changed, unconditional=dataclasses.replace(
        base.unconditional, added_cond_kwargs=base.unconditional.added_cond_kwargs | {key: changed_value}))
    # interleaved, so that the calibration's first trajectories see both values
    both = ConditioningList(Conditioning.cat([c.rows(slice(i, i + 1)) for i in range(6) for c in (base, changed)]))
    counter = _CallCounter(model)
    qmodel = api.quantize(model, scheduler, _recipe(sampler), conditions=both, progress=False)
    assert counter.calls > 0  # the counter sees the calls of tadq.quantize's copy (the refusal tests rely on it)
    x = torch.randn(2, *adapter_for(model).sample_shape(model), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900, 300])
    conds = [c.rows(slice(0, 2)).conditional_only() for c in (base, changed)]
    fp = [_embedding_output(model, module_name, lambda c=c: adapter_for(model).predict_eps(model, x, t, c))
          for c in conds]
    quant = [_embedding_output(qmodel.model, module_name, lambda c=c: qmodel(x, t, c)) for c in conds]
    base_error = (quant[0] - fp[0]).norm()  # W8A8's error of the embedding (measured ≈ 0.6-3 % of it)
    assert (fp[1] - fp[0]).norm() > 2 * base_error  # the input moves this model's embedding beyond that error
    # the changed value is quantized as well as the base one (both calibrated; measured ratios 0.9-1.3, and 1.4-4.5
    # when the changed value was left out of the calibration), and the quantized embedding follows it: a dropped
    # input (q1 = q0 ≈ f0) or one replaced by a default lands nearer the FP embedding of the other value
    assert (quant[1] - fp[1]).norm() < 2 * base_error
    assert (quant[1] - fp[1]).norm() < (quant[1] - fp[0]).norm()
    assert (quant[0] - fp[0]).norm() < (quant[0] - fp[1]).norm()


# ---------------------------------------------------------------- refusals by name, before the model runs


REFUSED = [
    # an SD3 with a 2·C output: its first half used to be sampled as the velocity (DiT/PixArt's ε-half split)
    ("sd3-learned-variance-output", lambda: _sd3(out_channels=8), FLOW, lambda: prompts(6), NotImplementedError,
     r"SD3Transformer2DModel with out_channels=8 for in_channels=4: a flow-matching model"),
    ("dit-odd-sample-size", lambda: _dit(sample_size=7), DDIM,
     lambda: ClassLabels([1, 2], null_class=NUM_CLASSES), ValueError,
     r"sample_size 7×7, not a multiple of its patch_size 2"),
    ("pixart-odd-sample-size", lambda: _pixart(sample_size=10, patch_size=4), DDIM, lambda: captions(6),
     ValueError, r"PixArtTransformer2DModel has sample_size 10×10, not a multiple of its patch_size 4"),
    ("sd3-odd-sample-size", lambda: _sd3(sample_size=7), FLOW, lambda: prompts(6), ValueError,
     r"SD3Transformer2DModel has sample_size 7×7, not a multiple of its patch_size 2"),
    # more patches per side than SD3's position table: diffusers refused it inside the first calibration call
    ("sd3-beyond-position-table", lambda: _sd3(sample_size=16, pos_embed_max_size=4), FLOW, lambda: prompts(6),
     ValueError, r"8×8 patches of 2, but its position table \(pos_embed_max_size=4\) covers at most 4 per side"),
    ("flux-odd-latent", lambda: _flux(sample_size=6 + 1), FLOW, lambda: prompts(6, 3.5), ValueError,
     r"Flux packs 2×2 latent patches, so both latent sides must be even"),
    ("flux-fill-channels", lambda: _flux(in_channels=32, out_channels=16), FLOW, lambda: prompts(6, 3.5),
     NotImplementedError, r"in_channels=32, out_channels=16"),
    ("flux-dev-without-guidance", lambda: _flux(), FLOW, lambda: prompts(6), ValueError,
     r"lacks \['added_cond_kwargs.guidance'\]"),
    ("flux-schnell-given-guidance", lambda: _flux(guidance_embeds=False), FLOW, lambda: prompts(6, 3.5),
     ValueError, r"not \['added_cond_kwargs.guidance'\]"),
    ("pixart-alpha-1024-without-sizes", lambda: _pixart(sample_size=128, patch_size=16), DDIM, lambda: captions(6),
     ValueError, r"lacks \['added_cond_kwargs.resolution', 'added_cond_kwargs.aspect_ratio'\]"),
    ("pixart-512-given-sizes", lambda: _pixart(), DDIM, lambda: captions(6, PIXART_1024_SIZES), ValueError,
     r"not \['added_cond_kwargs.aspect_ratio', 'added_cond_kwargs.resolution'\]"),
]


@pytest.mark.parametrize("name, build, sampler, source, error, message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_layout_or_conditioning_tadq_cannot_drive_is_refused_by_name_before_the_model_runs(
        name, build, sampler, source, error, message):
    torch.manual_seed(0)
    model = build().eval()
    counter = _CallCounter(model)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler is FLOW else DDIMScheduler()
    with pytest.raises(error, match=message):
        api.quantize(model, scheduler, _recipe(sampler), conditions=source(), progress=False)
    assert counter.calls == 0, name


def test_guidance_fields_missing_from_the_unconditional_branch_are_named(monkeypatch):
    """Flux-dev's guidance given to the conditional branch only: the guidance batch cannot be formed, and the
    refusal names the field instead of a bare "different fields", before the model is copied and traced (it came
    from the first guided call, after both)."""
    torch.manual_seed(0)
    model = _flux().eval()
    monkeypatch.setattr(tadq.methods, "build_quantized_structure", None)  # nothing planned and traced before it
    message = (r"^tadq\.quantize: .*\['encoder_hidden_states', 'pooled_embeds'\] and "
               r"\['added_cond_kwargs.guidance', 'encoder_hidden_states', 'pooled_embeds'\]")
    with pytest.raises(ValueError, match=message):
        api.quantize(model, FlowMatchEulerDiscreteScheduler(shift=3.0), _recipe(FLOW),
                     conditions=prompts(6, 3.5, unconditional_guidance=False), progress=False)


NO_ADAPTER = {
    "HunyuanDiT2DModel": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                              sample_size=8, hidden_size=16, num_layers=2, cross_attention_dim=16,
                              cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=3, text_len_t5=3),
    "SanaTransformer2DModel": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1),
    "AuraFlowTransformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                       num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                       joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
                                       pos_embed_max_size=16),
    "LatteTransformer3DModel": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                    num_layers=1, cross_attention_dim=16, sample_size=8, patch_size=2,
                                    caption_channels=16, video_length=2),
    # the legacy class released DiT / PixArt-α folders name: built directly it is not remapped (tadq.models loads
    # such folders as the new classes, tests/test_models_legacy_classes.py)
    "Transformer2DModel": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=1,
                               attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=NUM_CLASSES,
                               norm_type="ada_norm_zero"),
}


@pytest.mark.parametrize("class_name", list(NO_ADAPTER))
def test_a_diffusers_transformer_without_an_adapter_is_refused_by_name_before_any_work(class_name):
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**NO_ADAPTER[class_name]).eval()
    counter = _CallCounter(model)
    with pytest.raises(TypeError, match=rf"no tadq adapter for {class_name}; supported: DiTTransformer2DModel"):
        api.quantize(model, DDIMScheduler(), _recipe(DDIM), progress=False,
                     conditions=ClassLabels([1, 2], null_class=NUM_CLASSES))
    assert counter.calls == 0


# ---------------------------------------------------------------- the compiled integer backend, on one case


@pytest.mark.slow
def test_sd35_layout_on_int8_compiled_agrees_with_fake_quant():
    """SD3.5's dual attention and RMS q/k norms through Inductor (the tiny default SD3 is compiled in
    tests/backends/test_compiled.py). Slow: compiles (≈ 70 s here)."""
    reason = _int8_w8_reason() or capability.int8_compiled_missing()
    if reason is not None:
        pytest.skip(f"int8-compiled, 8-bit weights: {reason}")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model, scheduler, sampler, source = _build("sd3.5-dual-attention-rms-norm")
    recipe = _recipe(sampler)
    calib = collect_calibration_set(model, adapter_for(model), scheduler, recipe.calibration, progress=False,
                                    conditions=source, guidance_scale=GUIDANCE)
    qmodel = api.quantize(model, scheduler, recipe, calibration=calib, progress=False)
    compiled = to_backend(qmodel, "int8-compiled")
    _assert_backend_agrees(compiled, qmodel, model, calib)
    images = _sample(compiled, scheduler, sampler, source)
    assert torch.isfinite(images).all() and images.shape == (3, 4, 8, 8)
