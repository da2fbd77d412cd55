"""Adapters for diffusers' patch transformers: ``DiTTransformer2DModel`` (class-conditional DiT) and
``PixArtTransformer2DModel`` (text-conditional PixArt-α/Σ).

Both cut the latent into p×p patches (``pos_embed.proj``, a stride-p conv), run ``transformer_blocks`` of
diffusers' ``BasicTransformerBlock`` on the tokens and project every token back to a patch. Roles (names as in
``tadq.adapters.base``), claimed from module types and the diffusers structure, never from name substrings:

- ``pos_embed.proj`` (the patch-embedding conv): ``input_conv``, its own unit;
- timestep MLPs: DiT ``transformer_blocks.i.norm1.emb.timestep_embedder`` (unit: block i), PixArt
  ``adaln_single.emb.timestep_embedder`` (its own unit): ``time_embedding``;
- adaLN modulation (embedding → shift/scale/gate): DiT ``transformer_blocks.i.norm1.linear`` (unit: block i) and
  ``proj_out_1`` (final layer), PixArt ``adaln_single.linear``: ``time_projection``;
- PixArt-α size conditions ``adaln_single.emb.resolution_embedder`` / ``aspect_ratio_embedder``:
  ``added_embedding``, each its own unit;
- PixArt ``caption_projection.linear_1/2``: ``caption_projection``, one unit;
- ``attn1.to_q/k/v`` and ``attn2.to_q``: ``attention_qkv``; PixArt ``attn2.to_k/to_v`` (they read the caption):
  ``cross_attention_kv``; ``attn*.to_out.0``: ``attention_out``; ``ff.net.0.proj``, ``ff.net.2``:
  ``feed_forward`` (unit: their block);
- DiT ``proj_out_2`` / PixArt ``proj_out``: ``output_conv``, its own unit.

The adaLN modulation projections are the transformers' counterpart of a UNet residual block's ``time_emb_proj``
(a projection of the timestep (+ label) embedding into per-block scale and shift), hence ``time_projection``; the
timestep MLPs are ``time_embedding``: the temporal-path roles of ``TEMPORAL_ROLES`` and the ``first_last_time`` FP
preset find them under the same names as in a UNet. DiT's class-label table (``class_embedder.embedding_table``)
is an ``nn.Embedding``, not a quantizable layer; PixArt's ``scale_shift_table`` tensors (per block and final) are
parameters, not layers: both stay in floating point. A ``Linear``/``Conv2d`` none of these rules claims (e.g.
GLIGEN's gated fuser, ``attention_type="gated"``) makes ``layers`` raise, naming it: no layer is ever silently left
without a role.

Reconstruction units: each transformer block (its own adaLN embedding and modulation included in DiT, where every
block owns a copy of the timestep/label embedding), and every other layer alone, in forward order (traced).
DiT's final layer re-runs block 0's embedding (``transformer_blocks[0].norm1.emb``): those layers belong to unit
``transformer_blocks.0``.

Learned variance: DiT and PixArt-α checkpoints predict (ε, Σ) with ``out_channels = 2·in_channels``;
``predict_eps`` returns only the ε half (the first ``in_channels`` channels, as diffusers' DiT and PixArt pipelines
split it), so samplers, calibration and reconstruction see ε. ``out_channels = in_channels`` is returned whole.

Latent size: ``sample_shape`` (asked before any sampling or calibration) refuses a ``sample_size`` side that is not
a multiple of ``patch_size``: the stride-p patch embedding would drop the remainder and the model would return a
smaller prediction than the latent it was given.

Conditioning:

- DiT: ``class_labels`` (N,) in [0, K], K = ``num_embeds_ada_norm`` real classes; K itself is the null class
  (the last row of the label table, ``DiTAdapter.null_class``) used for the unconditional guidance branch, e.g.
  ``RandomClassLabels(K, null_class=K)``.
- PixArt: ``encoder_hidden_states`` (N, L, D_caption), D_caption = ``caption_channels`` (the T5 width, projected
  by ``caption_projection``) or, when the model has no caption projection, ``cross_attention_dim`` (what its
  cross-attentions read); ``attention_mask`` (N, L), 1 = keep, optional, passed as ``encoder_attention_mask``;
  with ``use_additional_conditions`` (PixArt-α at 1024 px) also ``added_cond_kwargs.resolution`` (N, 2) and
  ``added_cond_kwargs.aspect_ratio`` (N, 1), otherwise both are passed as ``None`` as diffusers' pipeline does.
  The cross-attention K/V of the caption are memoised during inference as in the cross-attention UNet
  (``tadq.quant.attention.CrossAttentionKVCache``).

Attention matmuls (``quantize_attention=True``): both models use diffusers' ``Attention`` with the default
processor, which ``QuantAttnProcessor`` reproduces (PixArt's caption mask arrives as the additive bias it handles),
so every ``attn1``/``attn2`` is quantized like a UNet's.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from tadq.adapters._unet_common import (
    INDEX_DTYPES,
    QUANTIZABLE,
    RoleClaims,
    TracedUNetAdapter,
    check_processor_layers,
    check_unfused,
    claim_attention,
)
from tadq.adapters.base import LayerInfo, LayerRole
from tadq.adapters.unet_condition import UNet2DConditionAdapter
from tadq.registry import register_adapter
from tadq.sampling.conditioning import Conditioning

__all__ = ["DiTAdapter", "PixArtAdapter"]

DUMMY_TOKENS = 2  # caption length of the tracing forward (any length traces the same graph)
PIXART_ADDED = ("added_cond_kwargs.resolution", "added_cond_kwargs.aspect_ratio")
PIXART_OPTIONAL = ("attention_mask",)


def claim_transformer_block(claims: RoleClaims, block: BasicTransformerBlock, unit: str) -> None:
    """A ``BasicTransformerBlock``: its adaLN(-Zero) timestep embedding and modulation, attentions, feed-forward."""
    norm1 = block.norm1
    embedding = getattr(norm1, "emb", None)
    if embedding is not None:  # DiT's AdaLayerNormZero: timestep MLP (+ label table, an nn.Embedding)
        claims.claim(getattr(embedding, "timestep_embedder", None), "time_embedding", unit)
    if isinstance(getattr(norm1, "linear", None), nn.Linear):  # the modulation: emb → shift, scale, gate
        claims.claim(norm1.linear, "time_projection", unit)
    for sub in block.modules():
        if isinstance(sub, Attention):
            claim_attention(claims, sub, unit)
        elif isinstance(sub, FeedForward):
            claims.claim(sub, "feed_forward", unit)


class _PatchTransformerAdapter(TracedUNetAdapter):
    """What DiT and PixArt share: roles of the blocks and the patch embedding, refusal of unclaimed layers, no
    ``[deep | skip]`` splits, the ε half of a learned-variance output. Block order, attention modules and the sample
    shape come from the traced UNet adapter (the same module-type and hook logic applies)."""

    splits_learned_variance = True  # C or 2·C output channels; ``sample_shape`` refuses any other count

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        raise NotImplementedError

    def _roles(self, model: nn.Module) -> dict[int, tuple[LayerRole, str]]:
        claims = RoleClaims(model)
        claims.claim(model.pos_embed.proj, "input_conv", "pos_embed.proj")
        self._claim_model(claims, model)
        for module in model.modules():
            if isinstance(module, BasicTransformerBlock):
                claim_transformer_block(claims, module, claims.names[id(module)])
        return claims.roles

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        """Every ``Linear``/``Conv2d`` with its role and unit, in module order.

        Raises:
            NotImplementedError: a layer no rule claims (an unfamiliar block layout), named; fused q/k/v
                projections (``check_unfused``), with the call that undoes them; an attention processor holding
                layers (``check_processor_layers``).
        """
        check_unfused(model)
        check_processor_layers(model)
        roles = self._roles(model)
        infos, unclaimed = [], []
        for name, module in model.named_modules():
            if isinstance(module, QUANTIZABLE):
                if id(module) in roles:
                    role, block = roles[id(module)]
                    infos.append(LayerInfo(name=name, role=role, block=block))
                else:
                    unclaimed.append(name)
        if unclaimed:
            raise NotImplementedError(f"{type(model).__name__}: tadq knows no role for {unclaimed}; this layout "
                                      "(config) is not supported by the transformer adapter")
        return infos

    def concat_splits(self, model: nn.Module) -> dict[str, int]:
        """None: a transformer has no decoder convs reading ``[deep | skip]`` concatenations (split_shortcut is a
        no-op)."""
        return {}

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) from the config, as the traced adapter reads it; asked before any sampling or calibration.

        Raises:
            ValueError: a side of ``sample_size`` that is not a multiple of ``patch_size``: the patch embedding
                (a stride-p conv) drops the remainder, and the model returns a smaller prediction than its input.
        """
        channels, height, width = super().sample_shape(model)
        patch = model.config.patch_size
        if height % patch or width % patch:
            raise ValueError(f"this {type(model).__name__} has sample_size {height}×{width}, not a multiple of its "
                             f"patch_size {patch}: its patch embedding drops the last rows/columns and it returns a "
                             f"{height // patch * patch}×{width // patch * patch} prediction; tadq samples latents "
                             "whose sides are multiples of the patch size (fix config.sample_size)")
        return channels, height, width

    @staticmethod
    def _timesteps(x: Tensor, t: Tensor) -> Tensor:
        """t as (N,): the adaLN embeddings need one timestep per row (a scalar t is broadcast)."""
        t = torch.as_tensor(t, device=x.device)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning:
        raise NotImplementedError


