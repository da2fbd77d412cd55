"""Shortcut splitting (docs/methods/qdiffusion.md): the split conv, and where the adapter says inputs split."""

import pytest
import torch
from diffusers import UNet2DModel
from tests.conftest import build_tiny_unet
from torch import nn

from tadq import api
from tadq.calibration import Calibrate, activation_quantizers
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant import QScheme, QuantConv2d, convert_layers, plan_layers
from tadq.quant.attention import QuantAttnProcessor
from tadq.quant.split import SplitQuantConv2d, apply_shortcut_split
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

W8 = QScheme(bits=8, granularity="per_channel")
A8, A4 = QScheme(bits=8), QScheme(bits=4)
CALIB = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=10), num_trajectories=16, num_steps_kept=5,
                          samples_per_step=8, batch_size=16)


def _calibrated(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad(), Calibrate(layer):
        layer(x)
    return layer


def _bimodal(n: int, deep: int = 8, skip: int = 4) -> torch.Tensor:
    """[small deep features | large skip features], the histogram Q-Diffusion splits for."""
    return torch.cat([0.1 * torch.randn(n, deep, 4, 4), 5.0 * torch.randn(n, skip, 4, 4)], dim=1)


def _three_level_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8, 8),
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
    ).eval()


def test_split_conv_at_8_bits_matches_the_float_conv():
    conv = nn.Conv2d(12, 8, 1)
    layer = _calibrated(SplitQuantConv2d.from_module(conv, 8, W8, A8), torch.randn(16, 12, 4, 4))
    x = torch.randn(16, 12, 4, 4)
    with torch.no_grad():
        reference, out = conv(x), layer(x)
    assert (out - reference).pow(2).mean() < 1e-3 * reference.pow(2).mean()
    assert layer.weight is conv.weight  # shared, not copied


def test_split_weight_halves_have_their_own_per_channel_ranges():
    conv = nn.Conv2d(6, 3, 1)
    with torch.no_grad():
        conv.weight[:, :2] *= 100.0
    layer = SplitQuantConv2d.from_module(conv, 2, W8, A8)
    weights = layer.quantized_weights()
    assert set(weights) == {"weight_deep", "weight_skip"}
    assert weights["weight_deep"][1].shape == (3, 2, 1, 1) and weights["weight_skip"][1].shape == (3, 4, 1, 1)
    deep_scale, skip_scale = layer.weight_quantizer_deep.scale, layer.weight_quantizer_skip.scale
    assert deep_scale.shape == skip_scale.shape == (3,)
    assert (deep_scale > 10 * skip_scale).all()
    assert torch.equal(layer.quantized_weight()[:, 2:], layer.weight_quantizer_skip(conv.weight[:, 2:]))


def test_split_has_lower_error_than_one_quantizer_on_bimodal_input():
    """4-bit activations: one per-tensor grid sized for the skip half rounds the small deep half away."""
    conv = nn.Conv2d(12, 8, 1)
    with torch.no_grad():
        conv.weight[:, :8] *= 50.0  # both halves contribute comparably to the output, as in a trained layer
    calibration, test = _bimodal(16), _bimodal(16)
    weights_off = QScheme.off()  # isolate the activation error
    single = _calibrated(QuantConv2d.from_module(conv, weights_off, A4), calibration)
    split = _calibrated(SplitQuantConv2d.from_module(conv, 8, weights_off, A4), calibration)
    with torch.no_grad():
        reference = conv(test)
        single_error = (single(test) - reference).pow(2).mean().item()
        split_error = (split(test) - reference).pow(2).mean().item()
    assert split_error < 0.1 * single_error


def test_split_rejects_bad_split_points():
    with pytest.raises(ValueError, match="split"):
        SplitQuantConv2d.from_module(nn.Conv2d(4, 2, 1), 4, W8, A8)
    with pytest.raises(ValueError, match="groups"):
        SplitQuantConv2d.from_module(nn.Conv2d(4, 4, 1, groups=2), 2, W8, A8)


def test_concat_splits_on_the_tiny_unet(tiny_unet):
    splits = adapter_for(tiny_unet).concat_splits(tiny_unet)
    # skips (conv_in 4, down0 resnet 4, down0 downsample 4, down1 resnet 8) are popped from the end
    assert splits == {
        "up_blocks.0.resnets.0.conv_shortcut": 8,  # 8 deep + 8 skip
        "up_blocks.0.resnets.1.conv_shortcut": 8,  # 8 deep + 4 skip
        "up_blocks.1.resnets.0.conv_shortcut": 8,  # 8 deep + 4 skip
        "up_blocks.1.resnets.1.conv_shortcut": 4,  # 4 deep + 4 skip
    }


