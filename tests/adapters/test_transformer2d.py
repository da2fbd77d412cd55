"""The DiT and PixArt adapters on tiny random diffusers transformers: roles (every layer, refusal by name), units,
the ε half of a learned-variance output, the conditioning contract, attention processing and the caption K/V memo,
and the public API end to end (naive W8A8 vs W4A4, guided sampling, save/load, a short Q-Diffusion)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from tests.adapters.snr import eps_snr_db
from torch import nn

import tadq
from tadq import api
from tadq.adapters import TEMPORAL_ROLES
from tadq.calibration import collect_calibration_set
from tadq.config import FP_LAYER_PRESETS, CalibrationConfig, QuantConfig
from tadq.models import load_pipeline_parts
from tadq.quant.attention import cross_attention_projections, install_attention_quantizers
from tadq.quant.qscheme import QScheme
from tadq.registry import adapter_for, model_family
from tadq.sampling import ClassLabels, Conditioning, ConditioningList, SamplerConfig
from tadq.tfmq.tib import TemporalInformationBlock

NUM_CLASSES = 10  # the tiny DiT's K; K is also its null class
TOKENS, CAPTION = 3, 16  # caption length L and T5-like width (caption_channels) of the tiny PixArt
GUIDANCE = 3.0
SAMPLER = SamplerConfig("ddim", num_steps=4, eta=0.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=8)


def build_tiny_dit(seed: int = 0, **overrides) -> DiTTransformer2DModel:
    """DiT at test size: 8x8x4 latents, 2x2 patches, two adaLN-Zero blocks of width 16, learned variance (8 out)."""
    torch.manual_seed(seed)
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=8,
                  num_attention_heads=2, num_embeds_ada_norm=NUM_CLASSES)
    return DiTTransformer2DModel(**(config | overrides)).eval()


def build_tiny_pixart(seed: int = 0, **overrides) -> PixArtTransformer2DModel:
    """PixArt at test size: width 12 (divisible by 3 for the size embedders), caption projection 16 → 12,
    learned sigma (8 out channels); ``use_additional_conditions`` off unless overridden (sample_size ≠ 128)."""
    torch.manual_seed(seed)
    config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=6,
                  num_attention_heads=2, cross_attention_dim=12, caption_channels=CAPTION, norm_num_groups=1)
    return PixArtTransformer2DModel(**(config | overrides)).eval()


def captions(n: int, seed: int = 0, sizes: bool = False) -> Conditioning:
    """n random caption embeddings with a zero (empty prompt) unconditional branch; with ``sizes`` PixArt-α's
    resolution and aspect-ratio conditions (the same in both branches)."""
    generator = torch.Generator().manual_seed(seed)
    added = {"resolution": torch.tensor([[8.0, 8.0]]).repeat(n, 1), "aspect_ratio": torch.ones(n, 1)} if sizes else {}
    return Conditioning(encoder_hidden_states=torch.randn(n, TOKENS, CAPTION, generator=generator),
                        added_cond_kwargs=added,
                        unconditional=Conditioning(encoder_hidden_states=torch.zeros(n, TOKENS, CAPTION),
                                                   added_cond_kwargs=added))


def labels_source(labels=(1, 4, 7, 2, 9, 0)) -> ClassLabels:
    return ClassLabels(labels, null_class=NUM_CLASSES)


def _quant_config(preset: str, method: str = "naive", **overrides) -> QuantConfig:
    config = QuantConfig.from_preset(preset, calibration=CALIB, method=method, **overrides)
    return dataclasses.replace(config, reconstruction=dataclasses.replace(
        config.reconstruction, weight_iters=2, activation_iters=2, batch_size=4))


def _sample(denoiser, scheduler, source, guidance: float = GUIDANCE, num_samples: int = 3, batch_size: int = 3):
    return api.sample(denoiser, scheduler, SAMPLER, num_samples=num_samples, seed=7, batch_size=batch_size,
                      progress=False, conditions=source, guidance_scale=guidance).images


def _setup(which: str) -> tuple[nn.Module, DDIMScheduler, object]:
    if which == "dit":
        return build_tiny_dit(), DDIMScheduler(num_train_timesteps=1000), labels_source()
    return build_tiny_pixart(), DDIMScheduler(num_train_timesteps=1000), ConditioningList(captions(6, seed=1))


@pytest.fixture(scope="module", params=["dit", "pixart"])
def quantized(request):
    """(which, FP model, scheduler, conditions, calibration set, {preset: naive model}) per model family."""
    torch.set_num_threads(1)
    model, scheduler, source = _setup(request.param)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False,
                                    conditions=source, guidance_scale=GUIDANCE)
    naive = {preset: api.quantize(model, scheduler, _quant_config(preset, quantize_attention=True),
                                  calibration=calib, progress=False) for preset in ("W8A8", "W4A4")}
    return request.param, model, scheduler, source, calib, naive


# ---------------------------------------------------------------- structure


DIT_ROLES = {
    "pos_embed.proj": "input_conv", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1": "time_embedding",
    "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2": "time_embedding",
    "transformer_blocks.0.norm1.linear": "time_projection", "transformer_blocks.0.attn1.to_q": "attention_qkv",
    "transformer_blocks.0.attn1.to_k": "attention_qkv", "transformer_blocks.0.attn1.to_v": "attention_qkv",
    "transformer_blocks.0.attn1.to_out.0": "attention_out", "transformer_blocks.1.ff.net.0.proj": "feed_forward",
    "transformer_blocks.1.ff.net.2": "feed_forward", "proj_out_1": "time_projection", "proj_out_2": "output_conv",
}
PIXART_ROLES = {
    "pos_embed.proj": "input_conv", "adaln_single.emb.timestep_embedder.linear_1": "time_embedding",
    "adaln_single.linear": "time_projection", "caption_projection.linear_1": "caption_projection",
    "caption_projection.linear_2": "caption_projection", "transformer_blocks.0.attn1.to_k": "attention_qkv",
    "transformer_blocks.0.attn2.to_q": "attention_qkv", "transformer_blocks.0.attn2.to_k": "cross_attention_kv",
    "transformer_blocks.0.attn2.to_v": "cross_attention_kv", "transformer_blocks.1.attn2.to_out.0": "attention_out",
    "transformer_blocks.1.ff.net.2": "feed_forward", "proj_out": "output_conv",
}


@pytest.mark.parametrize("build, expected, units", [
    (build_tiny_dit, DIT_ROLES, ["pos_embed.proj", "transformer_blocks.0", "transformer_blocks.1", "proj_out_1",
                                 "proj_out_2"]),
    (build_tiny_pixart, PIXART_ROLES, ["pos_embed.proj", "adaln_single.emb.timestep_embedder", "adaln_single.linear",
                                       "caption_projection", "transformer_blocks.0", "transformer_blocks.1",
                                       "proj_out"]),
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
    assert block_of["transformer_blocks.1.attn1.to_q"] == block_of["transformer_blocks.1.ff.net.2"] == \
        "transformer_blocks.1"
    assert adapter.blocks(model) == units  # forward order: PixArt registers adaln_single after the blocks
    assert adapter.concat_splits(model) == {}
    assert adapter.sample_shape(model) == (4, 8, 8)
    # the temporal path and the FP presets find the transformers' timestep MLPs and modulations by role
    temporal = {role for role in roles.values() if role in TEMPORAL_ROLES}
    assert temporal == {"time_embedding", "time_projection"}
    assert set(FP_LAYER_PRESETS["first_last_time"]) <= set(roles.values())


def test_pixart_size_conditions_are_added_embeddings():
    model = build_tiny_pixart(use_additional_conditions=True)
    adapter = adapter_for(model)
    roles = {info.name: info.role for info in adapter.layers(model)}
    assert roles["adaln_single.emb.resolution_embedder.linear_1"] == "added_embedding"
    assert roles["adaln_single.emb.aspect_ratio_embedder.linear_2"] == "added_embedding"
    assert adapter.conditioning_inputs(model) == ("encoder_hidden_states", "added_cond_kwargs.resolution",
                                                  "added_cond_kwargs.aspect_ratio")
    assert adapter.blocks(model).index("adaln_single.emb.aspect_ratio_embedder") < \
        adapter.blocks(model).index("transformer_blocks.0")


@pytest.mark.parametrize("build", [build_tiny_dit, build_tiny_pixart])
def test_a_layer_without_a_rule_is_refused_by_name(build):
    model = build()
    model.transformer_blocks[1].stray = nn.Linear(4, 4)  # an unfamiliar part of a block
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.1\.stray"):
        adapter_for(model).layers(model)


def test_families_registered_with_their_pipelines():
    assert model_family("DiTTransformer2DModel").pipeline_for({}) == "DiTPipeline"
    assert model_family("PixArtTransformer2DModel").pipeline_for({}) == "PixArtAlphaPipeline"
    assert model_family("DiTTransformer2DModel").subfolder == "transformer"


def test_tfmq_refuses_pixart():
    model = build_tiny_pixart()
    with pytest.raises(TypeError, match="declares no temporal path"):
        TemporalInformationBlock(model, adapter_for(model))


def test_dit_temporal_features_equal_what_the_forward_computes():
    """The TIB of a DiT (every adaLN modulation, run on (t, y) alone) is bit-identical to the outputs of those
    layers inside a full forward on any x."""
    model = build_tiny_dit()
    tib = TemporalInformationBlock(model, adapter_for(model))
    assert [f.layer for f in tib.features] == [f"transformer_blocks.{i}.norm1.linear"
                                               for i in range(len(model.transformer_blocks))] + ["proj_out_1"]
    assert tib.num_labels == NUM_CLASSES + 1  # the null class has its own table row
    t, labels = torch.tensor([3, 500, 999]), torch.tensor([0, 7, NUM_CLASSES])
    seen = {}
    hooks = [model.get_submodule(f.layer).register_forward_hook(
        lambda _m, _a, out, name=f.layer: seen.__setitem__(name, out)) for f in tib.features]
    with torch.no_grad():
        model(torch.randn(3, 4, 8, 8), timestep=t, class_labels=labels)
        features = tib(t, labels)
    for hook in hooks:
        hook.remove()
    for feature, value in zip(tib.features, features, strict=True):
        assert torch.equal(value, seen[feature.layer]), feature.layer
    with pytest.raises(ValueError, match="class labels"):
        tib(t, None)


# ---------------------------------------------------------------- forward and conditioning contract


def test_dit_forward_is_the_eps_half_of_the_model_output():
    x, t, labels = torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.tensor([3, NUM_CLASSES])
    model = build_tiny_dit()
    adapter = adapter_for(model)
    with torch.no_grad():
        full = model(x, timestep=t, class_labels=labels).sample
        assert full.shape[1] == 8
        assert torch.equal(adapter.predict_eps(model, x, t, Conditioning(class_labels=labels)), full[:, :4])
        plain = build_tiny_dit(out_channels=4)
        assert torch.equal(adapter.predict_eps(plain, x, t, Conditioning(class_labels=labels)),
                           plain(x, timestep=t, class_labels=labels).sample)
    assert adapter.null_class(model) == NUM_CLASSES and adapter.num_classes(model) == NUM_CLASSES


def test_pixart_forward_is_the_eps_half_with_mask_and_size_conditions():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    cond = captions(2, sizes=True).conditional_only()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    model = build_tiny_pixart(use_additional_conditions=True)
    adapter = adapter_for(model)
    with torch.no_grad():
        full = model(x, encoder_hidden_states=cond.encoder_hidden_states, timestep=t,
                     added_cond_kwargs=dict(cond.added_cond_kwargs), encoder_attention_mask=mask).sample
        ours = adapter.predict_eps(model, x, t, dataclasses.replace(cond, attention_mask=mask))
        assert torch.equal(ours, full[:, :4])
        assert not torch.equal(adapter.predict_eps(model, x, t, cond), ours)  # the mask reached the cross-attention
        plain = build_tiny_pixart()
        text = cond.encoder_hidden_states
        direct = plain(x, encoder_hidden_states=text, timestep=t,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert torch.equal(adapter.predict_eps(plain, x, t, Conditioning(encoder_hidden_states=text)), direct[:, :4])


def test_pixart_without_caption_projection_reads_captions_of_its_cross_attention_width(tmp_path):
    """Without ``caption_channels`` the captions go straight into the cross-attentions, which read
    ``cross_attention_dim``; the adapter asked for the inner width (heads × head dim) instead, so when the two
    differ the right captions were refused and captions of the inner width failed in the first matmul."""
    model = build_tiny_pixart(caption_channels=None, cross_attention_dim=CAPTION, out_channels=4)
    adapter = adapter_for(model)
    assert model.caption_projection is None and model.inner_dim != CAPTION
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    cond = captions(2).conditional_only()
    with torch.no_grad():
        direct = model(x, encoder_hidden_states=cond.encoder_hidden_states, timestep=t,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert torch.equal(adapter.predict_eps(model, x, t, cond), direct)
    assert adapter.dummy_conditioning(model).encoder_hidden_states.shape[-1] == CAPTION
    with pytest.raises(ValueError, match=rf"encoder_hidden_states must be \(N, L, {CAPTION}\)"):
        adapter.predict_eps(model, x, t, Conditioning(encoder_hidden_states=torch.randn(2, TOKENS, model.inner_dim)))
    source = ConditioningList(captions(4))
    qmodel = api.quantize(model, DDIMScheduler(num_train_timesteps=1000), _quant_config("W8A8"), conditions=source,
                          progress=False)
    assert torch.isfinite(_sample(qmodel, DDIMScheduler(num_train_timesteps=1000), source)).all()


def test_conditioning_mismatches_are_refused_in_the_conditioning_terms():
    dit, pixart, sized = build_tiny_dit(), build_tiny_pixart(), build_tiny_pixart(use_additional_conditions=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    text = torch.randn(2, TOKENS, CAPTION)
    with pytest.raises(ValueError, match="needs conditioning"):
        adapter_for(dit).predict_eps(dit, x, t)
    with pytest.raises(ValueError, match=rf"\[0, 10\].*got label {NUM_CLASSES + 1}$"):  # the value, not the shape
        adapter_for(dit).predict_eps(dit, x, t, Conditioning(class_labels=torch.tensor([1, NUM_CLASSES + 1])))
    with pytest.raises(ValueError, match=r"got label -1$"):
        adapter_for(dit).predict_eps(dit, x, t, Conditioning(class_labels=torch.tensor([-1, 2])))
    for dtype in (torch.float32, torch.bool, torch.int16):  # torch's embedding refused them inside the first block
        with pytest.raises(ValueError, match=rf"int64 or int32 indices into the label table, got {dtype}"):
            adapter_for(dit).predict_eps(dit, x, t, Conditioning(class_labels=torch.tensor([1, 0], dtype=dtype)))
    with pytest.raises(ValueError, match=r"not \['encoder_hidden_states'\]"):
        adapter_for(dit).predict_eps(dit, x, t, Conditioning(class_labels=torch.tensor([1, 2]),
                                                             encoder_hidden_states=text))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(N, L, 16\)"):
        adapter_for(pixart).predict_eps(pixart, x, t, Conditioning(encoder_hidden_states=torch.randn(2, TOKENS, 12)))
    with pytest.raises(ValueError, match=r"lacks \['added_cond_kwargs.resolution'"):
        adapter_for(sized).predict_eps(sized, x, t, Conditioning(encoder_hidden_states=text))
    with pytest.raises(ValueError, match=r"not \['class_labels'\]"):
        adapter_for(pixart).predict_eps(pixart, x, t, Conditioning(encoder_hidden_states=text,
                                                                   class_labels=torch.tensor([1, 2])))


# ---------------------------------------------------------------- attention processor and caption K/V memo


def test_quant_processor_matches_diffusers_on_both_models():
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    cases = [(build_tiny_dit(), Conditioning(class_labels=torch.tensor([1, NUM_CLASSES]))),
             (build_tiny_pixart(), dataclasses.replace(captions(2).conditional_only(), attention_mask=mask))]
    for model, cond in cases:
        adapter = adapter_for(model)
        with torch.no_grad():
            for name in adapter.attention_modules(model):
                model.get_submodule(name).set_processor(AttnProcessor2_0())
            reference = adapter.predict_eps(model, x, t, cond)
            for name in adapter.attention_modules(model):
                install_attention_quantizers(model.get_submodule(name), QScheme.off(), 16)
            ours = adapter.predict_eps(model, x, t, cond)
        # explicit matmuls instead of the fused kernel: float32 rounding only
        assert torch.allclose(ours, reference, rtol=0, atol=64 * torch.finfo(torch.float32).eps *
                              float(reference.abs().max()))


def test_caption_kv_is_computed_once_per_prompt_batch_and_changes_nothing(monkeypatch):
    model, scheduler, source = _setup("pixart")
    qmodel = api.quantize(model, scheduler, _quant_config("W8A8"), conditions=source, progress=False)
    counts: dict[str, int] = {}
    handles = []
    for name, projection in cross_attention_projections(qmodel.model).items():
        def count(*_args, name=name):
            counts[name] = counts.get(name, 0) + 1
        handles.append(projection.weight_quantizer.register_forward_hook(count))
    cached = _sample(qmodel, scheduler, source, num_samples=3, batch_size=2)  # 2 batches × 4 steps
    assert len(counts) == 2 * 2 and set(counts.values()) == {2}  # K, V of 2 blocks, once per batch
    monkeypatch.setattr(qmodel.adapter, "inference_cache", None)
    counts.clear()
    uncached = _sample(qmodel, scheduler, source, num_samples=3, batch_size=2)
    for handle in handles:
        handle.remove()
    assert set(counts.values()) == {2 * 4} and torch.equal(cached, uncached)


# ---------------------------------------------------------------- end to end through the public API


def test_naive_w8a8_is_close_to_fp_and_w4a4_is_worse(quantized):
    which, model, _, _, calib, naive = quantized
    plans = naive["W8A8"].plans
    assert all(plan.quantized for plan in plans)
    network = naive["W8A8"].model
    assert {type(network.get_submodule(name).processor).__name__
            for name in adapter_for(model).attention_modules(model)} == {"QuantAttnProcessor"}
    w8a8, w4a4 = (eps_snr_db(model, naive[preset], calib) for preset in ("W8A8", "W4A4"))
    # measured on these tiny random models (calibration inputs, both guidance branches): W8A8 ≈ 39 dB, W4A8 ≈ 22 dB,
    # W4A4 ≈ 16.5 dB for both (8-bit per-tensor activations give at most ~6 dB/bit); a quantizer left uncalibrated or
    # an input fed wrongly falls far below 30 dB, quantizers that do not act give no gap between the presets
    assert w8a8 > 30.0, (which, w8a8)
    assert w4a4 < w8a8 - 12.0, (which, w4a4, w8a8)


def test_guided_sampling_and_save_load_are_bit_identical(quantized, tmp_path):
    which, model, scheduler, source, _, naive = quantized
    qmodel = naive["W8A8"]
    images = _sample(qmodel, scheduler, source)
    assert torch.isfinite(images).all() and images.shape == (3, 4, 8, 8)
    assert not torch.equal(images, _sample(model, scheduler, source))  # the quantizers act
    assert not torch.equal(images, _sample(qmodel, scheduler, source, guidance=1.0))  # and guidance does
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    index = json.loads((tmp_path / "artefact" / "model_index.json").read_text())
    assert index["_class_name"] == ("DiTPipeline" if which == "dit" else "PixArtAlphaPipeline")
    assert (tmp_path / "artefact" / "transformer" / "config.json").is_file()
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler, source), images)


def test_short_qdiffusion_on_dit_reconstructs_the_blocks(tmp_path):
    model, scheduler, source = _setup("dit")
    qmodel = api.quantize(model, scheduler, _quant_config("W4A8", "qdiffusion", quantize_attention=True),
                          conditions=source, progress=False)
    units = [report.unit for report in qmodel.reconstruction_report if report.phase == "weights"]
    assert units == adapter_for(model).blocks(model)
    assert {"transformer_blocks.0", "transformer_blocks.1"} <= set(units)
    images = _sample(qmodel, scheduler, source)
    assert torch.isfinite(images).all()
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler, source), images)


def test_a_dit_pipeline_folder_loads_through_its_transformer_subfolder(tmp_path):
    model, scheduler = build_tiny_dit(), DDIMScheduler(num_train_timesteps=1000)
    model.save_pretrained(tmp_path / "dit" / "transformer")
    scheduler.save_pretrained(tmp_path / "dit" / "scheduler")
    # the VAE the index names must be there: a pipeline folder missing a component is refused before loading
    AutoencoderKL(latent_channels=4, block_out_channels=(8,), norm_num_groups=4, sample_size=16).save_pretrained(
        tmp_path / "dit" / "vae")
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}))
    loaded, loaded_scheduler = load_pipeline_parts(tmp_path / "dit")
    assert isinstance(loaded, DiTTransformer2DModel) and isinstance(loaded_scheduler, DDIMScheduler)
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([10]), Conditioning(class_labels=torch.tensor([NUM_CLASSES]))
    with torch.no_grad():
        assert torch.equal(adapter_for(loaded).predict_eps(loaded, x, t, cond),
                           adapter_for(model).predict_eps(model, x, t, cond))


def test_bit_operations_count_a_class_conditional_transformer():
    """Cost counting runs a conditional model with placeholder labels: every layer's MACs at b_w × b_a bits."""
    from tadq.corrections.ptqd.bitops import bit_operations

    model = build_tiny_dit()
    fp, w8a8 = bit_operations(model, 32, 32), bit_operations(model, 8, 8)
    assert w8a8 > 0 and fp == 16 * w8a8
