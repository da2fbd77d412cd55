"""Adapters for diffusers' MMDiT transformers: ``SD3Transformer2DModel`` (Stable Diffusion 3 / 3.5) and
``FluxTransformer2DModel`` (Flux.1), both flow-matching (velocity) models.

Both run two token streams, the image patches and the text (caption) tokens, through *joint* blocks whose
attention concatenates the two streams (``JointTransformerBlock`` / ``FluxTransformerBlock``: separate projections
and feed-forwards per stream, one attention over [image | text]); Flux then runs *single* blocks on the
concatenated sequence (``FluxSingleTransformerBlock``: one attention and a parallel MLP). Every block is modulated
by an adaLN embedding of the timestep (+ pooled text, + Flux's distilled guidance scale).

Roles (names as in ``tadq.adapters.base``), claimed from the diffusers structure, never from name substrings:

- the patch embedding: SD3 ``pos_embed.proj`` (a stride-p conv), Flux ``x_embedder`` (a Linear on the packed
  latent): ``input_conv``, its own unit;
- ``time_text_embed.timestep_embedder`` (the timestep MLP): ``time_embedding``; ``time_text_embed.text_embedder``
  (pooled text MLP) and Flux's ``time_text_embed.guidance_embedder`` (MLP of the guidance scale):
  ``added_embedding`` (an embedding added to the timestep embedding); each MLP one unit;
- ``context_embedder`` (the text encoder's states → the transformer width): ``caption_projection``, its own unit
  (its input is the same at every sampler step);
- every adaLN modulation Linear (embedding → shift/scale/gate): ``norm1.linear``, ``norm1_context.linear`` of the
  joint blocks, ``norm.linear`` of Flux's single blocks, ``norm_out.linear``: ``time_projection`` (the temporal
  path, as ``time_emb_proj`` of a UNet residual block); ``norm_out.linear`` is its own unit;
- joint attention ``to_q/to_k/to_v`` and ``add_q_proj/add_k_proj/add_v_proj``: ``attention_qkv`` — the added
  projections read the text stream, but *after* the block's timestep modulation (``norm1_context``), so, unlike a
  UNet's cross-attention K/V (``cross_attention_kv``), their input changes at every step and nothing is memoised;
  ``to_out.0`` and ``to_add_out``: ``attention_out``; ``ff``, ``ff_context``: ``feed_forward``; SD3.5's second
  image attention ``attn2`` (``dual_attention_layers``) like ``attn``;
- Flux single blocks: ``attn.to_q/k/v`` ``attention_qkv``, ``proj_mlp`` ``feed_forward``, ``proj_out`` (the fused
  output projection of [attention | MLP]) ``attention_out``;
- the final ``proj_out``: ``output_conv``, its own unit.

A ``Linear``/``Conv2d`` none of these rules claims (an IP-adapter's ``image_proj``/``encoder_hid_proj``, a
layout diffusers adds later) makes ``layers`` raise, naming it.

Reconstruction units: each joint block and each Flux single block (every layer inside it), and every other part
alone, in forward order (traced). The blocks return ``(encoder_hidden_states, hidden_states)``; block
reconstruction (``tadq.calibration.capture.unit_output``) fits both streams (SD3's last block returns ``None``
for the text stream: its image stream alone).

Attention matmuls (``quantize_attention=True``): neither model uses the processor ``QuantAttnProcessor``
reproduces (SD3: ``JointAttnProcessor2_0`` on a diffusers ``Attention``; Flux: ``FluxAttnProcessor`` on its own
``FluxAttention`` class, with rotary position embeddings). ``QuantJointAttnProcessor`` and
``QuantFluxAttnProcessor`` reproduce each step by step (equal to diffusers' processor to float rounding with the
quantizers off) and quantize the operands of the two matmuls like ``QuantAttnProcessor``:

    q̂ = Q_q(q), k̂ = Q_k(k)    over the joint sequence [image | text] (Flux: [text | image], after the rotary
                               embedding), per tensor: one range for both streams
    P̂ = Q_P(softmax(q̂ k̂ᵀ / √d)),  out = P̂ · Q_v(v)

Any other processor on these modules (IP-adapter, fused QKV projections, a user's) is refused by class name when
the attention is quantized, never left unquantized.

Conditioning (``Conditioning`` fields):

- SD3: ``encoder_hidden_states`` (N, L, ``joint_attention_dim``: CLIP-L/G + T5 states) and ``pooled_embeds``
  (N, ``pooled_projection_dim``), passed as ``pooled_projections``.
- Flux: the same two, plus ``added_cond_kwargs.guidance`` (N,), the distilled guidance scale (e.g. 3.5), when
  the model has ``guidance_embeds``. ``txt_ids`` are zeros and ``img_ids`` the (row, column) of each 2×2 patch, as
  ``FluxPipeline`` builds them, so neither is a conditioning field.

Classifier-free guidance works as for every model: the unconditional branch carries zero/empty-prompt embeddings.

Latents and time: the samplers walk (B, C, H, W) latents. SD3 takes them as they are. Flux takes *packed*
latents (B, (H/2)(W/2), 4C); ``FluxAdapter.predict_eps`` packs x (as ``FluxPipeline._pack_latents``), builds the
ids, calls the model and unpacks the velocity, so samplers, corrections and calibration see (B, C, H, W) with
C = ``in_channels``/4. Flux's config has no sample size: ``sample_shape`` reads ``config.sample_size`` (the
latent side; set it with ``model.register_to_config(sample_size=...)``, it is saved with the model) and defaults
to 128 (Flux.1 at 1024 px). The walker feeds t = σ·1000 (``FlowMatchEulerDiscreteScheduler``'s timesteps, which
SD3 takes as is); Flux takes σ (its pipeline passes ``timestep / 1000``), so the adapter divides by 1000.

Prediction: both models output the flow velocity v = ε − x₀; their folders ship a
``FlowMatchEulerDiscreteScheduler``, which makes the sampling plan's prediction type ``flow_prediction``:
``flow-euler`` drives them and every ε sampler (DDIM, DPM-Solver++, ...) is refused by ``check_drivable``.
``predict_eps`` returns the velocity (the name is the adapter protocol's). ``check_prediction`` (called by
``tadq.sample`` and calibration with the plan's prediction type) refuses an ε-family scheduler given with one of
these models, so a velocity is never sampled as ε. The velocity has the latent's channels: an SD3 whose
``out_channels`` differ from ``in_channels`` is refused by ``sample_shape`` (before any work) and ``predict_eps``,
never split like DiT/PixArt's learned-variance output.

Latent size: ``sample_shape`` refuses, before any work, an SD3 ``sample_size`` that is not a multiple of
``patch_size`` (its patch embedding would drop the remainder) and a Flux latent side that is odd (no 2×2 packing).

TFMQ-DM is refused (no ``temporal_embedding``: the adaLN embedding also depends on the pooled text).
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.attention import FeedForward, JointTransformerBlock
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import Tensor, nn

from tadq.adapters._unet_common import RoleClaims
from tadq.adapters.base import LayerRole
from tadq.adapters.transformer2d import _PatchTransformerAdapter
from tadq.quant.attention import QUANTIZER_NAMES, QuantAttnProcessor
from tadq.quant.quantizer import Quantizer
from tadq.registry import register_adapter
from tadq.sampling.conditioning import Conditioning
from tadq.sampling.config import FLOW_PREDICTION

__all__ = ["SD3Adapter", "FluxAdapter", "QuantJointAttnProcessor", "QuantFluxAttnProcessor", "pack_latents",
           "unpack_latents", "latent_image_ids"]

DUMMY_TOKENS = 2  # text length of the tracing forward (any length traces the same graph)
FLUX_DEFAULT_LATENT = 128  # Flux.1's latent side at 1024 px (VAE factor 8), when the config names no sample_size
FLUX_TIME_SCALE = 1000.0  # FluxPipeline passes timestep / 1000; the model multiplies by 1000 again
FLUX_GUIDANCE = "added_cond_kwargs.guidance"


def _check_quantizers(attn: nn.Module) -> None:
    missing = [name for name in QUANTIZER_NAMES if not isinstance(getattr(attn, name, None), Quantizer)]
    if missing:
        raise RuntimeError(f"attention module has no {missing}: install them with "
                           "tadq.quant.attention.install_attention_quantizers(attn, ..., processor=...) instead of "
                           "setting the processor alone")


def _quantized_attention(attn: nn.Module, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """``Q_P(softmax(Q_q(q) Q_k(k)ᵀ / √d)) · Q_v(v)`` on (B, h, L, d) operands; the scale is SDPA's default.

    A float16 model's scores are computed in float32 (``QuantAttnProcessor._attention``): the product before the
    scale overflowed float16 where SDPA stays finite. Other dtypes compute as before."""
    scale = query.shape[-1] ** -0.5
    query, key = attn.q_quantizer(query), attn.k_quantizer(key)
    if query.dtype == torch.float16:
        probs = (query.float() @ key.float().transpose(-1, -2) * scale).softmax(dim=-1).to(query.dtype)
    else:
        probs = (query @ key.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, h, L, L)
    probs = attn.softmax_quantizer(probs)  # P ∈ [0, 1], unsigned grid
    return probs @ attn.v_quantizer(value)


class QuantJointAttnProcessor(QuantAttnProcessor):
    """SD3's joint attention (``JointAttnProcessor2_0``) with fake-quantized matmul operands.

    Image tokens (``hidden_states``, N of them) are projected by ``to_q/k/v``, text tokens (``encoder_hidden_states``)
    by ``add_q/k/v_proj``; per head, q/k RMS norms (``norm_q``/``norm_k``, ``norm_added_q``/``norm_added_k``) when
    the model has ``qk_norm``; one attention over [image | text]; the first N rows go through ``to_out``, the rest
    through ``to_add_out`` (absent in the last block, ``context_pre_only``, which returns the text rows unprojected
    as diffusers does). Without ``encoder_hidden_states`` (SD3.5's ``attn2``) it is plain self-attention.
    """

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
        _check_quantizers(attn)
        if attention_mask is not None:
            raise NotImplementedError("SD3's joint attention takes no attention mask (diffusers' processor ignores "
                                      "it); tadq refuses one rather than dropping it")
        batch, tokens = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x: Tensor) -> Tensor:  # (B, L, h·d) → (B, h, L, d)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
        value = heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query, key = torch.cat([query, text_query], dim=2), torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
        head_dim = query.shape[-1]
        out = _quantized_attention(attn, query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        text_out = None
        if encoder_hidden_states is not None:
            out, text_out = out[:, :tokens], out[:, tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))  # linear, dropout
        return out if encoder_hidden_states is None else (out, text_out)


class QuantFluxAttnProcessor(QuantAttnProcessor):
    """Flux's attention (``FluxAttnProcessor`` on ``FluxAttention``) with fake-quantized matmul operands.

    Per head: q/k RMS norms; in joint blocks the text projections (``add_*_proj``, ``norm_added_q/k``) are put
    *before* the image tokens; the rotary embedding (``image_rotary_emb``, cos/sin of the [text | image] ids)
    rotates q and k; one attention; joint blocks split the rows back ([text | image]) and project each stream
    (``to_out``, ``to_add_out``), single blocks (``pre_only``) return the attention output unprojected.
    """

    def __call__(self, attn: FluxAttention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: tuple[Tensor, Tensor] | None = None
                 ) -> Tensor | tuple[Tensor, Tensor]:
        _check_quantizers(attn)
        if attention_mask is not None:
            raise NotImplementedError("Flux attention with an attention mask is not implemented by tadq's "
                                      "quantized processor")
        if attn.fused_projections:
            raise NotImplementedError("Flux attention with fused QKV projections: unfuse them before quantizing")
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))  # (B, L, h, d)
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (-1, attn.head_dim))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            text_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            text_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query, key = torch.cat([text_query, query], dim=1), torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = _quantized_attention(attn, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, L, h·d)
        if encoder_hidden_states is None:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        text_out, out = out[:, :text_tokens], out[:, text_tokens:]
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())


def _claim_joint_attention(claims: RoleClaims, attn: nn.Module, unit: str) -> None:
    """Projections of a joint (or single-stream) attention: q/k/v of both streams ``attention_qkv`` (the text
    stream is modulated by the timestep, so its K/V are not constant over the steps), outputs ``attention_out``."""
    for part in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        claims.claim(getattr(attn, part, None), "attention_qkv", unit)
    claims.claim(getattr(attn, "to_out", None), "attention_out", unit)
    claims.claim(getattr(attn, "to_add_out", None), "attention_out", unit)


def _claim_block(claims: RoleClaims, block: nn.Module, unit: str) -> None:
    """A joint block (SD3/Flux) or a Flux single block, one unit: modulations, attentions, MLPs."""
    for part in ("norm1", "norm1_context", "norm"):  # adaLN: emb → shift, scale, gate (per stream)
        norm = getattr(block, part, None)
        if isinstance(getattr(norm, "linear", None), nn.Linear):
            claims.claim(norm.linear, "time_projection", unit)
    if isinstance(block, FluxSingleTransformerBlock):
        claims.claim(block.proj_mlp, "feed_forward", unit)
        claims.claim(block.proj_out, "attention_out", unit)  # reads [attention | MLP]
    for sub in block.modules():
        if isinstance(sub, (Attention, FluxAttention)):
            _claim_joint_attention(claims, sub, unit)
        elif isinstance(sub, FeedForward):
            claims.claim(sub, "feed_forward", unit)


class _MMDiTAdapter(_PatchTransformerAdapter):
    """What SD3 and Flux share: block roles, refusal of unclaimed layers, the processors, text conditioning."""

    _BLOCKS: tuple[type, ...] = ()
    _PROCESSORS: dict[type, type] = {}  # diffusers' processor class → its quantized counterpart

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        raise NotImplementedError

    def _roles(self, model: nn.Module) -> dict[int, tuple[LayerRole, str]]:
        claims = RoleClaims(model)
        self._claim_model(claims, model)
        embed = model.time_text_embed
        for part, role in (("timestep_embedder", "time_embedding"), ("text_embedder", "added_embedding"),
                           ("guidance_embedder", "added_embedding")):
            module = getattr(embed, part, None)
            if module is not None:
                claims.claim(module, role, claims.names[id(module)])
        claims.claim(model.context_embedder, "caption_projection", "context_embedder")
        for module in model.modules():
            if isinstance(module, self._BLOCKS):
                _claim_block(claims, module, claims.names[id(module)])
        claims.claim(model.norm_out.linear, "time_projection", "norm_out.linear")  # final adaLN: shift, scale
        claims.claim(model.proj_out, "output_conv", "proj_out")
        return claims.roles

    def check_prediction(self, model: nn.Module, prediction_type: str) -> None:
        """Refuse a sampling plan that does not treat the output as a flow velocity (called by ``tadq.sample`` and
        calibration with the plan's prediction type): an ε-family scheduler would sample the velocity as ε.

        Raises:
            NotImplementedError: naming the model class and the prediction type.
        """
        if prediction_type != FLOW_PREDICTION:
            raise NotImplementedError(
                f"{type(model).__name__} is a flow-matching model (it predicts the velocity v = ε − x₀) but the "
                f"scheduler's prediction type is {prediction_type!r}: pass its FlowMatchEulerDiscreteScheduler and "
                "sample with SamplerConfig('flow-euler', ...)")

    def attention_modules(self, model: nn.Module) -> list[str]:
        """The joint/single attentions of the blocks (diffusers ``Attention`` in SD3, ``FluxAttention`` in Flux)."""
        return [name for name, module in model.named_modules() if isinstance(module, (Attention, FluxAttention))]

    def quant_attention_processor(self, name: str, attn: nn.Module) -> QuantAttnProcessor:
        """The quantized processor reproducing ``attn``'s current one (installed by
        ``apply_attention_quantization``).

        Raises:
            NotImplementedError: ``attn`` runs a processor tadq has no quantized counterpart for, named.
        """
        current = attn.processor
        if type(current) in self._PROCESSORS.values():  # already installed
            return current
        for original, quantized in self._PROCESSORS.items():
            if type(current) is original:
                return quantized()
        raise NotImplementedError(
            f"{name} runs {type(current).__name__}, an attention processor tadq cannot quantize: its q·kᵀ and "
            f"softmax·v would stay unquantized. tadq quantizes {[c.__name__ for c in self._PROCESSORS]} only; "
            "restore the default processor or quantize with quantize_attention=False")

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("encoder_hidden_states", "pooled_embeds")`` (Flux with ``guidance_embeds`` also
        ``"added_cond_kwargs.guidance"``)."""
        return ("encoder_hidden_states", "pooled_embeds")

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning:
        parameter = next(model.parameters())
        device, dtype, config = parameter.device, parameter.dtype, model.config
        added = {}
        if FLUX_GUIDANCE in self.conditioning_inputs(model):
            added["guidance"] = torch.ones(batch_size, device=device, dtype=dtype)
        return Conditioning(
            encoder_hidden_states=torch.zeros(batch_size, DUMMY_TOKENS, config.joint_attention_dim, device=device,
                                              dtype=dtype),
            pooled_embeds=torch.zeros(batch_size, config.pooled_projection_dim, device=device, dtype=dtype),
            added_cond_kwargs=added)

    def _check_shapes(self, model: nn.Module, x: Tensor, cond: Conditioning) -> None:
        """Shape errors named in the conditioning's terms instead of a matmul error deep inside the model."""
        config = model.config
        if cond.batch_size != x.shape[0]:
            raise ValueError(f"the conditioning has {cond.batch_size} rows for {x.shape[0]} samples")
        states, pooled = cond.encoder_hidden_states, cond.pooled_embeds
        if states.ndim != 3 or states.shape[-1] != config.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (N, L, {config.joint_attention_dim}), got "
                             f"{list(states.shape)}")
        if pooled.ndim != 2 or pooled.shape[-1] != config.pooled_projection_dim:
            raise ValueError(f"pooled_embeds must be (N, {config.pooled_projection_dim}), got {list(pooled.shape)}")
        guidance = cond.added_cond_kwargs.get("guidance")
        if guidance is not None and guidance.ndim != 1:
            raise ValueError(f"added_cond_kwargs.guidance must be (N,), got {list(guidance.shape)}")


