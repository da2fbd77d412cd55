"""The SD3 and Flux adapters on tiny random diffusers MMDiTs: roles (every layer, refusal by name), units, the
model's own output (Flux packed/unpacked), the conditioning contract, the quantized joint/Flux attention
processors against diffusers' own, flow-matching only, and the public API end to end (naive W8A8 vs W4A4, guided
flow-euler sampling, save/load, a short Q-Diffusion)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from tests.adapters.snr import eps_snr_db
from torch import nn

import tadq
from tadq import api
from tadq.adapters import TEMPORAL_ROLES
from tadq.adapters.mmdit import QuantFluxAttnProcessor, QuantJointAttnProcessor
from tadq.calibration import collect_calibration_set
from tadq.calibration.capture import unit_output
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant.attention import install_attention_quantizers
from tadq.quant.qscheme import QScheme
from tadq.registry import adapter_for, model_family
from tadq.sampling import Conditioning, ConditioningList, SamplerConfig
from tadq.tfmq.tib import TemporalInformationBlock

TOKENS, TEXT, POOLED = 3, 16, 8  # text length, joint_attention_dim, pooled_projection_dim of the tiny models
GUIDANCE = 3.0
SAMPLER = SamplerConfig("flow-euler", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=8)


def build_tiny_sd3(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """SD3 at test size: 8x8x4 latents, 2x2 patches, two joint blocks of width 16 (the last context_pre_only)."""
    torch.manual_seed(seed)
    config = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=TEXT, caption_projection_dim=16,
                  pooled_projection_dim=POOLED, out_channels=4)
    return SD3Transformer2DModel(**(config | overrides)).eval()


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxTransformer2DModel:
    """Flux at test size: 4-channel 8x8 latents packed 2x2 (in_channels 16), one joint and one single block of
    width 16, rotary axes (2, 2, 4); ``sample_size`` registered so the adapter knows the latent side."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT,
                                   pooled_projection_dim=POOLED, guidance_embeds=guidance_embeds,
                                   axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8)
    return model.eval()


def prompts(n: int, seed: int = 0, guidance: float | None = None) -> Conditioning:
    """n random text embeddings (states and pooled) with a zero (empty prompt) unconditional branch; Flux's distilled
    guidance scale in both branches when given."""
    generator = torch.Generator().manual_seed(seed)
    added = {} if guidance is None else {"guidance": torch.full((n,), guidance)}
    return Conditioning(encoder_hidden_states=torch.randn(n, TOKENS, TEXT, generator=generator),
                        pooled_embeds=torch.randn(n, POOLED, generator=generator), added_cond_kwargs=added,
                        unconditional=Conditioning(encoder_hidden_states=torch.zeros(n, TOKENS, TEXT),
                                                   pooled_embeds=torch.zeros(n, POOLED), added_cond_kwargs=added))


def _setup(which: str):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if which == "sd3":
        return build_tiny_sd3(), scheduler, ConditioningList(prompts(6, seed=1))
    return build_tiny_flux(), scheduler, ConditioningList(prompts(6, seed=1, guidance=3.5))


def _quant_config(preset: str, method: str = "naive", **overrides) -> QuantConfig:
    config = QuantConfig.from_preset(preset, calibration=CALIB, method=method, **overrides)
    return dataclasses.replace(config, reconstruction=dataclasses.replace(
        config.reconstruction, weight_iters=2, activation_iters=2, batch_size=4))


def _sample(denoiser, scheduler, source, guidance: float = GUIDANCE, num_samples: int = 3, batch_size: int = 3):
    return api.sample(denoiser, scheduler, SAMPLER, num_samples=num_samples, seed=7, batch_size=batch_size,
                      progress=False, conditions=source, guidance_scale=guidance).images


@pytest.fixture(scope="module", params=["sd3", "flux"])
def quantized(request):
    """(which, FP model, scheduler, conditions, calibration set, {preset: naive model}) per model family."""
    torch.set_num_threads(1)
    model, scheduler, source = _setup(request.param)
    calib = collect_calibration_set(model, adapter_for(model), scheduler, CALIB, progress=False,
                                    conditions=source, guidance_scale=GUIDANCE)
    naive = {preset: api.quantize(model, scheduler, _quant_config(preset, quantize_attention=True),
                                  calibration=calib, progress=False) for preset in ("W8A8", "W4A4")}
    return request.param, model, scheduler, source, calib, naive


