"""The UNet2DConditionModel adapter on tiny SD- and SDXL-layout UNets: roles, units, splits, conditioning contract,
cross-attention processing and K/V memo, and the public API end to end (quantize, guided sampling, save/load)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from tests.conftest import SDXL_POOLED_DIM, SDXL_TIME_EMBED_DIM, build_tiny_sd_unet, build_tiny_sdxl_unet
from torch import nn

import tadq
from tadq import api
from tadq.adapters import TEMPORAL_ROLES
from tadq.calibration import collect_calibration_set
from tadq.calibration.observers import Calibrate
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant.attention import cross_attention_cache, cross_attention_projections, install_attention_quantizers
from tadq.quant.qscheme import QScheme
from tadq.recipe import Deployment, QDiffusionMethod, Recipe
from tadq.registry import adapter_for, model_family
from tadq.sampling import Conditioning, ConditioningList, SamplerConfig
from tadq.tfmq.tib import TemporalInformationBlock

TOKENS, WIDTH = 5, 16  # text length L and width D (= cross_attention_dim of the tiny UNets)
TIME_IDS = (8.0, 8.0, 0.0, 0.0, 8.0, 8.0)  # SDXL: original size, crop corner, target size
GUIDANCE = 3.0
SAMPLER = SamplerConfig("ddim", num_steps=4, eta=0.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=8)


def _branch(n: int, sdxl: bool, generator: torch.Generator, null: bool = False) -> dict:
    """The fields of one guidance branch: random "prompt" embeddings, or zeros for the unconditional one."""
    draw = (lambda *shape: torch.zeros(*shape)) if null else (lambda *shape: torch.randn(*shape, generator=generator))
    fields: dict = {"encoder_hidden_states": draw(n, TOKENS, WIDTH)}
    if sdxl:
        fields["pooled_embeds"] = draw(n, SDXL_POOLED_DIM)
        fields["added_cond_kwargs"] = {"time_ids": torch.tensor([TIME_IDS]).repeat(n, 1)}
    return fields


def conditions(n: int, sdxl: bool = False, seed: int = 0) -> Conditioning:
    """n rows of random text conditioning with an unconditional (zero-embedding) branch."""
    generator = torch.Generator().manual_seed(seed)
    return Conditioning(**_branch(n, sdxl, generator), unconditional=Conditioning(**_branch(n, sdxl, generator, True)))


def _quant_config(preset: str, method: str) -> QuantConfig:
    config = QuantConfig.from_preset(preset, calibration=CALIB, method=method, quantize_attention=True,
                                     split_shortcut=True)
    return dataclasses.replace(config, reconstruction=dataclasses.replace(
        config.reconstruction, weight_iters=2, activation_iters=2, batch_size=4))


def _sample(denoiser, scheduler, source, num_samples: int = 3, batch_size: int = 3, guidance: float = GUIDANCE):
    return api.sample(denoiser, scheduler, SAMPLER, num_samples=num_samples, seed=7, batch_size=batch_size,
                      progress=False, conditions=source, guidance_scale=guidance).images


@pytest.fixture(scope="module")
def sd():
    """(FP tiny SD UNet, scheduler, prompt list, calibration set, naive W8A8 model) shared by the module."""
    torch.set_num_threads(1)
    model, scheduler = build_tiny_sd_unet(), DDIMScheduler(num_train_timesteps=1000)
    source = ConditioningList(conditions(6, seed=1), name="calibration-prompts")
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False,
                                    conditions=source, guidance_scale=GUIDANCE)
    naive = api.quantize(model, scheduler, _quant_config("W8A8", "naive"), calibration=calib, progress=False)
    return model, scheduler, source, calib, naive


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize("build", [build_tiny_sd_unet, build_tiny_sdxl_unet])
def test_every_layer_has_a_structural_role(build):
    model = build()
    infos = adapter_for(model).layers(model)
    roles = {info.name: info.role for info in infos}
    layers = {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(roles) == layers and "other" not in roles.values()
    transformer = next(n for n, _ in model.named_modules() if n.endswith("transformer_blocks.0"))
    expected = {
        f"{transformer}.attn1.to_q": "attention_qkv", f"{transformer}.attn1.to_k": "attention_qkv",
        f"{transformer}.attn1.to_v": "attention_qkv", f"{transformer}.attn2.to_q": "attention_qkv",
        f"{transformer}.attn2.to_k": "cross_attention_kv", f"{transformer}.attn2.to_v": "cross_attention_kv",
        f"{transformer}.attn2.to_out.0": "attention_out", f"{transformer}.ff.net.0.proj": "feed_forward",
        f"{transformer}.ff.net.2": "feed_forward", transformer.replace("transformer_blocks.0", "proj_in"):
        "transformer_proj", "time_embedding.linear_1": "time_embedding", "conv_in": "input_conv",
        "conv_out": "output_conv", "down_blocks.0.resnets.0.time_emb_proj": "time_projection",
    }
    assert {name: roles[name] for name in expected} == expected
    units = {info.name: info.block for info in infos}
    assert units[f"{transformer}.attn2.to_k"] == units[f"{transformer}.ff.net.2"] == transformer  # one BRECQ unit
    # the K/V role follows the module's structure: with only_cross_attention the down/up blocks' attn1 also read
    # the text (diffusers' mid block keeps self-attention)
    only_cross = build(only_cross_attention=True)
    roles = {info.name: info.role for info in adapter_for(only_cross).layers(only_cross)}
    kinds = {f"{name}.to_k": ("cross_attention_kv" if attn.is_cross_attention else "attention_qkv")
             for name, attn in only_cross.named_modules() if type(attn).__name__ == "Attention"}
    assert {name: roles[name] for name in kinds} == kinds
    assert any(role == "cross_attention_kv" for name, role in kinds.items() if ".attn1." in name)


def test_sdxl_added_embedding_is_part_of_the_temporal_path():
    model = build_tiny_sdxl_unet()
    roles = {info.name: info.role for info in adapter_for(model).layers(model)}
    assert roles["add_embedding.linear_1"] == roles["add_embedding.linear_2"] == "added_embedding"
    assert "added_embedding" in TEMPORAL_ROLES
    assert isinstance(model.get_submodule(next(n for n in roles if n.endswith("proj_in"))), nn.Linear)  # SDXL


def test_conditioning_inputs_and_pipeline_class_follow_the_config():
    sd_model, xl_model = build_tiny_sd_unet(), build_tiny_sdxl_unet()
    adapter = adapter_for(sd_model)
    assert adapter.conditioning_inputs(sd_model) == ("encoder_hidden_states",)
    assert adapter.conditioning_inputs(xl_model) == ("encoder_hidden_states", "pooled_embeds",
                                                     "added_cond_kwargs.time_ids")
    assert adapter.conditioning_inputs(build_tiny_sd_unet(num_class_embeds=3))[-1] == "class_labels"
    family = model_family("UNet2DConditionModel")
    assert family.pipeline_for(sd_model.config) == "StableDiffusionPipeline"
    assert family.pipeline_for(xl_model.config) == "StableDiffusionXLPipeline"
    assert model_family("UNet2DModel").pipeline_for({}) == "DDPMPipeline"


@pytest.mark.parametrize("build", [build_tiny_sd_unet, build_tiny_sdxl_unet])
def test_blocks_follow_the_forward_order_of_a_conditioned_call(build):
    model = build()
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    seen: list[str] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda *_a, name=name: seen.append(name))
               for name in blocks]
    sdxl = build is build_tiny_sdxl_unet
    cond = conditions(2, sdxl).conditional_only()
    with torch.no_grad():
        adapter.predict_eps(model, torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), cond)
    for handle in handles:
        handle.remove()
    assert list(dict.fromkeys(seen)) == blocks and blocks[-1] == "conv_out"
    assert blocks.index("time_embedding") < blocks.index("conv_in")
    if sdxl:
        assert blocks.index("add_embedding") < blocks.index("conv_in")
        deep = "down_blocks.1.attentions.0"
        assert blocks.index(f"{deep}.proj_in") < blocks.index(f"{deep}.transformer_blocks.0") < \
            blocks.index(f"{deep}.transformer_blocks.1") < blocks.index(f"{deep}.proj_out")
    else:
        assert blocks.index("down_blocks.0.resnets.0") < blocks.index("down_blocks.0.attentions.0.proj_in")
    assert blocks.index("mid_block.resnets.0") < blocks.index("mid_block.attentions.0.transformer_blocks.0") < \
        blocks.index("mid_block.resnets.1") < blocks.index("up_blocks.0.resnets.0")


@pytest.mark.parametrize("pooled, time_ids", [(2, 5), (3, 0)], ids=["refiner-narrow-pooled", "no-time-ids"])
def test_a_narrow_added_embedding_input_is_traced(pooled, time_ids):
    """The tracing forward split SDXL's added input P as P − 6·a pooled + 6 time ids: a UNet whose P is below 6·a
    (a narrow refiner-style D' + 5·a) asked torch for a pooled width below zero, so block order, shortcut splits
    and cost counting failed with "Dimension size must be non-negative"."""
    total = pooled + time_ids * SDXL_TIME_EMBED_DIM
    model = build_tiny_sdxl_unet(projection_class_embeddings_input_dim=total)
    adapter = adapter_for(model)
    dummy = adapter.dummy_conditioning(model, batch_size=2)
    width = dummy.pooled_embeds.shape[-1] + dummy.added_cond_kwargs["time_ids"].shape[-1] * SDXL_TIME_EMBED_DIM
    assert width == total and dummy.pooled_embeds.shape[-1] >= 0
    blocks = adapter.blocks(model)
    assert blocks.index("add_embedding") < blocks.index("conv_in") and blocks[-1] == "conv_out"
    assert adapter.concat_splits(model) == adapter.concat_splits(build_tiny_sdxl_unet())  # P does not move them


@pytest.mark.parametrize("build", [build_tiny_sd_unet, build_tiny_sdxl_unet])
def test_concat_splits_of_the_cross_attention_decoder(build):
    # skips (conv_in 8, down0 resnet 8, down0 downsample 8, down1 resnet 16) are popped from the end:
    # up0 resnet0 = [mid 16 | 16], resnet1 = [16 | 8]; up1 resnet0 = [upsampled 16 | 8], resnet1 = [8 | 8]
    model = build()
    assert adapter_for(model).concat_splits(model) == {
        "up_blocks.0.resnets.0.conv_shortcut": 16, "up_blocks.0.resnets.1.conv_shortcut": 16,
        "up_blocks.1.resnets.0.conv_shortcut": 16, "up_blocks.1.resnets.1.conv_shortcut": 8,
    }


def test_attention_modules_include_self_and_cross_attention():
    model = build_tiny_sdxl_unet()
    names = adapter_for(model).attention_modules(model)
    transformers = [n for n, m in model.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert len(transformers) == 8  # SDXL layout: 2 layers in each of the 4 deep transformers
    assert names == [f"{t}.{a}" for t in transformers for a in ("attn1", "attn2")]


# ---------------------------------------------------------------- conditioning contract


def test_predict_eps_maps_the_conditioning_onto_the_unet_arguments():
    adapter = adapter_for(build_tiny_sd_unet())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    xl = build_tiny_sdxl_unet()
    cond = conditions(2, sdxl=True).conditional_only()
    with torch.no_grad():
        direct = xl(x, t, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs={
            "text_embeds": cond.pooled_embeds, "time_ids": cond.added_cond_kwargs["time_ids"]}).sample
        assert torch.equal(adapter.predict_eps(xl, x, t, cond), direct)
        sd_model = build_tiny_sd_unet()
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
        masked = dataclasses.replace(conditions(2).conditional_only(), attention_mask=mask)
        direct = sd_model(x, t, encoder_hidden_states=masked.encoder_hidden_states, encoder_attention_mask=mask).sample
        assert torch.equal(adapter.predict_eps(sd_model, x, t, masked), direct)
        unmasked = adapter.predict_eps(sd_model, x, t, masked.conditional_only().__class__(
            encoder_hidden_states=masked.encoder_hidden_states))
        assert not torch.equal(unmasked, direct)  # the mask reached the cross-attention


def test_predict_eps_refuses_missing_and_unexpected_conditioning():
    sd_model, xl = build_tiny_sd_unet(), build_tiny_sdxl_unet()
    adapter = adapter_for(sd_model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 5])
    text = torch.randn(2, TOKENS, WIDTH)
    with pytest.raises(ValueError, match="needs conditioning"):
        adapter.predict_eps(sd_model, x, t)
    with pytest.raises(ValueError, match=r"not \['pooled_embeds'\]"):
        adapter.predict_eps(sd_model, x, t, Conditioning(encoder_hidden_states=text, pooled_embeds=torch.zeros(2, 8)))
    with pytest.raises(ValueError, match=r"lacks \['added_cond_kwargs.time_ids'\]"):
        adapter.predict_eps(xl, x, t, Conditioning(encoder_hidden_states=text, pooled_embeds=torch.zeros(2, 8)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(N, L, 16\)"):
        adapter.predict_eps(sd_model, x, t, Conditioning(encoder_hidden_states=torch.randn(2, TOKENS, 7)))
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        adapter.predict_eps(xl, x, t, Conditioning(encoder_hidden_states=text, pooled_embeds=torch.zeros(2, 9),
                                                   added_cond_kwargs={"time_ids": torch.zeros(2, 6)}))
    with pytest.raises(ValueError, match="needs conditioning"):
        _sample(sd_model, DDIMScheduler(), None, guidance=1.0)


# ---------------------------------------------------------------- attention processor and K/V memo


def test_quant_processor_matches_diffusers_on_cross_attention_and_honours_the_mask():
    model = build_tiny_sd_unet()
    adapter = adapter_for(model)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 700])
    cond = dataclasses.replace(conditions(2).conditional_only(), attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * 2))
    with torch.no_grad():
        for name in adapter.attention_modules(model):
            model.get_submodule(name).set_processor(AttnProcessor2_0())
        reference = adapter.predict_eps(model, x, t, cond)
        for name in adapter.attention_modules(model):
            install_attention_quantizers(model.get_submodule(name), QScheme.off(), 16)
        ours = adapter.predict_eps(model, x, t, cond)
        # same maths, explicit matmuls instead of the fused kernel: float32 rounding only, a few ulps of the output
        # per reordered sum over the ~20 layers the error crosses
        assert torch.allclose(ours, reference, rtol=0, atol=64 * torch.finfo(torch.float32).eps *
                              float(reference.abs().max()))
        # padding tokens get probability exactly 0 (bias −10000 underflows exp): their content cannot matter
        states = cond.encoder_hidden_states.clone()
        states[:, 3:] = torch.randn(2, 2, WIDTH) * 100
        assert torch.equal(adapter.predict_eps(model, x, t, dataclasses.replace(cond, encoder_hidden_states=states)),
                           ours)


def _projection_calls(qmodel) -> tuple[dict[str, int], list]:
    """Counts of real K/V projection computations (the weight fake-quantization runs only then)."""
    counts: dict[str, int] = {}
    handles = []
    for name, projection in cross_attention_projections(qmodel.model).items():
        def count(*_args, name=name):
            counts[name] = counts.get(name, 0) + 1
        handles.append(projection.weight_quantizer.register_forward_hook(count))
    return counts, handles


def test_kv_memo_computes_the_text_projections_once_per_prompt_batch_and_changes_nothing(sd, monkeypatch):
    _, scheduler, source, _, naive = sd
    counts, handles = _projection_calls(naive)
    cached = _sample(naive, scheduler, source, num_samples=3, batch_size=2)  # 2 batches × 4 steps
    assert len(counts) == 2 * 4  # K and V of the 4 cross-attentions
    assert set(counts.values()) == {2}  # once per batch (its prompts), not once per step
    monkeypatch.setattr(naive.adapter, "inference_cache", None)
    counts.clear()
    uncached = _sample(naive, scheduler, source, num_samples=3, batch_size=2)
    for handle in handles:
        handle.remove()
    assert set(counts.values()) == {2 * 4}
    assert torch.equal(cached, uncached)


def test_kv_memo_is_never_used_while_weights_or_ranges_can_change(sd):
    _, _, source, _, naive = sd
    naive = copy.deepcopy(naive)  # its ranges are changed below
    model, adapter = naive.model, naive.adapter
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), source.rows.rows([0, 1]).guidance_batch()
    x, t = x.repeat(2, 1, 1, 1), t.repeat(2)
    name, projection = next(iter(cross_attention_projections(model).items()))
    with cross_attention_cache(model) as cache:
        with torch.no_grad():
            first = adapter.predict_eps(model, x, t, cond)
            assert cache.computed[name] == 1 and torch.equal(adapter.predict_eps(model, x, t, cond), first)
            assert cache.served[name] == 1
            assert len(cache) == 8 and cache.stored_inputs() == 1  # K, V of 4 layers: one copy of the text
        adapter.predict_eps(model, x, t, cond)  # gradients on (reconstruction): computed, and the entry dropped
        assert cache.computed[name] == 2 and cache.served[name] == 1 and len(cache) == 0
        with torch.no_grad():
            adapter.predict_eps(model, x, t, cond)
            with Calibrate(model, recalibrate=True):  # observers attached: every projection must run and be seen
                adapter.predict_eps(model, x, t, cond)
            assert cache.computed[name] == 4 and cache.served[name] == 1 and len(cache) == 0
            adapter.predict_eps(model, x, t, cond)  # stored again with the new ranges...
            assert cache.computed[name] == 5
            projection.input_quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
            changed = adapter.predict_eps(model, x, t, cond)  # ...and a range set in place makes the entry stale
            assert cache.computed[name] == 6 and cache.served[name] == 1
    with torch.no_grad():
        assert torch.equal(adapter.predict_eps(model, x, t, cond), changed)  # no memo outside the block


def test_the_cross_attentions_are_found_once_per_model_and_their_projections_at_every_call(sd):
    """The K/V memo and the text width check ask for the cross-attentions at every forward; a walk over every
    module each time took 4 ms of a 91 ms call of a 741-layer UNet. Found once per model, with the projections
    read from them at each call, so a layer replaced after the first forward is the one that runs."""
    _, _, source, _, naive = sd
    qmodel = copy.deepcopy(naive)  # a model no forward has seen
    model, walks = qmodel.model, []
    walk = model.named_modules
    model.named_modules = lambda *args, **kwargs: walks.append(1) or walk(*args, **kwargs)
    x, t, cond = torch.randn(4, 4, 8, 8), torch.tensor([10] * 4), source.rows.rows([0, 1]).guidance_batch()
    with torch.no_grad():
        first = qmodel(x, t, cond)
        assert len(walks) == 1
        assert torch.equal(qmodel(x, t, cond), first) and len(walks) == 1
        name, projection = next(iter(cross_attention_projections(model).items()))
        replaced = copy.deepcopy(projection)
        replaced.weight.mul_(0.5)
        model.set_submodule(name, replaced)
        assert cross_attention_projections(model)[name] is replaced
        changed = qmodel(x, t, cond)
        assert not torch.equal(changed, first)
        assert torch.equal(changed, qmodel.adapter.predict_eps(model, x, t, cond))  # without the memo
    assert len(walks) == 1


# ---------------------------------------------------------------- end to end through the public API


def _roundtrip(qmodel, scheduler, source, tmp_path, pipeline: str) -> torch.Tensor:
    images = _sample(qmodel, scheduler, source)
    assert torch.isfinite(images).all()
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    assert json.loads((tmp_path / "artefact" / "model_index.json").read_text())["_class_name"] == pipeline
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler, source), images)
    return images


def test_sd_naive_w8a8_samples_with_guidance_and_saves_bit_identically(sd, tmp_path):
    model, scheduler, source, _, naive = sd
    plans = {plan.name: plan for plan in naive.plans}
    assert all(plan.quantized for plan in plans.values())
    images = _roundtrip(naive, scheduler, source, tmp_path, "StableDiffusionPipeline")
    assert not torch.equal(images, _sample(model, scheduler, source))  # the quantizers act
    assert not torch.equal(images, _sample(naive, scheduler, source, guidance=1.0))  # and guidance does


def test_sd_qdiffusion_w4a8_from_a_recipe(sd, tmp_path):
    model, scheduler, source, _, _ = sd
    recipe = Recipe.from_quant_config(_quant_config("W4A8", "qdiffusion"),
                                      deployments=(Deployment(SAMPLER, GUIDANCE),))
    assert isinstance(recipe.method, QDiffusionMethod)
    qmodel = api.quantize(model, scheduler, recipe, conditions=source, progress=False)
    assert qmodel.reconstruction_report  # the transformer blocks were reconstructed with their text inputs
    _roundtrip(qmodel, scheduler, source, tmp_path, "StableDiffusionPipeline")


def test_sdxl_naive_w8a8_samples_with_guidance_and_saves_bit_identically(tmp_path):
    model, scheduler = build_tiny_sdxl_unet(), DDIMScheduler(num_train_timesteps=1000)
    source = ConditioningList(conditions(4, sdxl=True, seed=2))
    recipe = Recipe.from_quant_config(_quant_config("W8A8", "naive"), deployments=(Deployment(SAMPLER, GUIDANCE),))
    qmodel = api.quantize(model, scheduler, recipe, conditions=source, progress=False)
    assert {p.role for p in qmodel.plans if p.quantized} >= {"added_embedding", "cross_attention_kv"}
    _roundtrip(qmodel, scheduler, source, tmp_path, "StableDiffusionXLPipeline")


def test_tfmq_runs_on_sd_and_refuses_sdxl(sd):
    from tests.tfmq.common import tfmq_config

    from tadq.tfmq import quantize_tfmq

    model, scheduler, source, calib, _ = sd
    qmodel = quantize_tfmq(model, scheduler, _quant_config("W4A8", "qdiffusion"),
                           tfmq_config(tiar_iters=2, num_samples=4, fsc_samples_per_step=2), SAMPLER,
                           calibration=calib, progress=False)
    assert torch.isfinite(_sample(qmodel, scheduler, source)).all()
    xl = build_tiny_sdxl_unet()
    with pytest.raises(NotImplementedError, match="SDXL"):
        TemporalInformationBlock(xl, adapter_for(xl))(torch.tensor([10]))


@pytest.mark.parametrize("build", [build_tiny_sd_unet, build_tiny_sdxl_unet])
def test_temporal_embedding_is_what_the_forward_feeds_the_residual_blocks(build):
    model = build()
    adapter = adapter_for(model)
    sdxl = build is build_tiny_sdxl_unet
    cond = conditions(2, sdxl).conditional_only()
    t = torch.tensor([3, 900])
    resnet = model.down_blocks[0].resnets[0]
    fed: list[torch.Tensor] = []
    handle = resnet.time_emb_proj.register_forward_pre_hook(lambda _m, args: fed.append(args[0]))
    with torch.no_grad():
        adapter.predict_eps(model, torch.randn(2, 4, 8, 8), t, cond)
        handle.remove()
        emb = adapter.temporal_embedding(model, t, cond=cond if sdxl else None)
    assert torch.equal(resnet.nonlinearity(emb), fed[0])
    parts = adapter.temporal_modules(model)
    assert any(part is getattr(model, "add_embedding", None) for part in parts) == sdxl
    assert any(part is model.time_embedding for part in parts)


def test_a_guidance_embedding_unet_is_refused_before_any_work():
    """LCM-style UNets take the guidance scale as an embedding (``timestep_cond``) and are sampled without
    classifier-free guidance by diffusers; tadq would sample them differently without a word, so they are refused."""
    model = build_tiny_sd_unet(time_cond_proj_dim=8)
    with pytest.raises(NotImplementedError, match="time_cond_proj_dim=8.*guidance"):
        adapter_for(model).conditioning_inputs(model)
