"""Diffusers denoiser classes and configurations beyond the ones the family tests build, run as a user runs them.

Supported configurations (``UNet2DConditionModel`` with upcast attention, an added-K/V mid block, cross-attention
only, extra time activations and 1×1 in/out convs, per-block ``cross_attention_dim`` values; ``UNet2DModel`` with
no mid block, a centred input and other time-embedding settings; SD3.5's dual attention with RMS q/k norms; Flux
schnell): quantized (naive W8A8, 2 steps, 2 trajectories) and sampled; with every quantizer bypassed the quantized
model is the diffusers model; the int8 backend runs every quantized layer as its fake-quant twin computes it.

Refused by name before the model runs: diffusers classes tadq has no adapter for, a subclass of a supported class
(diffusers' ``DreamLiteUNetModel`` builds other blocks inside a ``UNet2DConditionModel``; it used to be quantized
with most layers of role ``other`` and then refused when saved), fused q/k/v projections and attention processors
with layers of their own (Custom Diffusion; both used to fail after the calibration trajectories), cross-attentions
of different text widths, a Fourier-embedded conditional UNet, and a ``torch.compile`` wrapper (named with the
module inside).
"""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0
from packaging.version import Version
from tests.adapters.test_transformer_configs import POOLED, TEXT, _flux, _pixart, _sd3, prompts
from tests.backends.machine import int8_reason
from tests.backends.test_families import LayerAudit
from tests.conftest import build_tiny_sd_unet, build_tiny_sdxl_unet
from torch import nn

import tadq
import tadq.methods
from tadq import api, registry
from tadq.adapters import UNet2DConditionAdapter
from tadq.backends import to_backend
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant.quantizer import quantizers_bypassed
from tadq.registry import adapter_for
from tadq.sampling import Conditioning, ConditioningList, RandomClassLabels, SamplerConfig

DDIM = SamplerConfig("ddim", num_steps=2, eta=0.0)
FLOW = SamplerConfig("flow-euler", num_steps=2)
TOKENS, WIDTH = 3, 16  # text length and width of build_tiny_sd_unet
# bypassed quantizers leave the same float32 operations, some in another order (tadq's attention processor computes
# softmax(q kᵀ)·v explicitly where diffusers calls SDPA): equal to a few float32 roundings of the output's scale
FP_PATH_ULPS = 64


def _text(n: int = 4, width: int = WIDTH, labels: Callable | None = None) -> ConditioningList:
    generator = torch.Generator().manual_seed(0)
    fields = {"encoder_hidden_states": torch.randn(n, TOKENS, width, generator=generator)}
    if labels is not None:
        fields["class_labels"] = labels(n, generator)
    return ConditioningList(Conditioning(**fields))


def _pixel_unet(**overrides) -> UNet2DModel:
    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    return UNet2DModel(**(config | overrides))


def _flow() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000)


# name → (builder, scheduler, sampler, conditions, quantize_attention)
SUPPORTED = {
    "sd-upcast-attention": (lambda: build_tiny_sd_unet(upcast_attention=True), _ddim, DDIM, _text, True),
    # UnCLIP/IF's added-K/V mid block: its processor is not reproduced, so attention matmuls stay float (refused
    # with quantize_attention=True, tests/adapters/test_unet_layouts.py)
    "sd-simple-cross-attn-mid": (lambda: build_tiny_sd_unet(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), _ddim,
                                 DDIM, _text, False),
    "sd-cross-attention-only-mid-too": (
        lambda: build_tiny_sd_unet(only_cross_attention=(True, False), mid_block_only_cross_attention=True), _ddim,
        DDIM, _text, True),
    "sd-time-activations-1x1-convs": (
        lambda: build_tiny_sd_unet(time_embedding_act_fn="silu", timestep_post_act="silu", conv_in_kernel=1,
                                   conv_out_kernel=1, mid_block_type="UNetMidBlock2D"), _ddim, DDIM, _text, True),
    # the second value is read by no cross-attention (DownBlock2D, no mid block): the text width is the first's
    "sd-per-block-cross-attention-dim": (lambda: build_tiny_sd_unet(cross_attention_dim=(WIDTH, 12),
                                                                    mid_block_type=None), _ddim, DDIM, _text, True),
    "unet2d-no-mid-centred-mish": (
        lambda: _pixel_unet(mid_block_type=None, center_input_sample=True, flip_sin_to_cos=False, freq_shift=1,
                            act_fn="mish", time_embedding_dim=12), _ddim, DDIM, lambda: None, True),
    "unet2d-labels-scale-shift-resnet-resampling": (
        lambda: _pixel_unet(num_class_embeds=5, resnet_time_scale_shift="scale_shift", downsample_type="resnet",
                            upsample_type="resnet", add_attention=False), _ddim, DDIM, lambda: RandomClassLabels(5),
        True),
    "sd3.5-dual-attention-rms-norm": (
        lambda: _sd3(dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=16), _flow, FLOW,
        lambda: prompts(4), True),
    "flux-schnell": (lambda: _flux(guidance_embeds=False), _flow, FLOW, lambda: prompts(4), True),
}