# ---------------------------------------------------------------- structure


SD3_ROLES = {
    "pos_embed.proj": "input_conv", "time_text_embed.timestep_embedder.linear_1": "time_embedding",
    "time_text_embed.text_embedder.linear_2": "added_embedding", "context_embedder": "caption_projection",
    "transformer_blocks.0.norm1.linear": "time_projection", "transformer_blocks.0.norm1_context.linear":
    "time_projection", "transformer_blocks.1.norm1_context.linear": "time_projection",
    "transformer_blocks.0.attn.to_q": "attention_qkv", "transformer_blocks.0.attn.add_k_proj": "attention_qkv",
    "transformer_blocks.0.attn.add_v_proj": "attention_qkv", "transformer_blocks.0.attn.to_out.0": "attention_out",
    "transformer_blocks.0.attn.to_add_out": "attention_out", "transformer_blocks.0.ff.net.0.proj": "feed_forward",
    "transformer_blocks.0.ff_context.net.2": "feed_forward", "transformer_blocks.1.ff.net.2": "feed_forward",
    "norm_out.linear": "time_projection", "proj_out": "output_conv",
}
FLUX_ROLES = {
    "x_embedder": "input_conv", "time_text_embed.timestep_embedder.linear_2": "time_embedding",
    "time_text_embed.guidance_embedder.linear_1": "added_embedding",
    "time_text_embed.text_embedder.linear_1": "added_embedding", "context_embedder": "caption_projection",
    "transformer_blocks.0.norm1.linear": "time_projection", "transformer_blocks.0.norm1_context.linear":
    "time_projection", "transformer_blocks.0.attn.add_q_proj": "attention_qkv",
    "transformer_blocks.0.attn.to_v": "attention_qkv", "transformer_blocks.0.attn.to_add_out": "attention_out",
    "transformer_blocks.0.ff_context.net.0.proj": "feed_forward", "single_transformer_blocks.0.norm.linear":
    "time_projection", "single_transformer_blocks.0.attn.to_k": "attention_qkv",
    "single_transformer_blocks.0.proj_mlp": "feed_forward", "single_transformer_blocks.0.proj_out": "attention_out",
    "norm_out.linear": "time_projection", "proj_out": "output_conv",
}


@pytest.mark.parametrize("build, expected, units", [
    (build_tiny_sd3, SD3_ROLES, ["pos_embed.proj", "time_text_embed.timestep_embedder",
                                 "time_text_embed.text_embedder", "context_embedder", "transformer_blocks.0",
                                 "transformer_blocks.1", "norm_out.linear", "proj_out"]),
    (build_tiny_flux, FLUX_ROLES, ["x_embedder", "time_text_embed.timestep_embedder",
                                   "time_text_embed.guidance_embedder", "time_text_embed.text_embedder",
                                   "context_embedder", "transformer_blocks.0", "single_transformer_blocks.0",
                                   "norm_out.linear", "proj_out"]),
    (lambda: build_tiny_flux(guidance_embeds=False), {"x_embedder": "input_conv"},
     ["x_embedder", "time_text_embed.timestep_embedder", "time_text_embed.text_embedder", "context_embedder",
      "transformer_blocks.0", "single_transformer_blocks.0", "norm_out.linear", "proj_out"]),
])
def test_every_layer_has_a_role_and_blocks_are_units(build, expected, units):
    model = build()
    adapter = adapter_for(model)
    infos = adapter.layers(model)
    roles = {info.name: info.role for info in infos}
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(roles) == layers and "other" not in roles.values()
    assert {name: roles[name] for name in expected} == expected
    block_of = {info.name: info.block for info in infos}
    assert block_of["transformer_blocks.0.attn.add_q_proj"] == block_of["transformer_blocks.0.ff.net.2"] == \
        block_of["transformer_blocks.0.norm1_context.linear"] == "transformer_blocks.0"
    assert adapter.blocks(model) == units
    assert adapter.concat_splits(model) == {}
    assert adapter.sample_shape(model) == (4, 8, 8)
    assert {role for role in roles.values() if role in TEMPORAL_ROLES} == {"time_embedding", "added_embedding",
                                                                           "time_projection"}
    assert "cross_attention_kv" not in roles.values()  # the text stream is modulated by t: nothing constant