@register_adapter(SD3Transformer2DModel, subfolder="transformer", pipeline_class="StableDiffusion3Pipeline")
class SD3Adapter(_MMDiTAdapter):
    """Roles and calls for ``SD3Transformer2DModel`` (MMDiT joint blocks, flow matching)."""

    name = "sd3_transformer2d"
    _BLOCKS = (JointTransformerBlock,)
    _PROCESSORS = {JointAttnProcessor2_0: QuantJointAttnProcessor}

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        claims.claim(model.pos_embed.proj, "input_conv", "pos_embed.proj")

    @staticmethod
    def _check_velocity_channels(model: nn.Module) -> None:
        """A flow velocity has the latent's channels: no learned-variance half to split off (DiT/PixArt's ε half
        would take the first ``in_channels`` of a 2·C output and sample them as the velocity).

        Raises:
            NotImplementedError: ``out_channels`` ≠ ``in_channels``, named.
        """
        config = model.config
        out = config.out_channels if config.out_channels is not None else config.in_channels
        if out != config.in_channels:
            raise NotImplementedError(f"SD3Transformer2DModel with out_channels={out} for in_channels="
                                      f"{config.in_channels}: a flow-matching model predicts a velocity of the "
                                      "latent's shape (out = in channels); tadq does not sample other outputs")

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of the latent; refuses, before any work, a sample size that is not a multiple of the patch
        size, more patches per side than the position table holds (``pos_embed_max_size``: diffusers refused it at
        the first call, after the calibration had started) and an output that is not a velocity of the latent's
        channels."""
        self._check_velocity_channels(model)
        channels, height, width = super().sample_shape(model)
        config = model.config
        table = config.get("pos_embed_max_size")
        if table is not None and max(height, width) // config.patch_size > table:
            raise ValueError(f"this SD3Transformer2DModel has sample_size {height}×{width}: "
                             f"{height // config.patch_size}×{width // config.patch_size} patches of "
                             f"{config.patch_size}, but its position table (pos_embed_max_size={table}) covers at "
                             f"most {table} per side; sample at most {table * config.patch_size} latent pixels per "
                             "side (fix config.sample_size)")
        return channels, height, width

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """SD3's velocity at (x, t, cond); t as the flow scheduler's timesteps (σ·1000).

        Raises:
            ValueError: ``cond`` lacks a field, carries one SD3 does not take, or a shape that does not fit.
            NotImplementedError: ``out_channels`` ≠ ``in_channels`` (no velocity of the latent's shape).
        """
        self._check_fields(model, cond, self.optional_inputs)
        self._check_shapes(model, x, cond)
        self._check_velocity_channels(model)
        return model(x, encoder_hidden_states=cond.encoder_hidden_states, pooled_projections=cond.pooled_embeds,
                     timestep=self._timesteps(x, t)).sample


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) → (B, (H/2)(W/2), 4C): each 2×2 patch as one token, channels ordered (c, row, column), the
    layout of ``FluxPipeline._pack_latents``."""
    batch, channels, height, width = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"Flux packs 2×2 patches: the latent side must be even, got {height}×{width}")
    patches = x.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of ``pack_latents``: (B, (H/2)(W/2), 4C) → (B, C, H, W)."""
    batch, _, packed = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, packed // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, packed // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """((H/2)(W/2), 3) position ids of the packed tokens: (0, row, column), as ``FluxPipeline`` builds them."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    columns = torch.arange(width // 2).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=1).to(device=device, dtype=dtype)


