"""UNet layouts no other test builds (a robustness probe): added-K/V attention, GLIGEN and dual cross-attention,
label-vector class embeddings, learned time embeddings, and sample sizes the UNet cannot take. Each either works
(checked against the diffusers model itself) or is refused by name before any calibration."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from tests.conftest import build_tiny_sd_unet, counting_forwards

from tadq.config import QuantConfig
from tadq.prepare import build_quantized_structure
from tadq.quant.attention import cross_attention_projections
from tadq.registry import adapter_for
from tadq.sampling import Conditioning


def _unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                  norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"))
    return UNet2DModel(**(config | overrides)).eval()


def _simple_cross_attn_unet():
    """``UNetMidBlock2DSimpleCrossAttn``: its attention runs ``AttnAddedKVProcessor2_0`` (text through add_k/add_v)."""
    return build_tiny_sd_unet(mid_block_type="UNetMidBlock2DSimpleCrossAttn")


def test_an_added_kv_attention_is_refused_for_attention_quantization_before_calibration():
    model = _simple_cross_attn_unet()
    config = QuantConfig.from_preset("W8A8", quantize_attention=True)
    # the structural step, before any calibration sampling: QuantAttnProcessor would drop the add_k/add_v path
    with pytest.raises(NotImplementedError, match=r"mid_block\.attentions\.0 runs AttnAddedKVProcessor2_0"):
        build_quantized_structure(model, config)


def test_an_added_kv_attention_reads_the_text_through_add_kv_and_the_image_through_to_kv():
    model = _simple_cross_attn_unet()
    roles = {info.name: info.role for info in adapter_for(model).layers(model)}
    attn = "mid_block.attentions.0"
    assert roles[f"{attn}.to_k"] == roles[f"{attn}.to_v"] == "attention_qkv"  # image tokens: change every step
    assert roles[f"{attn}.add_k_proj"] == roles[f"{attn}.add_v_proj"] == "cross_attention_kv"
    memoised = set(cross_attention_projections(model))
    assert {f"{attn}.add_k_proj", f"{attn}.add_v_proj"} <= memoised and f"{attn}.to_k" not in memoised
    # the ordinary cross-attention of the down block keeps its text-reading to_k/to_v
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in memoised
    qmodel = build_quantized_structure(model, QuantConfig.from_preset("W8A8"))  # without attention matmuls: fine
    assert any(plan.name == f"{attn}.add_k_proj" and plan.quantized for plan in qmodel.plans)


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(attention_type="gated"), "attention_type='gated'"),
    (dict(dual_cross_attention=True), "dual_cross_attention=True"),
])
def test_unet_layouts_needing_inputs_tadq_does_not_pass_are_refused(overrides, named):
    model = build_tiny_sd_unet(**overrides)
    with pytest.raises(NotImplementedError, match=named):
        adapter_for(model).conditioning_inputs(model)


def test_an_identity_class_embedding_takes_label_vectors_and_refuses_indices():
    model = _unet(class_embed_type="identity")
    adapter = adapter_for(model)
    assert adapter.blocks(model)  # the tracing forward runs (it used to pass integer labels and fail)
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16)
    with torch.no_grad():
        got = adapter.predict_eps(model, x, t, Conditioning(class_labels=labels))
        assert torch.equal(got, model(x, t, class_labels=labels).sample)
    with pytest.raises(ValueError, match=r"takes a float label vector per sample, \(N, 16\)"):
        adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor([0, 1])))


@pytest.mark.parametrize("build", [lambda: _unet(num_class_embeds=5),
                                   lambda: build_tiny_sd_unet(num_class_embeds=5)], ids=["unet2d", "unet2d-condition"])
@pytest.mark.parametrize("labels", [[7, 1], [0, -1], [5, 5]])
def test_labels_past_the_class_table_are_refused_by_range(build, labels):
    """A label (or guidance's null class) past ``num_class_embeds`` failed inside torch's embedding with
    'index out of range in self'; it is named with the table's range."""
    model = build()
    adapter = adapter_for(model)
    x, t = torch.zeros(2, model.config.in_channels, 8, 8), torch.tensor([10, 10])
    fields = {"encoder_hidden_states": torch.zeros(2, 3, 16)} if isinstance(model, UNet2DConditionModel) else {}
    with pytest.raises(ValueError, match=r"holds labels 0\.\.4 \(num_class_embeds=5\)"):
        adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor(labels), **fields))
    with torch.no_grad():  # labels inside the table still run
        adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor([0, 4]), **fields))


