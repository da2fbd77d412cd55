"""Adapter for diffusers ``UNet2DModel`` (unconditional or class-conditional pixel UNets).

Roles come from module types and the diffusers block structure (``ResnetBlock2D.time_emb_proj``,
``Attention.to_q``...), never from name substrings. Facts that only the forward pass knows (block order, which
decoder inputs are ``[deep | skip]`` concatenations) are traced with one dummy forward and hooks.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import Tensor, nn

from tadq.adapters.base import LayerInfo, LayerRole
from tadq.registry import register_adapter
from tadq.sampling.conditioning import Conditioning

__all__ = ["UNet2DAdapter"]

logger = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)
SKIP_ARGUMENT = "res_hidden_states_tuple"  # how diffusers' decoder blocks receive the encoder's skip features


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


@register_adapter(UNet2DModel, subfolder="unet", pipeline_class="DDPMPipeline")
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
        """Residual and attention blocks as units, every other layer its own unit (BRECQ, docs/methods/qdiffusion.md).

        Ordered as the forward pass visits them (traced with one dummy input), not as modules are registered:
        diffusers registers a block's attentions before its resnets, and the mid block after the up blocks.
        """
        block_of = {info.name: info.block for info in self.layers(model)}
        order: list[str] = []
        hooks = {
            module: (lambda _m, _args, _kwargs, name=name: order.append(block_of[name]))
            for name, module in model.named_modules() if name in block_of
        }
        with _pre_hooks(hooks):
            self._dummy_forward(model)
        return list(dict.fromkeys(order))

    def concat_splits(self, model: nn.Module) -> dict[str, int]:
        """Decoder shortcut convs that read ``X = cat[h_deep, h_skip]``, mapped to C1 = channels of ``h_deep``.

        Shortcut splitting (docs/methods/qdiffusion.md) gives each half its own quantizers. The split point
        is measured in one dummy forward: a pre-hook on each decoder block reads the skip tensors it is handed
        (``res_hidden_states_tuple``; diffusers pops them from the end, one per resnet), and a pre-hook on each of
        its ``ResnetBlock2D`` reads the channels of the concatenated input, so C1 = C_in − C_skip. A resnet whose
        deep part does not match the tensor flowing into it (an unfamiliar block layout) is left out, with a warning.
        """
        names = {id(m): n for n, m in model.named_modules()}
        records: dict[str, dict] = {}  # block name → {"input": C, "skips": [C...], "resnets": [(name, C_in, C_out)]}
        hooks: dict[nn.Module, Callable] = {}
        for block in getattr(model, "up_blocks", ()):
            if SKIP_ARGUMENT not in inspect.signature(block.forward).parameters:
                continue
            block_name = names[id(block)]
            hooks[block] = _record_block_inputs(records, block_name, inspect.signature(block.forward))
            for resnet in block.modules():
                if isinstance(resnet, ResnetBlock2D):
                    hooks[resnet] = _record_resnet_input(records, block_name, names[id(resnet)], resnet.out_channels)
        with _pre_hooks(hooks):
            self._dummy_forward(model)
        return _splits_from_records(model, records)

    def attention_modules(self, model: nn.Module) -> list[str]:
        """Qualified names of the diffusers ``Attention`` modules (their matmuls are quantized, Q-Diffusion)."""
        return [name for name, module in model.named_modules() if isinstance(module, Attention)]

    def _dummy_forward(self, model: nn.Module) -> None:
        """One forward on zeros (batch 1, t = 0), for tracing; class-conditional models get label 0."""
        parameter = next(model.parameters())
        x = torch.zeros(1, *self.sample_shape(model), device=parameter.device, dtype=parameter.dtype)
        t = torch.zeros(1, dtype=torch.long, device=parameter.device)
        cond = None
        if self.conditioning_inputs(model):
            cond = Conditioning(class_labels=torch.zeros(1, dtype=torch.long, device=parameter.device))
        with torch.no_grad():
            self.predict_eps(model, x, t, cond)

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("class_labels",)`` for a UNet with a class embedding (``num_class_embeds`` / ``class_embed_type``)."""
        return ("class_labels",) if getattr(model, "class_embedding", None) is not None else ()

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The UNet's output (in its scheduler's prediction type) at (x, t), with ``cond.class_labels`` if it takes
        labels; ``cond.unconditional`` is the walker's business, not the model's."""
        if not self.conditioning_inputs(model):
            if cond is not None:
                raise ValueError(f"this UNet2DModel is unconditional but was given conditioning {cond.describe()}")
            return model(x, t).sample
        if cond is None or cond.class_labels is None:
            raise ValueError("this UNet2DModel is class-conditional: pass cond=Conditioning(class_labels=...) (e.g. "
                             "conditions=RandomClassLabels(num_classes, null_class) when sampling)")
        extra = sorted(k for k, v in cond.describe().items() if k not in ("class_labels", "unconditional") and v)
        if extra:
            raise ValueError(f"this UNet2DModel takes class_labels only, not {extra}")
        return model(x, t, class_labels=cond.class_labels).sample

    def temporal_embedding(self, model: nn.Module, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """emb = h(t) [+ e(y)], (B, D): the temporal path's input to every residual block, exactly as
        ``UNet2DModel.forward`` computes it (its step 1). TFMQ-DM's temporal information block starts here."""
        emb = model.time_embedding(model.time_proj(t).to(dtype=model.dtype))
        if model.class_embedding is not None:
            if labels is None:
                raise ValueError("this UNet is class-conditional: pass the class labels with the timesteps")
            label_input = model.time_proj(labels) if model.config.class_embed_type == "timestep" else labels
            emb = emb + model.class_embedding(label_input).to(dtype=model.dtype)
        elif labels is not None:
            raise ValueError("labels given, but this UNet has no class embedding")
        return emb

    def temporal_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``temporal_embedding`` runs: sinusoidal projection, the time MLP h, the label table e."""
        parts = [model.time_proj, model.time_embedding, getattr(model, "class_embedding", None)]
        return [m for m in parts if m is not None]

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        size = model.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (model.config.in_channels, height, width)


@contextmanager
def _pre_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    """Install ``module → hook(module, args, kwargs)`` forward pre-hooks for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record_block_inputs(records: dict[str, dict], block_name: str, signature: inspect.Signature) -> Callable:
    """Pre-hook for a decoder block: channels of its input and of each skip tensor it receives."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind(*args, **kwargs).arguments
        hidden, skips = next(iter(bound.values())), bound[SKIP_ARGUMENT]
        records[block_name] = {"input": hidden.shape[1], "skips": [s.shape[1] for s in skips], "resnets": []}

    return hook


def _record_resnet_input(records: dict[str, dict], block_name: str, name: str, out_channels: int) -> Callable:
    """Pre-hook for a decoder resnet: channels of its (concatenated) input, in call order."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        records[block_name]["resnets"].append((name, hidden.shape[1], out_channels))

    return hook


def _splits_from_records(model: nn.Module, records: dict[str, dict]) -> dict[str, int]:
    """C1 per shortcut conv: resnet i of a block consumes the i-th skip tensor from the end of the tuple."""
    splits: dict[str, int] = {}
    for record in records.values():
        skips = list(reversed(record["skips"]))
        deep_expected = record["input"]
        for index, (name, in_channels, out_channels) in enumerate(record["resnets"]):
            if index >= len(skips):
                break
            deep = in_channels - skips[index]
            resnet = model.get_submodule(name)
            if deep != deep_expected or deep <= 0:
                logger.warning("%s: input of %d channels is not [deep %d | skip %d]; not split",
                               name, in_channels, deep_expected, skips[index])
            elif resnet.conv_shortcut is not None:
                splits[f"{name}.conv_shortcut"] = deep
            deep_expected = out_channels
    return splits
