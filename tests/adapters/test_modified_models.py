"""Models a user changed at run time before quantizing them (docs/architecture.md#models-changed-at-run-time).

``fuse_qkv_projections()`` then ``unfuse_qkv_projections()`` leaves the fused ``to_qkv``/``to_kv`` layers and the
``fused_projections`` flag on every attention (diffusers only restores the processors): such a model was refused
as fused, with the advice to call the very method the user had called; it now quantizes as if never fused. PEFT
adapter layers (a LoRA, fused or not, not unloaded) are refused by name before any forward, with the calls that
make the model plain; they used to be quantized matrix by matrix into an artefact that did not load (unfused) or
to fail after calibration (fused). A memory-saving attention processor (``set_attention_slice``) is refused with
quantized attention naming ``set_default_attn_processor()``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler
from tests.adapters.test_transformer_configs import _pixart
from tests.conftest import build_tiny_sd_unet, counting_forwards
from torch import nn

import tadq
from tadq import api
from tadq.config import CalibrationConfig, QuantConfig
from tadq.sampling import Conditioning, ConditioningList, SamplerConfig

DDIM = SamplerConfig("ddim", num_steps=2, eta=0.0)


def _text() -> ConditioningList:
    generator = torch.Generator().manual_seed(0)
    return ConditioningList(Conditioning(encoder_hidden_states=torch.randn(2, 3, 16, generator=generator)))


def _config() -> QuantConfig:
    """W8A8 naive with quantized attention, min/max ranges (the MSE range search was most of a test's time)."""
    calibration = CalibrationConfig(sampler=DDIM, num_trajectories=2, num_steps_kept=2, samples_per_step=2,
                                    batch_size=4)
    config = QuantConfig.from_preset("W8A8", calibration=calibration, method="naive", fp_layers="none",
                                     quantize_attention=True)
    return dataclasses.replace(config, weights=dataclasses.replace(config.weights, range_method="minmax"),
                               activations=dataclasses.replace(config.activations, range_method="minmax"))


def _images(model: nn.Module) -> torch.Tensor:
    return api.sample(model, DDIMScheduler(), DDIM, num_samples=2, seed=3, progress=False,
                      conditions=_text()).images


def _pixart_of_sd_width() -> nn.Module:
    torch.manual_seed(0)
    return _pixart()


@pytest.mark.parametrize("build", [build_tiny_sd_unet, _pixart_of_sd_width], ids=["sd-unet", "pixart"])
def test_a_model_fused_then_unfused_quantizes_saves_and_loads_as_the_never_fused_model(tmp_path, build):
    """The stale ``to_qkv`` is never called (the restored processors read ``to_q``/``to_k``/``to_v``): the
    quantized model is the never-fused model's to the bit, and its artefact loads; the user's model keeps its
    layers (tadq drops them from its own copy only)."""
    plain = build().eval()
    unfused = build().eval()
    unfused.fuse_qkv_projections()
    unfused.unfuse_qkv_projections()
    attention = next(m for m in unfused.modules() if hasattr(m, "to_qkv"))
    assert attention.fused_projections  # what diffusers leaves: the case under test
    scheduler = DDIMScheduler()
    expected = _images(api.quantize(plain, scheduler, _config(), conditions=_text(), progress=False))
    qmodel = api.quantize(unfused, scheduler, _config(), conditions=_text(), progress=False)
    assert torch.equal(_images(qmodel), expected)
    assert not any(name.endswith(("to_qkv", "to_kv")) for name, _ in qmodel.model.named_modules())
    qmodel.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, _ = tadq.load(tmp_path / "artefact")
    assert torch.equal(_images(loaded), expected)
    assert hasattr(attention, "to_qkv") and attention.fused_projections


def test_sliced_attention_is_refused_with_quantized_attention_naming_the_default_processor():
    model = build_tiny_sd_unet()
    model.set_attention_slice(1)
    with counting_forwards(model) as calls, pytest.raises(NotImplementedError, match=(
            r"runs SlicedAttnProcessor, .* quantize with quantize_attention=False, or restore diffusers' default "
            r"processor first \(model\.set_default_attn_processor\(\)")):
        api.quantize(model, DDIMScheduler(), _config(), conditions=_text(), progress=False)
    assert calls == [0]


class BaseTunerLayer:
    """A stand-in for PEFT's base class (PEFT is not a tadq dependency): the check knows it by name and library."""

    merged = False


BaseTunerLayer.__module__ = "peft.tuners.tuners_utils"


class _LoraLinear(nn.Module, BaseTunerLayer):
    """What ``model.add_adapter(LoraConfig(...))`` puts in place of a linear: the base layer and the two LoRA
    matrices, base(x) + B(A(x))."""

    def __init__(self, base: nn.Linear, merged: bool) -> None:
        super().__init__()
        self.base_layer, self.merged = base, merged
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else out + self.lora_B["default"](self.lora_A["default"](x))


@pytest.mark.parametrize(("merged", "advice"), [
    (False, r"not fused: fuse the LoRA first, model\.fuse_lora\(\) .* then drop the adapter layers with "
            r"model\.unload_lora\(\)"),
    (True, r"fused \(merged\) into their base layers, but the adapter layers are still in place: drop them with "
           r"model\.unload_lora\(\)"),
])
def test_adapter_layers_are_refused_by_name_before_any_forward(merged, advice):
    model = build_tiny_sd_unet()
    attention = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    attention.to_q = _LoraLinear(attention.to_q, merged)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with counting_forwards(model) as calls, pytest.raises(ValueError, match=(
            rf"^tadq\.quantize: this UNet2DConditionModel carries 1 PEFT adapter layers \(e\.g\. {name}, a "
            rf"{__name__}\._LoraLinear\); tadq quantizes and saves plain layers\. Its adapters are {advice}")):
        api.quantize(model, DDIMScheduler(), _config(), conditions=_text(), progress=False)
    assert calls == [0]


def test_a_peft_lora_is_refused_until_fused_and_unloaded_then_quantizes_as_the_plain_fused_model():
    """With PEFT itself (skipped without it): a random non-zero LoRA, unfused and fused, is refused; after
    ``fuse_lora()`` and ``unload_lora()`` the model quantizes as a plain model holding the fused weights."""
    peft = pytest.importorskip("peft")
    model = build_tiny_sd_unet()
    model.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    for step in (lambda: None, model.fuse_lora):
        step()
        with counting_forwards(model) as calls, pytest.raises(ValueError, match="PEFT adapter layers"):
            api.quantize(model, DDIMScheduler(), _config(), conditions=_text(), progress=False)
        assert calls == [0]
    model.unload_lora()
    plain = build_tiny_sd_unet()
    plain.load_state_dict(copy.deepcopy(model.state_dict()))
    scheduler = DDIMScheduler()
    expected = _images(api.quantize(plain, scheduler, _config(), conditions=_text(), progress=False))
    assert torch.equal(_images(api.quantize(model, scheduler, _config(), conditions=_text(), progress=False)),
                       expected)