@pytest.mark.parametrize("build", [lambda: _unet(num_class_embeds=5),
                                   lambda: build_tiny_sd_unet(num_class_embeds=5)], ids=["unet2d", "unet2d-condition"])
@pytest.mark.parametrize("dtype", [torch.bool, torch.int8, torch.uint8, torch.int16])
def test_label_indices_of_a_dtype_the_class_table_cannot_take_are_named(build, dtype):
    """torch's embedding takes int64 or int32 indices only: bool or narrow integer labels passed the (N,) integer
    check and failed inside the UNet with "Expected tensor for argument #1 'indices' to have one of the following
    scalar types"."""
    model = build()
    adapter = adapter_for(model)
    x, t = torch.zeros(2, model.config.in_channels, 8, 8), torch.tensor([10, 10])
    fields = {"encoder_hidden_states": torch.zeros(2, 3, 16)} if isinstance(model, UNet2DConditionModel) else {}
    with counting_forwards(model) as calls, pytest.raises(ValueError, match=rf"int64 or int32 labels; got {dtype}"):
        adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor([1, 0], dtype=dtype), **fields))
    assert calls == [0]
    with torch.no_grad():  # int32 labels run, as the model's own call does
        got = adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor([1, 0], dtype=torch.int32),
                                                            **fields))
        assert torch.equal(got, adapter.predict_eps(model, x, t, Conditioning(class_labels=torch.tensor([1, 0]),
                                                                              **fields)))


def test_a_conditional_unet_with_an_identity_class_embedding_traces():
    model = build_tiny_sd_unet(class_embed_type="identity")
    assert len(adapter_for(model).blocks(model)) > 5  # its dummy labels are (1, time_embed_dim) vectors


@pytest.mark.parametrize("size", ["8", True, 8.0, None, [8, 8, 8]])
def test_a_sample_size_of_the_wrong_type_is_named(size):
    model = _unet()
    model.register_to_config(sample_size=size)
    with pytest.raises(ValueError, match="config has sample_size="):
        adapter_for(model).sample_shape(model)


def test_a_sample_size_the_downsampling_does_not_divide_is_refused_and_a_rectangle_is_not():
    model = _unet(sample_size=10, block_out_channels=(4, 8, 8), down_block_types=("DownBlock2D",) * 3,
                  up_block_types=("UpBlock2D",) * 3)
    with pytest.raises(ValueError, match=r"10x10, not a multiple of 4"):
        adapter_for(model).sample_shape(model)
    model = _unet(sample_size=(8, 12))  # one downsampling: multiples of 2
    assert adapter_for(model).sample_shape(model) == (1, 8, 12)
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 12), torch.tensor([3]))  # and the UNet does take it


def test_a_learned_time_embedding_takes_integral_timesteps_and_refuses_fractional_ones():
    model = _unet(time_embedding_type="learned", num_train_timesteps=1000)
    adapter, x = adapter_for(model), torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(x, torch.tensor([999, 3])).sample
        assert torch.equal(adapter.predict_eps(model, x, torch.tensor([999.0, 3.0])), expected)
        with pytest.raises(ValueError, match=r"learned time embedding .* fractional timestep 799\.2"):
            adapter.predict_eps(model, x, torch.tensor([999.0, 799.2]))


def test_a_learned_time_embedding_refuses_a_scheduler_of_more_timesteps_by_name():
    """A UNet with a learned time embedding of 100 rows (its config's ``num_train_timesteps``) in a folder whose
    scheduler trains on 1000 timesteps ended in torch's "IndexError: index out of range in self" at the first step
    of ``tadq sample`` and ``tadq quantize``; the timestep past the table is now named with both counts."""
    from diffusers import DDPMScheduler

    import tadq
    from tadq.sampling import SamplerConfig

    model = _unet(time_embedding_type="learned", num_train_timesteps=100)
    for t in (torch.tensor([100, 3]), torch.tensor([100.0, 3.0])):
        with pytest.raises(ValueError, match=r"has 100 rows .* cannot take timestep 100\b"):
            adapter_for(model).predict_eps(model, torch.randn(2, 1, 8, 8), t)
    with pytest.raises(ValueError, match=r"has 100 rows .* timestep 666\b"):
        tadq.sample(model, DDPMScheduler(num_train_timesteps=1000), SamplerConfig("ddim", num_steps=3),
                    num_samples=1, seed=0, progress=False)
    images = tadq.sample(model, DDPMScheduler(num_train_timesteps=100), SamplerConfig("ddim", num_steps=3),
                         num_samples=1, seed=0, progress=False).images  # the schedule it was built for
    assert torch.isfinite(images).all()


