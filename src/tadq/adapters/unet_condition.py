"""Adapter for diffusers ``UNet2DConditionModel``: Stable Diffusion 1.x/2.x and SDXL latent UNets.

Conditioning (field names as in ``tadq.adapters.base``; the pipelines build them from prompts):

- ``encoder_hidden_states`` (N, L, D): the text embedding every cross-attention reads (required);
- ``pooled_embeds`` (N, D'): SDXL's pooled text embedding, passed as ``added_cond_kwargs["text_embeds"]``
  (required when ``addition_embed_type="text_time"``);
- ``added_cond_kwargs.time_ids`` (N, k): SDXL's size/crop conditioning, ``added_cond_kwargs["time_ids"]``
  (required with ``pooled_embeds``; k = 6 for SDXL base, 5 for the refiner);
- ``class_labels`` (N,): only for a UNet with a class embedding (required then);
- ``attention_mask`` (N, L), 1 = keep, 0 = padding: optional, passed as ``encoder_attention_mask``.

Roles come from module types (``ResnetBlock2D``, ``Attention``, ``BasicTransformerBlock``, ``FeedForward``,
``Transformer2DModel``...), never from names; a ``BasicTransformerBlock`` (self-attention, cross-attention,
feed-forward) is one reconstruction unit, as in Q-Diffusion's Stable Diffusion code. The cross-attention K/V
projections get their own role, ``cross_attention_kv``, and are memoised during inference
(``tadq.quant.attention.CrossAttentionKVCache``, docs/methods/qdiffusion.md#cross-attention).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import Tensor, nn

from tadq.adapters._unet_common import (
    RoleClaims,
    TracedUNetAdapter,
    check_class_labels,
    claim_attention,
    claim_unet_parts,
    dummy_class_labels,
)
from tadq.adapters.base import LayerRole
from tadq.quant.attention import CrossAttentionKVCache, cross_attention_cache, cross_attentions
from tadq.registry import register_adapter
from tadq.sampling.conditioning import Conditioning

__all__ = ["UNet2DConditionAdapter", "sd_pipeline_class", "text_width"]

TEXT_TIME = "text_time"  # SDXL's addition_embed_type: pooled text + time ids added to the timestep embedding
OPTIONAL_INPUTS = ("attention_mask",)
DUMMY_TOKENS = 2  # sequence length of the tracing forward's text embedding (any length traces the same graph)
DUMMY_TIME_IDS = 6  # SDXL base's number of time ids, used to split the added embedding's input when tracing


def sd_pipeline_class(config: Mapping[str, Any]) -> str:
    """``StableDiffusionXLPipeline`` for an SDXL UNet (``addition_embed_type="text_time"``), else
    ``StableDiffusionPipeline``: the pipeline an artefact's ``model_index.json`` names."""
    return "StableDiffusionXLPipeline" if config.get("addition_embed_type") == TEXT_TIME else "StableDiffusionPipeline"


def _named_roles(model: UNet2DConditionModel) -> dict[int, tuple[LayerRole, str]]:
    """id(layer) → (role, owning block name): the UNet2DModel parts, plus the transformer blocks and SDXL's added
    embedding."""
    claims = RoleClaims(model)
    claims.claim(model.conv_in, "input_conv", "conv_in")
    claims.claim(model.conv_out, "output_conv", "conv_out")
    claims.claim(model.time_embedding, "time_embedding", "time_embedding")
    claims.claim(getattr(model, "class_embedding", None), "class_embedding", "class_embedding")
    claims.claim(getattr(model, "add_embedding", None), "added_embedding", "add_embedding")
    for module in model.modules():
        block = claims.names[id(module)]
        if isinstance(module, Transformer2DModel):
            for part in (getattr(module, "proj_in", None), getattr(module, "proj_out", None)):
                if part is not None:  # each its own unit: they sit between the group norm and the blocks
                    claims.claim(part, "transformer_proj", claims.names[id(part)])
        elif isinstance(module, BasicTransformerBlock):
            for sub in module.modules():
                if isinstance(sub, Attention):
                    claim_attention(claims, sub, block)
                elif isinstance(sub, FeedForward):
                    claims.claim(sub, "feed_forward", block)
        else:
            claim_unet_parts(claims, module, block)
    return claims.roles


