"""The temporal information block (TIB) of TFMQ-DM (docs/methods/tfmq.md#tib), found from adapter roles.

Notation (docs/methods/tfmq.md#tib): the timestep enters a UNet only through the temporal features

    emb_t    = h(t) [+ e(y)]                 h: sinusoidal projection → time-embedding MLP; e: label embedding
    f_{t,i}  = g_i(emb_t) = W_i·SiLU(emb_t)   ResBlock i's ``time_emb_proj`` (no SiLU when ``skip_time_act``)

They do not depend on x_t, and t comes from the finite sampler grid, so the TIB can be run alone on (t, y). A DiT
has no shared emb_t: every block embeds (t, y) itself and its adaLN modulation ``norm1.linear`` (and the final
layer's ``proj_out_1``) is g_i; its adapter gives each g_i's input (``temporal_projection_inputs``). The
layers come from the adapter's roles ``time_embedding``, ``class_embedding`` and ``time_projection``; the label
embedding is part of the TIB (the authors' code drops it: a code gap this module does not copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.resnet import ResnetBlock2D
from torch import Tensor, nn

from tadq.calibration.reconstruction import weight_pairs
from tadq.quant.quantizer import Quantizer

__all__ = ["TemporalFeature", "TemporalInformationBlock", "grid_inputs"]

TEMPORAL_ROLES = ("time_embedding", "class_embedding", "time_projection")


@dataclass(frozen=True)
class TemporalFeature:
    """One temporal feature f_i: the residual block that consumes it and its projection layer (qualified names)."""

    block: str
    layer: str


class TemporalInformationBlock:
    """h (+ e) and every g_i of one UNet (FP or converted), callable on (t, y) alone.

    Args:
        model: the UNet whose modules are used (not copied: a quantized model gives quantized features).
        adapter: its ``ModelAdapter``; the TIB's layers are those with temporal roles.
    """

    def __init__(self, model: nn.Module, adapter) -> None:
        self._projection_inputs = getattr(adapter, "temporal_projection_inputs", None)
        if not callable(self._projection_inputs) and not callable(getattr(adapter, "temporal_embedding", None)):
            raise TypeError(f"the {adapter.name!r} adapter ({type(model).__name__}) declares no temporal path "
                            "(temporal_embedding or temporal_projection_inputs, and temporal_modules): TFMQ-DM "
                            "cannot isolate its temporal features")
        self.model, self.adapter = model, adapter
        infos = [info for info in adapter.layers(model) if info.role in TEMPORAL_ROLES]
        self.layer_names: tuple[str, ...] = tuple(info.name for info in infos)
        self.features: tuple[TemporalFeature, ...] = tuple(
            TemporalFeature(info.block, info.name) for info in infos if info.role == "time_projection")
        if callable(self._projection_inputs):
            return  # the adapter computes each projection's input itself (a DiT's per-block adaLN embeddings)
        for feature in self.features:
            if not isinstance(model.get_submodule(feature.block), ResnetBlock2D):
                raise TypeError(f"{feature.layer} belongs to a {type(model.get_submodule(feature.block)).__name__}, "
                                "not a ResnetBlock2D: its temporal feature cannot be computed alone")

    @property
    def num_labels(self) -> int:
        """K, the number of class labels of a class-conditional model (0 for an unconditional one)."""
        counted = getattr(self.adapter, "temporal_num_labels", None)
        if callable(counted):
            return counted(self.model)
        embedding = getattr(self.model, "class_embedding", None)
        if embedding is None:
            return 0
        if not isinstance(embedding, nn.Embedding):
            raise NotImplementedError(f"class_embed_type={self.model.config.class_embed_type!r} takes continuous "
                                      "labels; TFMQ's finite-set tables need an nn.Embedding label table")
        return embedding.num_embeddings

    @property
    def projection_names(self) -> tuple[str, ...]:
        """The time-projection layers g_i (what the ordinary block reconstruction would otherwise learn)."""
        return tuple(feature.layer for feature in self.features)

    def modules(self) -> list[nn.Module]:
        """Every module the TIB runs: time projection (sinusoidal), h, the label embedding, and each g_i."""
        return self.adapter.temporal_modules(self.model) + [self.model.get_submodule(f.layer) for f in self.features]

    def _on_model(self, t: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``t`` and ``labels`` on the network's device: the grid's timesteps (the scheduler's) and label ranges are
        made on the CPU, and the sinusoidal projection computes on its input's device, so a CUDA network was fed
        CPU features."""
        parameter = next(self.model.parameters(), None)
        if parameter is None:
            return t, labels
        return t.to(parameter.device), None if labels is None else labels.to(parameter.device)

    def embedding(self, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """emb = h(t) [+ e(y)], (B, D), as the model's forward computes it (the adapter's temporal path)."""
        t, labels = self._on_model(t, labels)
        return self.adapter.temporal_embedding(self.model, t, labels)

    def __call__(self, t: Tensor, labels: Tensor | None = None) -> list[Tensor]:
        """The temporal features [f_{t,1}, ..., f_{t,n}], each (B, C_i), in ``self.features`` order."""
        t, labels = self._on_model(t, labels)
        if callable(self._projection_inputs):
            inputs = self._projection_inputs(self.model, t, labels)
            return [self.model.get_submodule(feature.layer)(inputs[feature.layer]) for feature in self.features]
        emb = self.embedding(t, labels)
        outputs = []
        for feature in self.features:
            resnet = self.model.get_submodule(feature.block)
            activated = emb if resnet.skip_time_act else resnet.nonlinearity(emb)
            outputs.append(self.model.get_submodule(feature.layer)(activated))
        return outputs

    def activation_quantizers(self) -> dict[str, Quantizer]:
        """The TIB's enabled activation quantizers by qualified name (what TIB-only FSC makes per-step)."""
        found = {}
        for layer in self.layer_names:
            for name, module in self.model.get_submodule(layer).named_modules(prefix=layer):
                if isinstance(module, Quantizer) and module.kind == "activation" and module.enabled:
                    found[name] = module
        return found

    def weight_pairs(self) -> list[tuple[Quantizer, Tensor]]:
        """(weight quantizer, weight) of every quantized TIB layer (what TIAR learns to round)."""
        return [pair for layer in self.layer_names for pair in weight_pairs(self.model.get_submodule(layer))]


def grid_inputs(timesteps: Tensor, num_labels: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """Every (t, y) of the finite deployment set: (t (N,), labels (N,) or ``None``, step index (N,)).

    N = S for an unconditional model, S·K (step-major) for a class-conditional one.
    """
    steps = torch.arange(len(timesteps))
    if num_labels == 0:
        return timesteps.long(), None, steps
    return (timesteps.long().repeat_interleave(num_labels), torch.arange(num_labels).repeat(len(timesteps)),
            steps.repeat_interleave(num_labels))