def _k_diffusion_unet():
    """The K-diffusion blocks (the latent upscaler's layout) with a positional time embedding: residual blocks with
    ``AdaGroupNorm`` norms (``ResnetBlockCondNorm2D``) instead of ``time_emb_proj``, cross-attention blocks that
    modulate their norm by the time embedding too (``KAttentionBlock``); their group size is 32 channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        cross_attention_dim=16, attention_head_dim=8, mid_block_type=None, resnet_time_scale_shift="ada_group",
        down_block_types=("KCrossAttnDownBlock2D", "KDownBlock2D"), up_block_types=("KUpBlock2D",
                                                                                    "KCrossAttnUpBlock2D")).eval()


def test_the_time_projections_of_k_diffusion_blocks_have_their_role_and_their_block():
    """Their norms' ``linear`` layers (time embedding → per-channel scale and shift) and the block convs were role
    ``other``, each its own unit: a ``time_projection`` role kept in float, or TFMQ's temporal path, missed them."""
    model = _k_diffusion_unet()
    adapter = adapter_for(model)
    infos = {info.name: info for info in adapter.layers(model)}
    assert [name for name, info in infos.items() if info.role == "other"] == []
    for resnet in ("down_blocks.0.resnets.0", "up_blocks.1.resnets.0"):
        assert {infos[f"{resnet}.{norm}.linear"].role for norm in ("norm1", "norm2")} == {"time_projection"}
        assert {infos[f"{resnet}.{conv}"].role for conv in ("conv1", "conv2")} == {"block_conv"}
        assert {infos[f"{resnet}.{layer}"].block for layer in ("norm1.linear", "conv1", "conv2")} == {resnet}
    attention = "down_blocks.0.attentions.0"
    assert infos[f"{attention}.norm2.linear"].role == "time_projection"
    assert infos[f"{attention}.attn2.to_k"].role == "cross_attention_kv"
    assert {infos[f"{attention}.{layer}"].block for layer in ("norm2.linear", "attn2.to_q")} == {attention}
    assert adapter.blocks(model) == ["time_embedding", "conv_in", "down_blocks.0.resnets.0", attention,
                                     "down_blocks.1.resnets.0", "up_blocks.0.resnets.0", "up_blocks.1.resnets.0",
                                     "up_blocks.1.attentions.0", "conv_out"]
    structure = build_quantized_structure(model, QuantConfig.from_preset("W8A8", keep_fp_roles=("time_projection",)))
    in_float = {plan.name for plan in structure.plans if not plan.quantized}
    assert in_float == {name for name, info in infos.items() if info.role == "time_projection"}
    assert f"{attention}.norm2.linear" in in_float


def test_tfmq_refuses_the_k_diffusion_time_projections_before_any_call():
    from diffusers import DDIMScheduler

    from tadq.config import CalibrationConfig
    from tadq.sampling import ConditioningList, SamplerConfig
    from tadq.tfmq import TFMQConfig, quantize_tfmq

    model = _k_diffusion_unet()
    sampler = SamplerConfig("ddim", num_steps=2, eta=0.0)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2)
    config = QuantConfig.from_preset("W8A8", calibration=calibration)
    conditions = ConditioningList(Conditioning(encoder_hidden_states=torch.randn(2, 3, 16)))
    named = r"norm1\.linear belongs to a ResnetBlockCondNorm2D, not a ResnetBlock2D"
    with counting_forwards(model) as calls, pytest.raises(TypeError, match=named):
        quantize_tfmq(model, DDIMScheduler(), config, TFMQConfig(), sampler, conditions=conditions, progress=False)
    assert calls[0] == 0