def text_width(model: nn.Module) -> int:
    """D of the (N, L, D) text embedding the cross-attentions of ``model`` read, from the attention modules
    themselves (``cross_attention_dim`` may list one value per block, unused by blocks without cross-attention).
    Cross-attentions of different widths cannot all read the one ``encoder_hidden_states`` the UNet passes to every
    block (the first of another width failed in a matmul deep inside), so such a UNet is refused.

    Raises:
        NotImplementedError: the cross-attentions read different widths, named.
    """
    widths: dict[int, str] = {}
    for name, module in cross_attentions(model):  # found once per model: this runs at every forward
        # from the module's own settings, not its layers' shapes (the integer backends replace the layers)
        width = getattr(module, "added_kv_proj_dim", None) or module.cross_attention_dim
        widths.setdefault(int(width), name)
    if len(widths) > 1:
        raise NotImplementedError(f"cross_attention_dim={model.config.cross_attention_dim!r}: the cross-attentions "
                                  f"read text of widths {sorted(widths)} (e.g. {sorted(widths.values())[:2]}), but "
                                  "UNet2DConditionModel passes one encoder_hidden_states to every block: no "
                                  "conditioning fits them all")
    if widths:
        return next(iter(widths))
    width = model.config.cross_attention_dim  # no cross-attention: any width passes through unread
    return width if isinstance(width, int) else int(width[0])


_CACHES: weakref.WeakKeyDictionary[nn.Module, CrossAttentionKVCache] = weakref.WeakKeyDictionary()


@register_adapter(UNet2DConditionModel, subfolder="unet", pipeline_class="StableDiffusionPipeline",
                  pipeline_class_for=sd_pipeline_class)