@pytest.mark.parametrize("build", [build_tiny_sd3, build_tiny_flux])
def test_a_layer_without_a_rule_is_refused_by_name(build):
    model = build()
    model.transformer_blocks[0].stray = nn.Linear(4, 4)
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.stray"):
        adapter_for(model).layers(model)


def test_families_registered_with_their_pipelines_and_tfmq_refused():
    assert model_family("SD3Transformer2DModel").pipeline_for({}) == "StableDiffusion3Pipeline"
    assert model_family("FluxTransformer2DModel").pipeline_for({}) == "FluxPipeline"
    assert model_family("FluxTransformer2DModel").subfolder == "transformer"
    for model in (build_tiny_sd3(), build_tiny_flux()):
        with pytest.raises(TypeError, match="declares no temporal path"):
            TemporalInformationBlock(model, adapter_for(model))


def test_flux_latent_size_defaults_to_flux1_and_odd_layouts_are_refused():
    model = build_tiny_flux()
    model.register_to_config(sample_size=None)
    assert adapter_for(model).sample_shape(model) == (4, 128, 128)
    model.register_to_config(out_channels=8)
    with pytest.raises(NotImplementedError, match="out_channels=8"):
        adapter_for(model).sample_shape(model)


# ---------------------------------------------------------------- forward and conditioning contract


def test_sd3_forward_is_the_model_output():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 975.0])
    cond = prompts(2).conditional_only()
    model = build_tiny_sd3()
    with torch.no_grad():
        direct = model(x, encoder_hidden_states=cond.encoder_hidden_states, pooled_projections=cond.pooled_embeds,
                       timestep=t).sample
        assert torch.equal(adapter_for(model).predict_eps(model, x, t, cond), direct)


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_flux_forward_packs_like_the_pipeline_and_unpacks_the_velocity(guidance_embeds):
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 975.0])
    cond = prompts(2, guidance=3.5 if guidance_embeds else None).conditional_only()
    model = build_tiny_flux(guidance_embeds=guidance_embeds)
    with torch.no_grad():
        packed = FluxPipeline._pack_latents(x, 2, 4, 8, 8)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, x.device, x.dtype)
        direct = model(packed, encoder_hidden_states=cond.encoder_hidden_states,
                       pooled_projections=cond.pooled_embeds, timestep=t / 1000,
                       guidance=cond.added_cond_kwargs.get("guidance"), img_ids=ids,
                       txt_ids=torch.zeros(TOKENS, 3)).sample
        expected = FluxPipeline._unpack_latents(direct, 64, 64, 8)  # 8x8 latent = 64 px at the VAE's factor 8
        assert torch.equal(adapter_for(model).predict_eps(model, x, t, cond), expected)


def test_conditioning_mismatches_are_refused_in_the_conditioning_terms():
    sd3, flux = build_tiny_sd3(), build_tiny_flux()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    good = prompts(2).conditional_only()
    with pytest.raises(ValueError, match="needs conditioning"):
        adapter_for(sd3).predict_eps(sd3, x, t)
    with pytest.raises(ValueError, match=r"lacks \['added_cond_kwargs.guidance'\]"):
        adapter_for(flux).predict_eps(flux, x, t, good)
    with pytest.raises(ValueError, match=r"not \['added_cond_kwargs.guidance'\]"):
        adapter_for(sd3).predict_eps(sd3, x, t, prompts(2, guidance=3.5).conditional_only())
    with pytest.raises(ValueError, match=r"pooled_embeds must be \(N, 8\)"):
        adapter_for(sd3).predict_eps(sd3, x, t, dataclasses.replace(good, pooled_embeds=torch.randn(2, 5)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(N, L, 16\)"):
        adapter_for(sd3).predict_eps(sd3, x, t, dataclasses.replace(good, encoder_hidden_states=torch.randn(2, 3, 4)))


def test_unit_output_keeps_both_streams_of_a_block():
    text, image = torch.randn(2, 3, 16), torch.randn(2, 16, 16)
    assert torch.equal(unit_output((text, image)), torch.cat([text, image], dim=1))
    assert unit_output((None, image)) is image  # SD3's last block: no text stream
    assert unit_output((torch.randn(2, 3), image)).shape == (2, 3 + 16 * 16)
    with pytest.raises(TypeError):
        unit_output((None, None))


# ---------------------------------------------------------------- attention processors and flow-only sampling


def test_quant_processors_match_diffusers_own():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 975.0])
    cases = [(build_tiny_sd3(), prompts(2).conditional_only(), QuantJointAttnProcessor),
             (build_tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,)), prompts(2).conditional_only(),
              QuantJointAttnProcessor),
             (build_tiny_flux(), prompts(2, guidance=3.5).conditional_only(), QuantFluxAttnProcessor)]
    for model, cond, processor in cases:
        adapter = adapter_for(model)
        with torch.no_grad():
            reference = adapter.predict_eps(model, x, t, cond)  # diffusers' JointAttnProcessor2_0 / FluxAttnProcessor
            names = adapter.attention_modules(model)
            for name in names:
                attn = model.get_submodule(name)
                install_attention_quantizers(attn, QScheme.off(), 16, adapter.quant_attention_processor(name, attn))
            assert {type(model.get_submodule(name).processor) for name in names} == {processor}
            ours = adapter.predict_eps(model, x, t, cond)
        assert torch.allclose(ours, reference, rtol=0, atol=64 * torch.finfo(torch.float32).eps *
                              float(reference.abs().max()))
    assert "transformer_blocks.0.attn2" in adapter_for(cases[1][0]).attention_modules(cases[1][0])