def _config(sampler: SamplerConfig, quantize_attention: bool) -> QuantConfig:
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=4)
    return QuantConfig.from_preset("W8A8", calibration=calibration, method="naive", fp_layers="none",
                                   quantize_attention=quantize_attention)


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_a_supported_configuration_samples_is_the_diffusers_model_without_quantizers_and_runs_on_int8(name):
    build, scheduler_of, sampler, source, quantize_attention = SUPPORTED[name]
    torch.manual_seed(0)
    model, scheduler, conditions = build().eval(), scheduler_of(), source()
    adapter = adapter_for(model)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    roles = {info.name: info.role for info in adapter.layers(model)}
    assert set(roles) == layers and "other" not in roles.values()

    qmodel = api.quantize(model, scheduler, _config(sampler, quantize_attention), conditions=conditions,
                          progress=False)
    assert all(plan.quantized for plan in qmodel.plans)
    images = api.sample(qmodel, scheduler, sampler, num_samples=2, seed=3, progress=False,
                        conditions=conditions).images
    assert images.shape == (2, *adapter.sample_shape(model)) and torch.isfinite(images).all()

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, *adapter.sample_shape(model), generator=generator)
    t = torch.tensor([700.0, 100.0]) if sampler is FLOW else torch.tensor([700, 10])
    cond = None if conditions is None else conditions(0, [0, 1]).conditional_only()
    with torch.no_grad():
        reference = adapter.predict_eps(model, x, t, cond)
        with quantizers_bypassed(qmodel.model):
            fp_path = qmodel(x, t, cond)
        fake = qmodel(x, t, cond)
    tolerance = FP_PATH_ULPS * torch.finfo(torch.float32).eps * float(reference.abs().max())
    assert float((fp_path - reference).abs().max()) <= tolerance
    assert float((fake - reference).abs().max()) > tolerance  # the quantizers act

    reason = int8_reason(full_range=True)
    if reason is not None:
        pytest.skip(f"int8 with 8-bit weight codes: {reason}")
    integer = to_backend(qmodel, "int8")
    with LayerAudit(integer, qmodel) as audit, torch.no_grad():
        integer(x, t, cond)
    assert audit.seen == set(integer.layers["integer"]) and audit.failures == []


# ---------------------------------------------------------------- classes tadq has no adapter for


def _counting(model: nn.Module) -> list[int]:
    """A list whose length is the number of forward calls of ``model`` (and of every copy of it)."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _dreamlite() -> nn.Module:
    if Version(diffusers.__version__) < Version("0.39"):
        pytest.skip(f"diffusers {diffusers.__version__} has no DreamLiteUNetModel (0.39 and later)")
    return diffusers.DreamLiteUNetModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=WIDTH, attention_head_dim=2,
        down_block_types=("DreamLiteCrossAttnDownBlock2D", "DreamLiteDownBlock2D"),
        mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
        up_block_types=("DreamLiteUpBlock2D", "DreamLiteCrossAttnUpBlock2D"))


class _PlainSubclass(UNet2DConditionModel):
    """A user's subclass that changes nothing: refused like any unregistered class until registered."""


NO_ADAPTER = {
    "UVit2DModel": lambda: diffusers.UVit2DModel(
        hidden_size=16, cond_embed_dim=8, micro_cond_encode_dim=4, micro_cond_embed_dim=12, encoder_hidden_size=8,
        vocab_size=10, codebook_size=8, in_channels=8, block_out_channels=8, num_res_blocks=1, downsample=False,
        upsample=False, block_num_heads=2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        sample_size=4),
    "CogVideoXTransformer3DModel": lambda: diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, sample_width=8, sample_height=8,
        sample_frames=1, patch_size=2, text_embed_dim=16, time_embed_dim=8, max_text_seq_length=3),
    "UNetSpatioTemporalConditionModel": lambda: diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 32), layers_per_block=1,
        cross_attention_dim=16, num_attention_heads=(2, 2), addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
    "ControlNetModel": lambda: diffusers.ControlNetModel(
        in_channels=4, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=16, attention_head_dim=2,
        conditioning_embedding_out_channels=(4, 8)),
    "PriorTransformer": lambda: diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=4, num_layers=1, embedding_dim=8, num_embeddings=3,
        additional_embeddings=4),
    "UNet1DModel": lambda: diffusers.UNet1DModel(sample_size=16, in_channels=2, out_channels=2,
                                                 block_out_channels=(8, 16, 32), extra_in_channels=16),
    "UNet3DConditionModel": lambda: diffusers.UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
    "SD3ControlNetModel": lambda: diffusers.SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4),
}
SUPPORTED_LIST = ("supported: DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, "
                  "SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel")


