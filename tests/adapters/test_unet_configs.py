"""UNet configurations no other test builds, run as a user runs them (a robustness probe): ``UNet2DModel`` with
scale-shift norms, no mid attention, timestep-embedded labels, resnet resampling, three channels, score-SDE skip
blocks; ``UNet2DConditionModel`` with projected or timestep-embedded class labels, concatenated class embeddings,
linear projections with deeper transformers, per-block head sizes, cross-attention only, no mid block, an odd
sample size. Each is quantized, sampled, saved and loaded, and converted to the integer backend, or refused by name
before any calibration work."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from tests.conftest import build_tiny_sd_unet
from torch import nn
from typer.testing import CliRunner

import tadq
from tadq import api
from tadq.backends import int8_cpu_missing
from tadq.cli.app import app
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant.modules import QuantLayer
from tadq.registry import adapter_for
from tadq.sampling import Conditioning, ConditioningList, RandomClassLabels, SamplerConfig
from tadq.tfmq import TFMQConfig, quantize_tfmq

SAMPLER = SamplerConfig("ddim", num_steps=3, eta=0.0)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=2, num_steps_kept=2, samples_per_step=2, batch_size=4)
TOKENS, WIDTH = 3, 16  # text length and width (cross_attention_dim of build_tiny_sd_unet)
LABEL_DIM = 6  # projection_class_embeddings_input_dim of the projected-label UNets

SKIP_LAYOUT = dict(in_channels=3, out_channels=3, block_out_channels=(32, 32), norm_num_groups=8,
                   down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                   up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"))  # its attention norm has 32 groups


def _unet(**overrides) -> UNet2DModel:
    torch.manual_seed(0)
    config = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                  norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                  up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    return UNet2DModel(**(config | overrides)).eval()


def _text(n: int = 4, labels=None) -> ConditioningList:
    """n rows of random text embeddings, with class labels drawn by ``labels(n, generator)`` if given."""
    generator = torch.Generator().manual_seed(0)
    fields = {"encoder_hidden_states": torch.randn(n, TOKENS, WIDTH, generator=generator)}
    if labels is not None:
        fields["class_labels"] = labels(n, generator)
    return ConditioningList(Conditioning(**fields))


def _labels(labels, n: int = 4) -> ConditioningList:
    return ConditioningList(Conditioning(class_labels=labels(n, torch.Generator().manual_seed(0))))


def _vectors(n, generator):
    return torch.randn(n, LABEL_DIM, generator=generator)


def _indices(count):
    return lambda n, generator: torch.randint(0, count, (n,), generator=generator)


PIXEL_CASES = {
    "scale_shift": (lambda: _unet(resnet_time_scale_shift="scale_shift"), None),
    "no_mid_attention": (lambda: _unet(add_attention=False), None),
    "timestep_labels": (lambda: _unet(class_embed_type="timestep"), RandomClassLabels(5)),
    "identity_labels": (lambda: _unet(class_embed_type="identity"),
                        _labels(lambda n, g: torch.randn(n, 16, generator=g))),
    "attn_norm_groups": (lambda: _unet(attn_norm_num_groups=2), None),
    "resnet_resampling_blocks": (lambda: _unet(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                                               up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")), None),
    "resnet_resample_type": (lambda: _unet(downsample_type="resnet", upsample_type="resnet"), None),
    "rgb_12px": (lambda: _unet(in_channels=3, out_channels=3, sample_size=12), None),
    "skip_blocks": (lambda: _unet(**SKIP_LAYOUT), None),
}

LATENT_CASES = {
    "projection_labels": (lambda: build_tiny_sd_unet(class_embed_type="projection",
                                                     projection_class_embeddings_input_dim=LABEL_DIM),
                          _text(labels=_vectors)),
    "simple_projection_labels": (lambda: build_tiny_sd_unet(class_embed_type="simple_projection",
                                                            projection_class_embeddings_input_dim=LABEL_DIM),
                                 _text(labels=_vectors)),
    "timestep_labels": (lambda: build_tiny_sd_unet(class_embed_type="timestep"), _text(labels=_indices(1000))),
    "concatenated_labels": (lambda: build_tiny_sd_unet(num_class_embeds=3, class_embeddings_concat=True),
                            _text(labels=_indices(3))),
    "linear_two_layers": (lambda: build_tiny_sd_unet(use_linear_projection=True, transformer_layers_per_block=2),
                          _text()),
    "head_dim_per_block": (lambda: build_tiny_sd_unet(attention_head_dim=(2, 4)), _text()),
    "only_cross_attention": (lambda: build_tiny_sd_unet(only_cross_attention=True), _text()),
    "no_mid_block": (lambda: build_tiny_sd_unet(mid_block_type=None), _text()),
    "odd_size": (lambda: build_tiny_sd_unet(sample_size=7), _text()),
    "scale_shift": (lambda: build_tiny_sd_unet(resnet_time_scale_shift="scale_shift"), _text()),
}


def _config(preset: str = "W8A8", **overrides) -> QuantConfig:
    return QuantConfig.from_preset(preset, calibration=CALIB, method="naive", **overrides)


def _sample(denoiser, scheduler, conditions) -> torch.Tensor:
    return api.sample(denoiser, scheduler, SAMPLER, num_samples=2, seed=3, progress=False,
                      conditions=conditions).images


def _check_roles(model: nn.Module) -> None:
    roles = {info.name: info.role for info in adapter_for(model).layers(model)}
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(roles) == layers
    assert [name for name, role in roles.items() if role == "other"] == []


def _quantize_sample_and_reload(build, conditions, tmp_path) -> None:
    model = build()
    _check_roles(model)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    qmodel = api.quantize(model, scheduler, _config(fp_layers="none"), conditions=conditions, progress=False)
    assert all(plan.quantized for plan in qmodel.plans)
    images = _sample(qmodel, scheduler, conditions)
    assert torch.isfinite(images).all()
    assert not torch.equal(images, _sample(model, scheduler, conditions))  # the quantizers act
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = tadq.load(tmp_path / "artefact")
    assert torch.equal(_sample(loaded, loaded_scheduler, conditions), images)


@pytest.mark.parametrize("case", sorted(PIXEL_CASES))
def test_a_unet2d_configuration_quantizes_samples_and_round_trips(case, tmp_path):
    _quantize_sample_and_reload(*PIXEL_CASES[case], tmp_path)


@pytest.mark.parametrize("case", sorted(LATENT_CASES))
def test_a_conditional_unet_configuration_quantizes_samples_and_round_trips(case, tmp_path):
    _quantize_sample_and_reload(*LATENT_CASES[case], tmp_path)


@pytest.mark.parametrize("case", ["projection_labels", "simple_projection_labels", "timestep_labels",
                                  "concatenated_labels"])
def test_the_class_labels_of_a_text_unet_reach_the_model(case):
    """Next to the text, each kind of class embedding gets the labels: the call is the diffusers model's own, and
    other labels give another prediction (not silently dropped)."""
    build, conditions = LATENT_CASES[case]
    model = build()
    adapter = adapter_for(model)
    assert adapter.conditioning_inputs(model) == ("encoder_hidden_states", "class_labels")
    cond = conditions(0, [0, 1])
    other = dataclasses.replace(cond, class_labels=conditions(0, [2, 3]).class_labels)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        got = adapter.predict_eps(model, x, t, cond)
        assert torch.equal(got, model(x, t, encoder_hidden_states=cond.encoder_hidden_states,
                                      class_labels=cond.class_labels).sample)
        assert not torch.equal(got, adapter.predict_eps(model, x, t, other))


def test_the_skip_convs_of_score_sde_blocks_are_input_and_output_convs():
    """A skip down block's skip_conv reads the (FIR-downsampled) input sample, a skip up block's writes image
    channels added to the prediction after conv_out: the first/last layers of their resolution, kept in float by
    fp_layers="first_last" as conv_in/conv_out are (they were "other", and quantized)."""
    model = _unet(**SKIP_LAYOUT)
    infos = {info.name: info for info in adapter_for(model).layers(model)}
    assert infos["down_blocks.0.skip_conv"].role == "input_conv"
    assert infos["up_blocks.0.skip_conv"].role == "output_conv"
    assert infos["down_blocks.0.skip_conv"].block == "down_blocks.0.skip_conv"  # its own reconstruction unit
    assert "down_blocks.0.skip_conv" in adapter_for(model).blocks(model)
    structure = api.build_quantized_structure(model, _config(fp_layers="first_last"))
    in_float = sorted(plan.name for plan in structure.plans if not plan.quantized)
    assert in_float == ["conv_in", "conv_out", "down_blocks.0.skip_conv", "up_blocks.0.skip_conv"]


def _never_called(model: nn.Module) -> nn.Module:
    model.forward = lambda *args, **kwargs: pytest.fail("the denoiser was called")
    return model


@pytest.mark.parametrize(("build", "error", "named"), [
    (lambda: _unet(time_embedding_type="fourier", **SKIP_LAYOUT), ValueError, "Gaussian-Fourier time embedding"),
    (lambda: _unet(sample_size=7), ValueError, r"7x7, not a multiple of 2"),
    (lambda: build_tiny_sd_unet(addition_embed_type="text", encoder_hid_dim=WIDTH), NotImplementedError,
     "addition_embed_type='text'"),
    (lambda: build_tiny_sd_unet(addition_embed_type="image", encoder_hid_dim=WIDTH), NotImplementedError,
     "addition_embed_type='image'"),
    (lambda: build_tiny_sd_unet(encoder_hid_dim=12), NotImplementedError, "encoder_hid_dim_type='text_proj'"),
    (lambda: build_tiny_sd_unet(time_cond_proj_dim=8), NotImplementedError, "time_cond_proj_dim=8"),
    (lambda: build_tiny_sd_unet(in_channels=9), ValueError, "returns 4 channels for 9 input channels"),
])
def test_an_unsupported_configuration_is_refused_by_name_before_any_call(build, error, named):
    model = _never_called(build())
    conditions = _text() if isinstance(model, UNet2DConditionModel) else None
    with pytest.raises(error, match=named):
        api.quantize(model, DDIMScheduler(num_train_timesteps=1000), _config(), conditions=conditions,
                     progress=False)


@pytest.mark.parametrize(("build", "conditions", "named"), [
    (lambda: _unet(class_embed_type="timestep"), RandomClassLabels(5), "class_embed_type='timestep'"),
    (lambda: build_tiny_sd_unet(class_embed_type="projection", projection_class_embeddings_input_dim=LABEL_DIM),
     _text(labels=_vectors), "class_embed_type='projection'"),
])
def test_tfmq_refuses_continuous_labels_before_calibrating(build, conditions, named):
    """TFMQ-DM tabulates the temporal path over (t, label index); labels that are not table rows used to be refused
    only after the calibration trajectories had been sampled."""
    model = _never_called(build())
    with pytest.raises(NotImplementedError, match=f"{named} takes continuous labels"):
        quantize_tfmq(model, DDIMScheduler(num_train_timesteps=1000), _config(), TFMQConfig(), SAMPLER,
                      conditions=conditions, progress=False)


@pytest.mark.parametrize("embed_type", ["identity", "timestep"])
def test_the_cli_names_a_class_embedding_it_cannot_draw_labels_for(embed_type, tmp_path):
    """`tadq quantize` draws label indices below the null class; a label-vector or timestep-embedded class input
    has no table to draw from (it said "no real class below the null class None")."""
    folder = tmp_path / "pipe"
    DDPMPipeline(unet=_unet(class_embed_type=embed_type), scheduler=DDPMScheduler()).save_pretrained(folder)
    result = CliRunner().invoke(app, ["quantize", str(folder), "--out", str(tmp_path / "q"), "--steps", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert f"class_embed_type='{embed_type}'" in text and "not a table of classes" in text
    assert not (tmp_path / "q").exists()


@pytest.mark.skipif(int8_cpu_missing() is not None, reason=f"no int8 CPU backend here: {int8_cpu_missing()}")
@pytest.mark.parametrize("case", [PIXEL_CASES["skip_blocks"], PIXEL_CASES["timestep_labels"],
                                  LATENT_CASES["projection_labels"]], ids=["skip_blocks", "timestep_labels",
                                                                           "projection_labels"])
def test_the_int8_backend_converts_every_layer_of_the_configuration(case, tmp_path):
    """W4A8 (4-bit weight codes run on every oneDNN CPU): every quantized layer, the new roles included (skip convs,
    label projections), becomes an integer kernel, and the integer model samples with the conditioning."""
    build, conditions = case
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    qmodel = api.quantize(build(), scheduler, _config("W4A8", fp_layers="none"), conditions=conditions,
                          progress=False)
    assert all(plan.quantized for plan in qmodel.plans)
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    integer, loaded_scheduler = tadq.load(tmp_path / "artefact", backend="int8")
    assert [name for name, module in integer.model.named_modules() if isinstance(module, QuantLayer)] == []
    assert torch.isfinite(_sample(integer, loaded_scheduler, conditions)).all()