def test_an_attention_processor_tadq_cannot_quantize_is_refused_by_name():
    model, scheduler, source = _setup("sd3")
    model.transformer_blocks[1].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.1\.attn runs AttnProcessor2_0"):
        api.quantize(model, scheduler, _quant_config("W8A8", quantize_attention=True), conditions=source,
                     progress=False)


def test_flow_models_are_sampled_by_flow_euler_only():
    model, scheduler, source = _setup("sd3")
    with pytest.raises(NotImplementedError, match="use flow-euler"):
        api.sample(model, scheduler, SamplerConfig("ddim", num_steps=4), num_samples=1, seed=0, progress=False,
                   conditions=source)
    with pytest.raises(NotImplementedError, match="SD3Transformer2DModel is a flow-matching model"):
        api.sample(model, DDIMScheduler(), SamplerConfig("ddim", num_steps=4), num_samples=1, seed=0,
                   progress=False, conditions=source)
    flux = build_tiny_flux()
    with pytest.raises(NotImplementedError, match="FluxTransformer2DModel is a flow-matching model"):
        collect_calibration_set(flux, adapter_for(flux), DDIMScheduler(), dataclasses.replace(
            CALIB, sampler=SamplerConfig("ddim", num_steps=4)), progress=False)


# ---------------------------------------------------------------- end to end through the public API


def test_naive_w8a8_is_close_to_fp_and_w4a4_is_worse(quantized):
    which, model, _, _, calib, naive = quantized
    assert all(plan.quantized for plan in naive["W8A8"].plans)
    network = naive["W8A8"].model
    expected = QuantJointAttnProcessor if which == "sd3" else QuantFluxAttnProcessor
    assert {type(network.get_submodule(name).processor)
            for name in adapter_for(model).attention_modules(model)} == {expected}
    w8a8, w4a4 = (eps_snr_db(model, naive[preset], calib) for preset in ("W8A8", "W4A4"))
    # measured on these tiny random models (calibration inputs, both guidance branches): SD3 W8A8 ≈ 39.6 dB, W4A8 ≈
    # 22.4 dB, W4A4 ≈ 16.8 dB; Flux 38.6 / 22.3 / 15.5 dB (the attention matmuls change these by < 0.1 dB here); a
    # quantizer left uncalibrated or an input fed wrongly falls far below 30 dB, quantizers that do not act give no
    # gap between the presets
    assert w8a8 > 30.0, (which, w8a8)
    assert w4a4 < w8a8 - 12.0, (which, w4a4, w8a8)
    # the attention matmul quantizers act: diffusers' own processor on the same quantized layers gives another output
    q4 = naive["W4A4"]
    cond = calib.cond.without_markers().rows(slice(0, 4))
    with torch.no_grad():
        quantized_attention = q4(calib.x[:4], calib.t[:4], cond)
        for name in adapter_for(model).attention_modules(model):
            q4.model.get_submodule(name).set_processor(type(model.get_submodule(name).processor)())
        float_attention = q4(calib.x[:4], calib.t[:4], cond)
        for name in adapter_for(model).attention_modules(model):
            q4.model.get_submodule(name).set_processor(expected())
    assert not torch.allclose(quantized_attention, float_attention, atol=1e-4)