def test_concat_splits_on_a_three_level_unet():
    model = _three_level_unet()
    splits = adapter_for(model).concat_splits(model)
    assert splits == {
        "up_blocks.0.resnets.0.conv_shortcut": 8, "up_blocks.0.resnets.1.conv_shortcut": 8,
        "up_blocks.1.resnets.0.conv_shortcut": 8, "up_blocks.1.resnets.1.conv_shortcut": 8,
        "up_blocks.2.resnets.0.conv_shortcut": 8, "up_blocks.2.resnets.1.conv_shortcut": 4,
    }
    assert "down_blocks.1.resnets.0.conv_shortcut" not in splits  # an encoder shortcut reads no concatenation


def test_deep_part_is_the_tensor_entering_the_decoder_block(tiny_unet):
    """C1 checked against the forward itself: X[:, :C1] of each block's first shortcut is the block's input."""
    splits = adapter_for(tiny_unet).concat_splits(tiny_unet)
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(tiny_unet.up_blocks):
        handles.append(block.register_forward_pre_hook(
            lambda _m, args, key=f"block{index}": seen.__setitem__(key, args[0])))
        handles.append(block.resnets[0].conv_shortcut.register_forward_pre_hook(
            lambda _m, args, key=f"shortcut{index}": seen.__setitem__(key, args[0])))
    with torch.no_grad():
        tiny_unet(torch.randn(2, 1, 8, 8), torch.tensor([3, 700]))
    for handle in handles:
        handle.remove()
    for index in range(len(tiny_unet.up_blocks)):
        split = splits[f"up_blocks.{index}.resnets.0.conv_shortcut"]
        assert torch.equal(seen[f"shortcut{index}"][:, :split], seen[f"block{index}"])


def _converted(model: nn.Module, config: QuantConfig):
    adapter = adapter_for(model)
    plans = plan_layers(adapter.layers(model), config.weights, config.activations, exclude=config.exclude)
    convert_layers(model, plans)
    return adapter, plans


def test_apply_shortcut_split_replaces_only_planned_layers():
    model = build_tiny_unet()
    config = QuantConfig.from_preset("W8A8", split_shortcut=True, exclude=("up_blocks.1.resnets.1.*",))
    adapter, plans = _converted(model, config)
    applied = apply_shortcut_split(model, adapter, config, plans)
    assert set(applied) == {"up_blocks.0.resnets.0.conv_shortcut", "up_blocks.0.resnets.1.conv_shortcut",
                            "up_blocks.1.resnets.0.conv_shortcut"}
    for name, split in applied.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SplitQuantConv2d) and layer.split == split
    assert type(model.get_submodule("up_blocks.1.resnets.1.conv_shortcut")) is nn.Conv2d
    names = activation_quantizers(model)
    assert "up_blocks.0.resnets.0.conv_shortcut.input_quantizer_deep" in names
    assert "up_blocks.0.resnets.0.conv_shortcut.input_quantizer_skip" in names
    before = model.get_submodule("up_blocks.0.resnets.0.conv_shortcut")
    assert apply_shortcut_split(model, adapter, config, plans) == applied  # idempotent
    assert model.get_submodule("up_blocks.0.resnets.0.conv_shortcut") is before


def test_apply_shortcut_split_is_off_by_default():
    model = build_tiny_unet()
    config = QuantConfig.from_preset("W8A8")
    adapter, plans = _converted(model, config)
    assert apply_shortcut_split(model, adapter, config, plans) == {}
    assert not any(isinstance(m, SplitQuantConv2d) for m in model.modules())


def test_quantize_end_to_end_with_split_and_attention(tiny_unet, ddpm_scheduler):
    config = QuantConfig.from_preset("W4A8", split_shortcut=True, quantize_attention=True, calibration=CALIB)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    expected = adapter_for(tiny_unet).concat_splits(tiny_unet)
    split_layers = {n: m.split for n, m in qmodel.model.named_modules() if isinstance(m, SplitQuantConv2d)}
    assert split_layers == expected
    qmap = qmodel.quantization_map()
    assert all(qmap[name]["quantized"] for name in expected)
    attention = [m for m in qmodel.model.modules() if hasattr(m, "processor")]
    assert attention and all(isinstance(m.processor, QuantAttnProcessor) for m in attention)
    assert all(bool(q.initialized) for q in activation_quantizers(qmodel.model).values())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.isfinite(qmodel(x, t)).all()


def test_quantization_map_shows_split_layers(tiny_unet, ddpm_scheduler):
    from tadq.api import build_quantized_structure
    from tadq.config import QuantConfig

    qmodel = build_quantized_structure(tiny_unet, QuantConfig.from_preset("W4A8", split_shortcut=True))
    qmap = qmodel.quantization_map()
    split = {name: entry["split_deep_channels"] for name, entry in qmap.items() if "split_deep_channels" in entry}
    assert split == {name: c for name, c in qmodel.adapter.concat_splits(tiny_unet).items()}