@pytest.mark.parametrize("class_name", list(NO_ADAPTER))
def test_a_diffusers_class_without_an_adapter_is_refused_by_name_before_it_runs(class_name):
    torch.manual_seed(0)
    model = NO_ADAPTER[class_name]().eval()
    assert type(model).__name__ == class_name
    calls = _counting(model)
    with pytest.raises(TypeError, match=rf"^no tadq adapter for {class_name}; {SUPPORTED_LIST}\."):
        api.quantize(model, _ddim(), _config(DDIM, True), conditions=_text(), progress=False)
    with pytest.raises(TypeError, match=rf"^no tadq adapter for {class_name};"):
        api.sample(model, _ddim(), DDIM, num_samples=1, seed=0, progress=False, conditions=_text())
    assert calls == []


@pytest.mark.parametrize("build", [_dreamlite, lambda: _PlainSubclass(**build_tiny_sd_unet().config)],
                         ids=["DreamLiteUNetModel", "user-subclass"])
def test_a_subclass_of_a_supported_class_is_refused_by_name_before_it_runs(build):
    """DreamLite's depthwise-separable resnets and grouped-query attention used to be adapted as a
    UNet2DConditionModel's (60 of its layers of role ``other``, its time projections among them) and quantized,
    and then the artefact refused its class name when saved."""
    torch.manual_seed(0)
    model = build().eval()
    name = type(model).__name__
    calls = _counting(model)
    message = (rf"^no tadq adapter for {name}, a subclass of UNet2DConditionModel: .*{SUPPORTED_LIST}\. .*"
               rf"register_adapter\({name}, subfolder='unet', pipeline_class=\.\.\.\)\(UNet2DConditionAdapter\)")
    with pytest.raises(TypeError, match=message):
        api.quantize(model, _ddim(), _config(DDIM, False), conditions=_text(), progress=False)
    with pytest.raises(TypeError, match=message):
        api.sample(model, _ddim(), DDIM, num_samples=1, seed=0, progress=False, conditions=_text())
    assert calls == []


def test_a_registered_subclass_is_adapted_saved_and_loaded_as_itself(monkeypatch, tmp_path):
    """What the refusal tells a user to do works: registered with the parent's adapter, the subclass quantizes,
    and its artefact loads back as the subclass, sampling the same images."""
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry._ADAPTERS))
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    registry.register_adapter(_PlainSubclass, subfolder="unet", pipeline_class="StableDiffusionPipeline")(
        UNet2DConditionAdapter)
    torch.manual_seed(0)
    model = _PlainSubclass(**build_tiny_sd_unet().config).eval()
    scheduler, conditions = _ddim(), _text()
    qmodel = api.quantize(model, scheduler, _config(DDIM, True), conditions=conditions, progress=False)
    images = api.sample(qmodel, scheduler, DDIM, num_samples=2, seed=3, progress=False, conditions=conditions).images
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert type(loaded.model) is _PlainSubclass
    again = api.sample(loaded, loaded_scheduler, DDIM, num_samples=2, seed=3, progress=False,
                       conditions=conditions).images
    assert torch.equal(again, images)


# ---------------------------------------------------------------- layouts refused before the calibration run