def test_guided_flow_sampling_and_save_load_are_bit_identical(quantized, tmp_path):
    which, model, scheduler, source, _, naive = quantized
    qmodel = naive["W8A8"]
    images = _sample(qmodel, scheduler, source)
    assert torch.isfinite(images).all() and images.shape == (3, 4, 8, 8)
    assert not torch.equal(images, _sample(model, scheduler, source))  # the quantizers act
    assert not torch.equal(images, _sample(qmodel, scheduler, source, guidance=1.0))  # and guidance does
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    index = json.loads((tmp_path / "artefact" / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusion3Pipeline" if which == "sd3" else "FluxPipeline")
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert isinstance(loaded_scheduler, FlowMatchEulerDiscreteScheduler)
    assert torch.equal(_sample(loaded, loaded_scheduler, source), images)


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_short_qdiffusion_reconstructs_the_blocks(which, tmp_path):
    model, scheduler, source = _setup(which)
    qmodel = api.quantize(model, scheduler, _quant_config("W4A8", "qdiffusion", quantize_attention=True),
                          conditions=source, progress=False)
    units = [report.unit for report in qmodel.reconstruction_report if report.phase == "weights"]
    assert units == adapter_for(model).blocks(model)
    blocks = {"sd3": {"transformer_blocks.0", "transformer_blocks.1"},
              "flux": {"transformer_blocks.0", "single_transformer_blocks.0"}}[which]
    assert blocks <= set(units)
    images = _sample(qmodel, scheduler, source)
    assert torch.isfinite(images).all()
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler, source), images)


def test_float16_joint_attention_scores_that_overflow_before_the_scale_stay_finite():
    """The MMDiT processors' Q·Kᵀ was formed in float16 before the 1/√d scale: an SD3 model without qk norms in
    float16 got inf scores and NaN where SDPA stays finite. A float16 model's scores are computed in float32."""
    from tadq.adapters.mmdit import _quantized_attention

    attn = nn.Module()
    attn.q_quantizer, attn.k_quantizer, attn.v_quantizer = nn.Identity(), nn.Identity(), nn.Identity()
    attn.softmax_quantizer = nn.Identity()
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 6, 4, generator=generator) * 200 for _ in range(3))
    assert (query @ key.transpose(-1, -2)).abs().max() > torch.finfo(torch.float16).max
    reference = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    out = _quantized_attention(attn, query.half(), key.half(), value.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    bound = 16 * torch.finfo(torch.float16).eps * float(reference.abs().max())
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=bound)


def test_flux_tables_are_keyed_to_the_distilled_guidance_their_conditions_embed(tmp_path):
    """tadq.quantize records the distilled guidance the conditions embed (as ``tadq quantize`` does), and
    tadq.sample refuses conditions embedding another one for a model with fitted tables, before any step, also
    after a save and load; the Python API recorded none, so tables fitted at 3.5 sampled at 7 without a word."""
    from tadq.corrections import TACConfig
    from tadq.recipe import Deployment, NaiveMethod, Recipe

    torch.set_num_threads(1)
    model, scheduler = build_tiny_flux(), FlowMatchEulerDiscreteScheduler(shift=3.0)
    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),),
                                corrections=(TACConfig(num_samples=4, seed=1),))
    qmodel = api.quantize(model, scheduler, recipe, progress=False,
                          conditions=ConditioningList(prompts(4, seed=1, guidance=3.5)))
    assert qmodel.recipe.deployments[0].distilled_guidance == 3.5
    qmodel.save_pretrained(tmp_path / "q", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "q")
    for denoiser, schedule in ((qmodel, scheduler), (loaded, loaded_scheduler)):
        api.sample(denoiser, schedule, SAMPLER, num_samples=1, seed=7, progress=False,
                   conditions=ConditioningList(prompts(2, seed=2, guidance=3.5)))
        with pytest.raises(ValueError, match="fitted at the distilled guidance 3.5"):
            api.sample(denoiser, schedule, SAMPLER, num_samples=1, seed=7, progress=False,
                       conditions=ConditioningList(prompts(2, seed=2, guidance=7.0)))
    other = dataclasses.replace(recipe, deployments=(Deployment(SAMPLER, distilled_guidance=7.0),))
    with pytest.raises(ValueError, match="distilled_guidance=7 but the conditions embed guidance 3.5"):
        api.quantize(model, scheduler, other, progress=False,
                     conditions=ConditioningList(prompts(4, seed=1, guidance=3.5)))