@register_adapter(FluxTransformer2DModel, subfolder="transformer", pipeline_class="FluxPipeline")
class FluxAdapter(_MMDiTAdapter):
    """Roles and calls for ``FluxTransformer2DModel`` (joint + single blocks, rotary ids, packed latents)."""

    name = "flux_transformer2d"
    _BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)
    _PROCESSORS = {FluxAttnProcessor: QuantFluxAttnProcessor}

    def _claim_model(self, claims: RoleClaims, model: nn.Module) -> None:
        claims.claim(model.x_embedder, "input_conv", "x_embedder")

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        return super().conditioning_inputs(model) + ((FLUX_GUIDANCE,) if model.config.guidance_embeds else ())

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(``in_channels``/4, S, S): the unpacked latent, S = ``config.sample_size`` or 128 (module docstring).

        Raises:
            NotImplementedError: ``in_channels`` not a multiple of 4, or ``out_channels`` ≠ ``in_channels``.
            ValueError: an odd latent side (no 2×2 packing).
        """
        config = model.config
        channels = config.in_channels
        out = config.out_channels or channels
        if channels % 4 or out != channels or config.patch_size != 1:
            raise NotImplementedError(f"FluxTransformer2DModel with in_channels={channels}, out_channels={out}, "
                                      f"patch_size={config.patch_size}: tadq packs 2×2 latent patches as "
                                      "FluxPipeline does (in = out channels, a multiple of 4, patch_size 1)")
        size = config.get("sample_size") or FLUX_DEFAULT_LATENT
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if height % 2 or width % 2:
            raise ValueError(f"FluxTransformer2DModel with sample_size {height}×{width}: Flux packs 2×2 latent "
                             "patches, so both latent sides must be even (fix the registered sample_size)")
        return (channels // 4, height, width)

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """Flux's velocity at (x, t, cond) as (B, C, H, W): x packed, ids built, t / 1000, output unpacked.

        Raises:
            ValueError: ``cond`` lacks a field (``added_cond_kwargs.guidance`` with ``guidance_embeds``), carries
                one Flux does not take, or a shape that does not fit.
        """
        self._check_fields(model, cond, self.optional_inputs)
        self._check_shapes(model, x, cond)
        self.sample_shape(model)  # the packing's preconditions
        height, width = x.shape[-2:]
        states = cond.encoder_hidden_states
        guidance = cond.added_cond_kwargs.get("guidance")
        output = model(pack_latents(x), encoder_hidden_states=states, pooled_projections=cond.pooled_embeds,
                       timestep=self._timesteps(x, t) / FLUX_TIME_SCALE, guidance=guidance,
                       img_ids=latent_image_ids(height, width, x.device, x.dtype),
                       txt_ids=torch.zeros(states.shape[1], 3, device=x.device, dtype=x.dtype)).sample
        return unpack_latents(output, height, width)