def _fused(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def fused() -> nn.Module:
        model = build()
        model.fuse_qkv_projections()
        return model
    return fused


FUSED = {
    "sd": (_fused(build_tiny_sd_unet), _ddim, DDIM, _text),
    "sd3": (_fused(_sd3), _flow, FLOW, lambda: prompts(4)),
    "flux": (_fused(_flux), _flow, FLOW, lambda: prompts(4, guidance=3.5)),
    "pixart": (_fused(_pixart), _ddim, DDIM, lambda: _text(width=8)),
}


@pytest.mark.parametrize("quantize_attention", [True, False])
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_qkv_projections_are_refused_by_name_before_calibration(name, quantize_attention):
    """The fused ``to_qkv`` replaces ``to_q``/``to_k``/``to_v`` in the forward: a UNet with them was quantized
    (``to_qkv`` of role ``other``) and its FP calibration trajectories sampled, then calibration failed on
    ``to_q``'s quantizer that never saw data; with quantize_attention the refusal advised turning it off, which led
    there."""
    build, scheduler_of, sampler, source = FUSED[name]
    torch.manual_seed(0)
    model = build().eval()
    calls = _counting(model)
    with pytest.raises(NotImplementedError, match=r"has fused q/k/v projections in \d+ attention modules .*"
                                                  r"Call model\.unfuse_qkv_projections\(\) before quantizing"):
        api.quantize(model, scheduler_of(), _config(sampler, quantize_attention), conditions=source(),
                     progress=False)
    assert calls == []


@pytest.mark.parametrize(("build", "width", "named"), [
    # the mid block reads the second value: two widths, one text
    (lambda: build_tiny_sd_unet(cross_attention_dim=(WIDTH, 12)), WIDTH,
     r"cross_attention_dim=\(16, 12\): the cross-attentions read text of widths \[12, 16\]"),
    # one width given per block: text of another width was let through and failed in a matmul
    (lambda: build_tiny_sd_unet(cross_attention_dim=(12, 12)), WIDTH,
     r"encoder_hidden_states must be \(N, L, 12\), got \[\d+, 3, 16\]"),
    # UNet2DConditionModel's Fourier embedding takes the latent upscaler's log σ / 4 (no log t: the old reason)
    (lambda: build_tiny_sd_unet(time_embedding_type="fourier", time_embedding_dim=16), WIDTH,
     r"continuous noise input \(StableDiffusionLatentUpscalePipeline feeds it log σ / 4\)"),
], ids=["two-text-widths", "per-block-width-of-other-text", "fourier-time-embedding"])
def test_a_conditional_unet_layout_tadq_cannot_drive_is_refused_by_name_before_it_runs(build, width, named):
    model = build().eval()
    calls = _counting(model)
    with pytest.raises((ValueError, NotImplementedError), match=named):
        api.quantize(model, _ddim(), _config(DDIM, True), conditions=_text(width=width), progress=False)
    assert calls == []


def test_a_compiled_model_is_refused_naming_the_module_inside():
    """``torch.compile(unet)`` is an ``OptimizedModule``: refused naming the UNet it wraps and where to find it,
    instead of an unknown class name."""
    model = _pixel_unet().eval()
    calls = _counting(model)
    compiled = torch.compile(model)
    message = (r"^no tadq adapter for OptimizedModule, torch.compile's wrapper of a UNet2DModel: quantize the module "
               r"itself \(model\._orig_mod\)")
    with pytest.raises(TypeError, match=message):
        api.quantize(compiled, _ddim(), _config(DDIM, True), progress=False)
    with pytest.raises(TypeError, match=message):
        api.sample(compiled, _ddim(), DDIM, num_samples=1, seed=0, progress=False)
    assert calls == []


def _custom_diffusion(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Custom Diffusion's processor on every cross-attention (``unet.load_attn_procs`` of its weights does this):
    keys and values from its own ``to_k_custom_diffusion``/``to_v_custom_diffusion`` (``train_kv``)."""
    def adapted() -> nn.Module:
        model = build()
        processors = {}
        for name, processor in model.attn_processors.items():
            attn = model.get_submodule(name.removesuffix(".processor"))
            processors[name] = CustomDiffusionAttnProcessor2_0(
                train_kv=True, hidden_size=attn.inner_dim, cross_attention_dim=attn.cross_attention_dim
            ) if attn.is_cross_attention else processor
        model.set_attn_processor(processors)
        return model
    return adapted


CUSTOM = {
    "sd": (_custom_diffusion(build_tiny_sd_unet), _text),
    "pixart": (_custom_diffusion(_pixart), lambda: _text(width=8)),
}


@pytest.mark.parametrize("quantize_attention", [True, False])
@pytest.mark.parametrize("name", list(CUSTOM))
def test_an_attention_processor_with_its_own_layers_is_refused_by_name_before_calibration(name, quantize_attention):
    """Custom Diffusion's processor computes the cross-attention keys and values with its own layers: a UNet with
    it was planned (those layers of role ``other``), its FP calibration trajectories sampled, and calibration then
    failed on ``attn2.to_k``'s observer, which saw no data; PixArt's refusal named only the layers."""
    build, source = CUSTOM[name]
    torch.manual_seed(0)
    model = build().eval()
    calls = _counting(model)
    message = (r"runs attention processors with layers of their own: CustomDiffusionAttnProcessor2_0 \(e\.g\. "
               r".*attn2\.processor\)\. .*model\.set_default_attn_processor\(\)")
    with pytest.raises(NotImplementedError, match=message):
        api.quantize(model, _ddim(), _config(DDIM, quantize_attention), conditions=source(), progress=False)
    assert calls == []


def test_a_data_parallel_model_is_refused_naming_the_module_inside():
    """``nn.DataParallel(unet)`` was refused as an unknown class with the list of supported ones, not naming the
    UNet it wraps nor ``model.module``."""
    model = _pixel_unet().eval()
    calls = _counting(model)
    wrapped = torch.nn.DataParallel(model)
    message = r"^no tadq adapter for DataParallel, a wrapper of a UNet2DModel: pass the module itself \(model\.module"
    with pytest.raises(TypeError, match=message):
        api.quantize(wrapped, _ddim(), _config(DDIM, True), progress=False)
    with pytest.raises(TypeError, match=message):
        api.sample(wrapped, _ddim(), DDIM, num_samples=1, seed=0, progress=False)
    assert calls == []


def _flux_text(n: int = 4, **extra) -> ConditioningList:
    """Flux-schnell's text states and pooled embedding, with ``extra`` fields."""
    generator = torch.Generator().manual_seed(0)
    return ConditioningList(Conditioning(encoder_hidden_states=torch.randn(n, TOKENS, TEXT, generator=generator),
                                         pooled_embeds=torch.randn(n, POOLED, generator=generator), **extra))


# name → (builder, scheduler, sampler, conditions, the refusal after "this <class> ")
UNFIT_FIELDS = {
    # an SD pipeline's prompts for an SDXL UNet: no pooled text, no time ids
    "sdxl-without-pooled-text": (
        build_tiny_sdxl_unet, _ddim, DDIM, lambda: _text(),
        r"needs .*; the conditioning lacks \['pooled_embeds', 'added_cond_kwargs\.time_ids'\]"),
    # a text UNet with a class table given text alone
    "class-table-without-labels": (lambda: build_tiny_sd_unet(num_class_embeds=5), _ddim, DDIM, lambda: _text(),
                                   r"needs .*; the conditioning lacks \['class_labels'\]"),
    # a text UNet given class labels alone
    "text-unet-given-labels": (build_tiny_sd_unet, _ddim, DDIM, lambda: RandomClassLabels(5),
                               r"needs .*; the conditioning lacks \['encoder_hidden_states'\]"),
    # labels next to the text of a UNet without a class embedding
    "text-unet-given-text-and-labels": (build_tiny_sd_unet, _ddim, DDIM,
                                        lambda: _text(labels=lambda n, g: torch.randint(0, 5, (n,), generator=g)),
                                        r"takes \['encoder_hidden_states'\] \(and optionally \['attention_mask'\]\), "
                                        r"not \['class_labels'\]"),
    # a T5 padding mask for Flux, whose attention takes none
    "flux-given-a-text-mask": (lambda: _flux(guidance_embeds=False), _flow, FLOW,
                               lambda: _flux_text(attention_mask=torch.ones(4, TOKENS)),
                               r"takes \['encoder_hidden_states', 'pooled_embeds'\], not \['attention_mask'\]"),
}


@pytest.mark.parametrize("name", list(UNFIT_FIELDS))
def test_conditions_lacking_a_field_or_carrying_another_are_refused_before_the_model_is_copied(name, monkeypatch):
    """Refused by the first forward of the calibration run, after the model had been copied, planned and traced
    (seconds on the tiny models, minutes for an SDXL or Flux): now named by ``tadq.quantize`` before any of that."""
    build, scheduler_of, sampler, source, refusal = UNFIT_FIELDS[name]
    torch.manual_seed(0)
    model = build().eval()
    monkeypatch.setattr(api, "place_model", None)  # nothing may be copied (dtype=) before the refusal
    monkeypatch.setattr(tadq.methods, "build_quantized_structure", None)  # nor planned and traced
    with pytest.raises(ValueError, match=rf"^tadq\.quantize: this {type(model).__name__} {refusal}"):
        api.quantize(model, scheduler_of(), _config(sampler, True), conditions=source(), progress=False,
                     dtype=torch.float64)
