"""The model adapter: answers "which module plays which role" so methods never guess from names.

Roles (``LayerRole``) of the quantizable layers (every ``nn.Conv2d``/``nn.Linear``):
``input_conv`` / ``output_conv`` (first and last layer: a UNet's first and last conv, a patch transformer's patch
embedding and final projection), ``time_embedding`` (the timestep MLP),
``class_embedding`` (label path), ``added_embedding`` (an embedding of further conditions added to the timestep
embedding, e.g. SDXL's pooled text + size/crop ids), ``time_projection`` (each residual block's projection of the
time embedding), ``block_conv`` (the convolutions inside residual blocks), ``shortcut`` (1x1 skip convs),
``attention_qkv`` (q, and k/v of self-attention), ``cross_attention_kv`` (k/v of cross-attention: their input is
the encoder states, e.g. the text embedding, the same at every sampler step), ``attention_out``,
``transformer_proj`` (a transformer block's ``proj_in``/``proj_out``), ``feed_forward`` (the transformer MLP,
GEGLU included), ``caption_projection`` (a projection of the encoder states before the cross-attentions read
them, e.g. PixArt's caption projection: its input is the same at every sampler step), ``resample`` (down/upsample
convs) and ``other``. A transformer's adaLN modulation projections (embedding → per-block scale/shift/gate) are
``time_projection``, its timestep MLPs ``time_embedding`` (``tadq.adapters.transformer2d``, ``tadq.adapters.mmdit``).
The temporal path is ``time_embedding`` + ``class_embedding`` + ``added_embedding`` + ``time_projection``
(TFMQ-DM's temporal information block).

Conditioning inputs (``ModelAdapter.conditioning_inputs``) are named as ``Conditioning.describe()`` names them:
a ``Conditioning`` attribute (``class_labels``, ``encoder_hidden_states``, ``pooled_embeds``, ``attention_mask``),
or ``added_cond_kwargs.<key>`` for an entry of ``Conditioning.added_cond_kwargs`` (e.g.
``added_cond_kwargs.time_ids``). The tuple lists what the model requires; an input a model accepts but does not
require (``attention_mask`` of a cross-attention UNet) is not listed and is documented by its adapter.

Optional adapter methods, looked up with ``getattr``: ``quant_attention_processor(name, attn)`` (the quantized
processor for an attention class ``QuantAttnProcessor`` does not reproduce, ``tadq.quant.attention``),
``check_prediction(model, prediction_type)`` (refuses a sampling plan whose prediction type the model does not
output, e.g. a flow-matching model under an ε scheduler), ``inference_cache`` (the cross-attention K/V memo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from tadq.sampling.conditioning import Conditioning

__all__ = ["ModelAdapter", "LayerRole", "LayerInfo", "TEMPORAL_ROLES", "LAYER_ROLES"]

LayerRole = Literal[
    "input_conv", "output_conv", "time_embedding", "class_embedding", "time_projection", "block_conv",
    "shortcut", "attention_qkv", "attention_out", "resample", "other", "added_embedding", "cross_attention_kv",
    "transformer_proj", "feed_forward", "caption_projection",
]
LAYER_ROLES: tuple[str, ...] = LayerRole.__args__  # type: ignore[attr-defined]
TEMPORAL_ROLES: tuple[str, ...] = ("time_embedding", "class_embedding", "added_embedding", "time_projection")


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer: its qualified name, role, and the reconstruction unit it belongs to."""

    name: str
    role: LayerRole
    block: str


@runtime_checkable
class ModelAdapter(Protocol):
    """What tadq needs to know about a denoiser architecture."""

    name: str

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        """Every quantizable layer with its role, in module order."""
        ...

    def blocks(self, model: nn.Module) -> list[str]:
        """Reconstruction units (qualified module names), in forward order."""
        ...

    def concat_splits(self, model: nn.Module) -> dict[str, int]:
        """Shortcut convs whose input is ``cat[deep | skip]``, mapped to the deep part's channels C1.

        Used by shortcut splitting (docs/methods/qdiffusion.md); derived from the forward, not from names.
        """
        ...

    def attention_modules(self, model: nn.Module) -> list[str]:
        """Qualified names of the attention modules whose matmul operands are quantized (Q-Diffusion)."""
        ...

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """The ``Conditioning`` fields ``model`` requires, named as in the module docstring (e.g.
        ``("class_labels",)``, ``("encoder_hidden_states", "pooled_embeds", "added_cond_kwargs.time_ids")``);
        empty when unconditional."""
        ...

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The model's prediction at (x, t, cond) in its scheduler's ``prediction_type`` (ε, v or x₀; the sampling
        walker converts it to ε), hiding the model's output container. Raises when ``cond`` does not carry exactly
        the inputs ``conditioning_inputs`` declares."""
        ...

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one sample."""
        ...