@register_adapter(DiTTransformer2DModel, subfolder="transformer", pipeline_class="DiTPipeline")
class DiTAdapter(_PatchTransformerAdapter):
    """Roles and calls for ``DiTTransformer2DModel`` (class-conditional, adaLN-Zero blocks)."""

    name = "dit_transformer2d"

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        claims.claim(model.proj_out_1, "time_projection", "proj_out_1")  # final adaLN: emb → shift, scale
        claims.claim(model.proj_out_2, "output_conv", "proj_out_2")

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("class_labels",)``: every DiT is class-conditional (its adaLN-Zero embedding adds a label)."""
        return ("class_labels",)

    def num_classes(self, model: nn.Module) -> int:
        """K, the number of real classes (``num_embeds_ada_norm``)."""
        return int(model.config.num_embeds_ada_norm)

    def null_class(self, model: nn.Module) -> int | None:
        """The "no class" label of the guidance branch: K, the label table's last row (trained by label dropout);
        ``None`` when the table has no such row (a model built without label dropout)."""
        table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        return self.num_classes(model) if table.num_embeddings > self.num_classes(model) else None

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning:
        device = next(model.parameters()).device
        return Conditioning(class_labels=torch.zeros(batch_size, dtype=torch.long, device=device))

    def temporal_num_labels(self, model: nn.Module) -> int:
        """Rows of the label table (K real classes and the null class): TFMQ's tables cover every one."""
        return int(model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings)

    def temporal_modules(self, model: nn.Module) -> list[nn.Module]:
        """Every block's adaLN embedding (sinusoidal projection, timestep MLP, label table): DiT's temporal path
        (the final layer re-runs block 0's)."""
        return [block.norm1.emb for block in model.transformer_blocks]

    def temporal_projection_inputs(self, model: nn.Module, t: Tensor, labels: Tensor | None) -> dict[str, Tensor]:
        """SiLU(emb_i(t, y)) for every adaLN modulation (``transformer_blocks.i.norm1.linear``, and ``proj_out_1``
        on block 0's embedding), exactly as ``DiTTransformer2DModel.forward`` computes them: the inputs of the
        time projections depend on (t, y) alone, which is what TFMQ-DM's temporal information block needs.

        Raises:
            ValueError: no labels (every DiT is class-conditional).
        """
        if labels is None:
            raise ValueError("a DiT's temporal path takes class labels with the timesteps")
        names = {id(module): name for name, module in model.named_modules()}
        inputs = {}
        for block in model.transformer_blocks:
            emb = block.norm1.emb(t, labels, hidden_dtype=model.dtype)
            inputs[names[id(block.norm1.linear)]] = block.norm1.silu(emb)
        first = model.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=model.dtype)
        inputs[names[id(model.proj_out_1)]] = torch.nn.functional.silu(first)
        return inputs

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The ε half of the DiT's output at (x, t, ``cond.class_labels``); ``cond.unconditional`` is the walker's
        business.

        Raises:
            ValueError: no labels, other fields, a label outside [0, K] (K = the null class), or a non-square
                latent: diffusers' DiT unpatchifies with side √tokens, so a (N, C, 8, 12) input came back as a
                prediction of another batch size and shape, without an error.
        """
        if x.shape[-2] != x.shape[-1]:
            raise ValueError(f"a {type(model).__name__} takes square latents (its unpatchify assumes a square token "
                             f"grid), got {x.shape[-2]}×{x.shape[-1]}")
        self._check_fields(model, cond, self.optional_inputs)
        labels = cond.class_labels
        table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        if labels.dtype not in INDEX_DTYPES:  # torch's embedding refused it deep inside the first block
            raise ValueError(f"class_labels must be int64 or int32 indices into the label table, got {labels.dtype} "
                             "(pass .long() labels)")
        # both ends in one read back to the host (each is a device sync per forward)
        low, high = torch.stack(torch.aminmax(labels)).tolist() if labels.ndim == 1 and labels.numel() else (0, 0)
        if labels.ndim != 1 or low < 0 or high >= table:
            found = f"shape {list(labels.shape)}" if labels.ndim != 1 else f"label {low if low < 0 else high}"
            raise ValueError(f"class_labels must be (N,) indices in [0, {table - 1}] (the null class is "
                             f"{self.null_class(model)}), got {found}")
        output = model(x, timestep=self._timesteps(x, t), class_labels=labels).sample
        return self.prediction_half(model, output)


@register_adapter(PixArtTransformer2DModel, subfolder="transformer", pipeline_class="PixArtAlphaPipeline")
class PixArtAdapter(_PatchTransformerAdapter):
    """Roles and calls for ``PixArtTransformer2DModel`` (caption cross-attention, adaLN-single)."""

    name = "pixart_transformer2d"
    optional_inputs = PIXART_OPTIONAL

    # the caption's cross-attention K/V memo, shared with the cross-attention UNet (same Attention modules)
    inference_cache = UNet2DConditionAdapter.inference_cache

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        adaln = model.adaln_single
        embedding = adaln.emb
        claims.claim(embedding.timestep_embedder, "time_embedding", claims.names[id(embedding.timestep_embedder)])
        for part in ("resolution_embedder", "aspect_ratio_embedder"):  # size conditions added to the t embedding
            module = getattr(embedding, part, None)
            if module is not None:
                claims.claim(module, "added_embedding", claims.names[id(module)])
        claims.claim(adaln.linear, "time_projection", claims.names[id(adaln.linear)])  # emb → 6 modulations
        if model.caption_projection is not None:
            claims.claim(model.caption_projection, "caption_projection", "caption_projection")
        claims.claim(model.proj_out, "output_conv", "proj_out")

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("encoder_hidden_states",)``, plus ``added_cond_kwargs.resolution`` and ``.aspect_ratio`` with
        ``use_additional_conditions``; ``attention_mask`` is accepted but optional."""
        return ("encoder_hidden_states",) + (PIXART_ADDED if model.use_additional_conditions else ())

    @staticmethod
    def caption_width(model: nn.Module) -> int:
        """D of the caption embedding the model reads: ``caption_channels`` (projected to the inner width), else
        what the cross-attentions read, ``cross_attention_dim`` (the inner width was asked for, so a model whose
        cross-attentions read another width refused the right captions and let the wrong ones fail in a matmul)."""
        config = model.config
        if model.caption_projection is not None:
            return int(config.caption_channels)
        if config.cross_attention_dim is not None:
            return int(config.cross_attention_dim)
        return int(config.num_attention_heads * config.attention_head_dim)  # no cross-attention reads it

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        states = torch.zeros(batch_size, DUMMY_TOKENS, self.caption_width(model), device=device, dtype=dtype)
        added: dict[str, Tensor] = {}
        if model.use_additional_conditions:
            added = {"resolution": torch.zeros(batch_size, 2, device=device, dtype=dtype),
                     "aspect_ratio": torch.zeros(batch_size, 1, device=device, dtype=dtype)}
        return Conditioning(encoder_hidden_states=states, added_cond_kwargs=added)

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The ε half of PixArt's output at (x, t, cond); ``cond.unconditional`` is the walker's business.

        Raises:
            ValueError: ``cond`` lacks a required field, carries one PixArt does not take, or a shape that does not
                fit the config.
        """
        self._check_fields(model, cond, self.optional_inputs)
        self._check_shapes(model, x, cond)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            added = {key: cond.added_cond_kwargs[key] for key in added}
        output = model(x, encoder_hidden_states=cond.encoder_hidden_states, timestep=self._timesteps(x, t),
                       added_cond_kwargs=added, encoder_attention_mask=cond.attention_mask).sample
        return self.prediction_half(model, output)

    def _check_shapes(self, model: nn.Module, x: Tensor, cond: Conditioning) -> None:
        """Shape errors named in the conditioning's terms instead of a matmul error deep inside the model."""
        states, width = cond.encoder_hidden_states, self.caption_width(model)
        if cond.batch_size != x.shape[0]:
            raise ValueError(f"the conditioning has {cond.batch_size} rows for {x.shape[0]} samples")
        if states.ndim != 3 or states.shape[-1] != width:
            raise ValueError(f"encoder_hidden_states must be (N, L, {width}), got {list(states.shape)}")
        if cond.attention_mask is not None and tuple(cond.attention_mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"attention_mask must be (N, L) = {list(states.shape[:2])}, got "
                             f"{list(cond.attention_mask.shape)}")
        if model.use_additional_conditions:
            for key, size in (("resolution", 2), ("aspect_ratio", 1)):
                value = cond.added_cond_kwargs[key]
                if value.ndim != 2 or value.shape[1] != size:
                    raise ValueError(f"added_cond_kwargs.{key} must be (N, {size}), got {list(value.shape)}")