class UNet2DConditionAdapter(TracedUNetAdapter):
    """Roles and calls for ``UNet2DConditionModel`` (SD 1.x/2.x cross-attention; SDXL ``text_time``)."""

    name = "unet2d_condition"
    optional_inputs = OPTIONAL_INPUTS
    splits_learned_variance = True  # a 2·C (learned-variance) output: ``predict_eps`` gives the ε half

    def _roles(self, model: nn.Module) -> dict[int, tuple[LayerRole, str]]:
        return _named_roles(model)

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("encoder_hidden_states",)``; SDXL adds ``"pooled_embeds", "added_cond_kwargs.time_ids"``, a class
        embedding ``"class_labels"``. ``attention_mask`` is accepted but optional.

        Raises:
            NotImplementedError: a layout tadq does not drive (Kandinsky/IF-style added or encoder projections).
        """
        config = model.config
        if config.addition_embed_type not in (None, TEXT_TIME):
            raise NotImplementedError(f"addition_embed_type={config.addition_embed_type!r} is not supported; "
                                      f"tadq drives Stable Diffusion (none) and SDXL ({TEXT_TIME!r})")
        if config.encoder_hid_dim_type is not None:
            raise NotImplementedError(f"encoder_hid_dim_type={config.encoder_hid_dim_type!r} is not supported")
        if getattr(config, "time_cond_proj_dim", None) is not None:
            # diffusers' pipelines feed such a UNet (LCM-style guidance distillation) a guidance-scale embedding as
            # timestep_cond and sample it without classifier-free guidance; tadq's walker does neither, so its
            # samples would silently differ from the pipeline's (and cond_proj would never see calibration data)
            raise NotImplementedError(f"time_cond_proj_dim={config.time_cond_proj_dim} (a guidance-embedding UNet, "
                                      "as in LCM) is not supported: its guidance scale is an input tadq's sampler "
                                      "does not pass")
        if getattr(config, "attention_type", "default") != "default":
            raise NotImplementedError(f"attention_type={config.attention_type!r} (GLIGEN grounding) is not supported: "
                                      "its gated attention reads grounding boxes and phrases tadq does not pass")
        if getattr(config, "dual_cross_attention", False):
            raise NotImplementedError("dual_cross_attention=True (DualTransformer2DModel, Versatile Diffusion) is not "
                                      "supported")
        text_width(model)  # one width for every block's cross-attention, or refused by name
        fields = ["encoder_hidden_states"]
        if config.addition_embed_type == TEXT_TIME:
            fields += ["pooled_embeds", "added_cond_kwargs.time_ids"]
        if getattr(model, "class_embedding", None) is not None:
            fields.append("class_labels")
        return tuple(fields)

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The UNet's output (its scheduler's prediction type) at (x, t, cond), its first ``in_channels`` for a
        learned-variance output (``prediction_half``); ``cond.unconditional`` is the walker's business (it batches
        both branches into ``cond`` itself).

        Raises:
            ValueError: ``cond`` lacks a required field, carries one this UNet does not take, or a shape that does
                not fit the config (text width ≠ ``cross_attention_dim``, pooled + time ids ≠ the added
                embedding's input).
        """
        self._check_fields(model, cond, self.optional_inputs,
                           hint="pass cond=Conditioning(encoder_hidden_states=...) (when sampling, conditions= a "
                                "ConditioningList or the pipeline's prompt conditions)")
        required = self.conditioning_inputs(model)
        self._check_shapes(model, x, cond)
        added = None
        if "pooled_embeds" in required:
            added = {"text_embeds": cond.pooled_embeds, "time_ids": cond.added_cond_kwargs["time_ids"]}
        output = model(x, t, encoder_hidden_states=cond.encoder_hidden_states, class_labels=cond.class_labels,
                       added_cond_kwargs=added, encoder_attention_mask=cond.attention_mask).sample
        return self.prediction_half(model, output)

    @staticmethod
    def _check_shapes(model: nn.Module, x: Tensor, cond: Conditioning) -> None:
        """Shape errors named in the conditioning's terms instead of a matmul error deep inside the UNet."""
        config, states = model.config, cond.encoder_hidden_states
        if cond.batch_size != x.shape[0]:
            raise ValueError(f"the conditioning has {cond.batch_size} rows for {x.shape[0]} samples")
        width = text_width(model)
        if states.ndim != 3 or states.shape[-1] != width:
            raise ValueError(f"encoder_hidden_states must be (N, L, {width}), got {list(states.shape)}")
        if cond.class_labels is not None:
            check_class_labels(model, cond.class_labels)
        if cond.attention_mask is not None and tuple(cond.attention_mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"attention_mask must be (N, L) = {list(states.shape[:2])}, got "
                             f"{list(cond.attention_mask.shape)}")
        if config.addition_embed_type == TEXT_TIME:
            pooled, time_ids = cond.pooled_embeds, cond.added_cond_kwargs["time_ids"]
            total = pooled.shape[-1] + time_ids.shape[-1] * config.addition_time_embed_dim
            if pooled.ndim != 2 or time_ids.ndim != 2 or total != config.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"pooled_embeds (N, D') and added_cond_kwargs.time_ids (N, k) must give D' + k·"
                    f"{config.addition_time_embed_dim} = projection_class_embeddings_input_dim "
                    f"{config.projection_class_embeddings_input_dim}; got {list(pooled.shape)} and "
                    f"{list(time_ids.shape)}")

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning:
        """Zeros of the shapes the config implies (for tracing): L = ``DUMMY_TOKENS``; SDXL's added input split as
        D' = P − k·a pooled + k time ids, k = 6 or fewer when 6·a > P (only their concatenation enters the UNet: a
        refiner-style P = D' + 5·a with D' < a used to ask for a pooled width below zero)."""
        parameter = next(model.parameters())
        device, dtype, config = parameter.device, parameter.dtype, model.config
        width = text_width(model)
        fields: dict[str, Any] = {"encoder_hidden_states": torch.zeros(batch_size, DUMMY_TOKENS, width, device=device,
                                                                       dtype=dtype)}
        inputs = self.conditioning_inputs(model)
        if "pooled_embeds" in inputs:
            total, per_id = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
            count = min(DUMMY_TIME_IDS, total // per_id)  # fewer ids when 6 would not fit (a narrow added input)
            fields["pooled_embeds"] = torch.zeros(batch_size, total - count * per_id, device=device, dtype=dtype)
            fields["added_cond_kwargs"] = {"time_ids": torch.zeros(batch_size, count, device=device, dtype=dtype)}
        if "class_labels" in inputs:  # a label table (or "timestep") takes indices, the others vectors
            fields["class_labels"] = dummy_class_labels(model, batch_size)
        return Conditioning(**fields)

    def temporal_embedding(self, model: nn.Module, t: Tensor, labels: Tensor | None = None,
                           cond: Conditioning | None = None) -> Tensor:
        """emb = h(t) [+ e(y)] [+ a(pooled, time ids)], (B, D), as ``UNet2DConditionModel.forward`` computes it
        (its step 1); TFMQ-DM's temporal information block starts here.

        Raises:
            NotImplementedError: an SDXL UNet without ``cond``: its added embedding a(·) depends on the pooled text
                embedding and time ids, not on (t, y) alone, so TFMQ-DM's finite-set tables over (t, y) (its TIB,
                called with timesteps and labels only) cannot cover it.
            ValueError: labels missing for, or given to, a UNet with(out) a class embedding.
        """
        config = model.config
        emb = model.time_embedding(model.time_proj(t).to(dtype=model.dtype))
        if getattr(model, "class_embedding", None) is not None:
            if labels is None:
                raise ValueError("this UNet has a class embedding: pass the class labels with the timesteps")
            label_input = model.time_proj(labels).to(dtype=model.dtype) if config.class_embed_type == "timestep" \
                else labels
            class_emb = model.class_embedding(label_input).to(dtype=model.dtype)
            emb = torch.cat([emb, class_emb], dim=-1) if config.class_embeddings_concat else emb + class_emb
        elif labels is not None:
            raise ValueError("labels given, but this UNet has no class embedding")
        if config.addition_embed_type == TEXT_TIME:
            if cond is None or cond.pooled_embeds is None or "time_ids" not in cond.added_cond_kwargs:
                raise NotImplementedError(
                    "SDXL's temporal path adds an embedding of the pooled text embedding and time ids "
                    "(add_embedding), which is not a function of (t, y): TFMQ-DM's temporal information block, "
                    "tabulated over the sampler's timesteps and class labels, does not cover SDXL; pass cond= to "
                    "compute the embedding of one conditioning")
            time_ids = cond.added_cond_kwargs["time_ids"]
            time_embeds = model.add_time_proj(time_ids.flatten()).reshape(time_ids.shape[0], -1)
            added = torch.cat([cond.pooled_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + model.add_embedding(added)
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        return emb

    def temporal_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``temporal_embedding`` runs: sinusoidal projection, the time MLP, the label embedding, SDXL's
        time-id projection and added embedding, the activation after the sum."""
        parts = [model.time_proj, model.time_embedding, getattr(model, "class_embedding", None),
                 getattr(model, "add_time_proj", None), getattr(model, "add_embedding", None),
                 getattr(model, "time_embed_act", None)]
        return [m for m in parts if m is not None]

    @contextmanager
    def inference_cache(self, model: nn.Module) -> Iterator[CrossAttentionKVCache]:
        """The cross-attention K/V memo of ``model`` for the enclosed inference calls (``QuantizedDenoiser.forward``
        enters it around every call); one memo per model, kept between calls, so the text's keys and values are
        computed once per prompt batch over a sampling run."""
        cache = _CACHES.get(model)
        if cache is None:
            cache = _CACHES[model] = CrossAttentionKVCache()
        with cross_attention_cache(model, cache) as active:
            yield active
