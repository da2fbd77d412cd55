"""Adapter for diffusers ``UNet2DModel`` (unconditional or class-conditional pixel UNets).

Roles come from module types and the diffusers block structure (``ResnetBlock2D.time_emb_proj``,
``Attention.to_q``...), never from name substrings.
"""

from __future__ import annotations

from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
import torch
from torch import Tensor, nn

from tadq.adapters.base import LayerInfo, LayerRole
from tadq.registry import register_adapter

__all__ = ["UNet2DAdapter"]

QUANTIZABLE = (nn.Conv2d, nn.Linear)


def _named_roles(model: UNet2DModel) -> dict[int, tuple[LayerRole, str]]:
    """id(layer) → (role, owning block name) from the module tree."""
    roles: dict[int, tuple[LayerRole, str]] = {}

    def claim(module: nn.Module | None, role: LayerRole, block: str) -> None:
        if module is None:
            return
        for sub in module.modules():
            if isinstance(sub, QUANTIZABLE) and id(sub) not in roles:
                roles[id(sub)] = (role, block)

    names = {id(m): n for n, m in model.named_modules()}
    claim(model.conv_in, "input_conv", "conv_in")
    claim(model.conv_out, "output_conv", "conv_out")
    claim(model.time_embedding, "time_embedding", "time_embedding")
    claim(getattr(model, "class_embedding", None), "class_embedding", "class_embedding")
    for module in model.modules():
        block = names[id(module)]
        if isinstance(module, ResnetBlock2D):
            claim(module.time_emb_proj, "time_projection", block)
            claim(module.conv_shortcut, "shortcut", block)
            claim(module.conv1, "block_conv", block)
            claim(module.conv2, "block_conv", block)
        elif isinstance(module, Attention):
            for proj in (module.to_q, module.to_k, module.to_v):
                claim(proj, "attention_qkv", block)
            claim(module.to_out, "attention_out", block)
        elif isinstance(module, (Downsample2D, Upsample2D)):
            claim(module, "resample", block)
    return roles


@register_adapter(UNet2DModel)
class UNet2DAdapter:
    """Roles and calls for ``UNet2DModel``."""

    name = "unet2d"

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        roles = _named_roles(model)
        infos = []
        for name, module in model.named_modules():
            if isinstance(module, QUANTIZABLE):
                role, block = roles.get(id(module), ("other", name))
                infos.append(LayerInfo(name=name, role=role, block=block))
        return infos

    def blocks(self, model: nn.Module) -> list[str]:
        """Residual and attention blocks as units, every other layer its own unit (BRECQ, methods.md §1 B3).

        Ordered as the forward pass visits them (traced with one dummy input), not as modules are registered:
        diffusers registers a block's attentions before its resnets, and the mid block after the up blocks.
        """
        block_of = {info.name: info.block for info in self.layers(model)}
        order: list[str] = []
        handles = [
            module.register_forward_pre_hook(lambda _m, _a, name=name: order.append(block_of[name]))
            for name, module in model.named_modules() if name in block_of
        ]
        try:
            parameter = next(model.parameters())
            x = torch.zeros(1, *self.sample_shape(model), device=parameter.device, dtype=parameter.dtype)
            with torch.no_grad():
                self.predict_eps(model, x, torch.zeros(1, dtype=torch.long, device=parameter.device))
        finally:
            for handle in handles:
                handle.remove()
        return list(dict.fromkeys(order))

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        if getattr(model.config, "num_class_embeds", None):
            raise NotImplementedError("class-conditional UNet2DModel sampling needs labels; not supported yet")
        return model(x, t).sample

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        size = model.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (model.config.in_channels, height, width)
