import pytest
import torch
from torch import nn

from tadq.adapters import TEMPORAL_ROLES
from tadq.registry import adapter_for


def test_roles_come_from_structure(tiny_unet):
    adapter = adapter_for(tiny_unet)
    roles = {info.name: info.role for info in adapter.layers(tiny_unet)}
    assert roles["conv_in"] == "input_conv" and roles["conv_out"] == "output_conv"
    assert roles["time_embedding.linear_1"] == "time_embedding"
    assert roles["down_blocks.0.resnets.0.time_emb_proj"] == "time_projection"
    assert roles["down_blocks.1.attentions.0.to_q"] == "attention_qkv"
    assert roles["down_blocks.1.attentions.0.to_out.0"] == "attention_out"
    assert "shortcut" in roles.values() and "resample" in roles.values()
    assert "other" not in roles.values()
    layers = {n for n, m in tiny_unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(roles) == layers


def test_class_embedding_is_part_of_the_temporal_path():
    from tests.conftest import build_tiny_unet

    model = build_tiny_unet(num_class_embeds=10)
    adapter = adapter_for(model)
    temporal = [i for i in adapter.layers(model) if i.role in TEMPORAL_ROLES]
    # nn.Embedding is not quantizable, so the class path contributes no Linear here; the roles stay distinct
    assert all(i.role != "other" for i in adapter.layers(model))
    assert temporal


def test_blocks_follow_forward_order(tiny_unet):
    blocks = adapter_for(tiny_unet).blocks(tiny_unet)
    assert blocks.index("conv_in") < blocks.index("down_blocks.0.resnets.0")
    assert blocks.index("down_blocks.1.resnets.0") < blocks.index("down_blocks.1.attentions.0")
    assert blocks.index("mid_block.resnets.1") < blocks.index("up_blocks.0.resnets.0")
    assert blocks[-1] == "conv_out"


def test_unknown_model_raises_type_error():
    with pytest.raises(TypeError, match="register_adapter"):
        adapter_for(nn.Linear(2, 2))


def test_a_fourier_time_embedding_unet_is_refused_before_sampling(ddpm_scheduler):
    """An NCSN++-style UNet takes continuous σ: at the integer t = 0 tadq feeds it, log 0 made every output NaN and
    quantization failed after a calibration batch; now it is refused before the first step, naming why."""
    from diffusers import UNet2DModel

    from tadq import api
    from tadq.sampling import SamplerConfig

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), time_embedding_type="fourier").eval()
    with pytest.raises(ValueError, match="Gaussian-Fourier time embedding.*score-SDE"):
        api.sample(unet, ddpm_scheduler, SamplerConfig(kind="ddim", num_steps=2), num_samples=1, seed=0,
                   progress=False)


def test_a_unet_whose_output_is_not_its_input_shape_is_refused_before_any_call(ddpm_scheduler):
    """A UNet whose output is neither C channels nor a 2·C learned variance (which the adapter splits,
    tests/adapters/test_unet_learned_variance.py) used to fail at the first denoiser call, after the progress bar
    had started; it is refused where the sample shape is asked, before any call."""
    from diffusers import UNet2DModel

    from tadq import api
    from tadq.sampling import SamplerConfig

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=3, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    unet.forward = lambda *args, **kwargs: pytest.fail("the denoiser was called")
    with pytest.raises(ValueError, match="returns 3 channels for 1 input channels"):
        api.sample(unet, ddpm_scheduler, SamplerConfig(kind="ddim", num_steps=2), num_samples=1, seed=0,
                   progress=False)
