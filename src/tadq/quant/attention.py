"""Quantized attention matmuls: q, k, v and the softmax output P fake-quantized (docs/methods/qdiffusion.md#attention).

The projections ``to_q``/``to_k``/``to_v``/``to_out`` are ordinary ``QuantLinear`` layers; what they cannot
cover are the two activation-activation matmuls ``q kᵀ`` and ``P v``. ``QuantAttnProcessor`` replaces diffusers'
``AttnProcessor2_0`` (same maths, explicit matmuls instead of the fused kernel) and quantizes their operands:

    q̂ = Q_q(q), k̂ = Q_k(k)           after the head reshape, before the 1/√d scale (A bits, per tensor)
    P = softmax(q̂ k̂ᵀ · s),  s = attn.scale = 1/√d
    P̂ = Q_P(P)                       ``softmax_bits``, unsigned with zero point 0 (P ≥ 0)
    out = P̂ · Q_v(v)

The quantizers are submodules of the diffusers ``Attention`` module (``q_quantizer``, ``k_quantizer``,
``v_quantizer``, ``softmax_quantizer``), so they are in its ``state_dict``, found by ``Calibrate`` and saved with
the model; the processor itself is stateless and only reads them.
"""

from __future__ import annotations

import dataclasses
import logging

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from tadq.quant.qscheme import MAX_BITS, QScheme
from tadq.quant.quantizer import Quantizer

__all__ = ["QuantAttnProcessor", "install_attention_quantizers", "apply_attention_quantization", "softmax_scheme"]

logger = logging.getLogger(__name__)

QUANTIZER_NAMES = ("q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer")


def softmax_scheme(activation_scheme: QScheme, softmax_bits: int) -> QScheme:
    """Scheme of P: the activation scheme at ``softmax_bits``, asymmetric, so the grid is [0, 2^b − 1] with z = 0.

    P ≥ 0 and ``scale_and_zero_point`` widens every range to include 0, so the calibrated low end is 0 and the
    zero point is 0: Q-Diffusion's unsigned "always zero" softmax quantizer. Bit-widths above 8 (Q-Diffusion
    uses 16 for Stable Diffusion, i.e. P effectively unquantized) leave P in floating point, since ``QScheme``
    covers 2..8 bits. With activations off, P is off too.
    """
    if not activation_scheme.enabled or softmax_bits > MAX_BITS:
        return QScheme.off()
    return dataclasses.replace(activation_scheme, bits=softmax_bits, symmetric=False)


def install_attention_quantizers(attn: Attention, activation_scheme: QScheme, softmax_bits: int) -> None:
    """Register the four operand quantizers on ``attn`` and switch it to ``QuantAttnProcessor``.

    A quantizer that is already there with the same scheme is kept (with its calibrated range), so installing
    twice changes nothing.
    """
    schemes = dict.fromkeys(QUANTIZER_NAMES[:3], activation_scheme)
    schemes["softmax_quantizer"] = softmax_scheme(activation_scheme, softmax_bits)
    for name, scheme in schemes.items():
        current = getattr(attn, name, None)
        if not (isinstance(current, Quantizer) and current.scheme == scheme):
            setattr(attn, name, Quantizer(scheme, kind="activation"))
    attn.set_processor(QuantAttnProcessor())


class QuantAttnProcessor:
    """diffusers attention processor with fake-quantized matmul operands (docs/methods/qdiffusion.md#attention).

    Reproduces ``AttnProcessor2_0`` step by step (spatial norm, (B, C, H, W) → (B, HW, C), group norm,
    projections, heads, output projection, residual, ``rescale_output_factor``); with the quantizers off its
    output equals the default processor's up to float rounding. The softmax is computed in float32 when
    ``attn.upcast_softmax`` is set, as diffusers does.
    """

    def __call__(
        self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs,
    ) -> Tensor:
        missing = [name for name in QUANTIZER_NAMES if not isinstance(getattr(attn, name, None), Quantizer)]
        if missing:
            raise RuntimeError(
                f"attention module has no {missing}: install them with "
                "tadq.quant.attention.install_attention_quantizers(attn, ...) instead of setting the processor alone"
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, HW, C)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, h, M, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self._attention(attn, query, key, value, attention_mask)  # (B, h, N, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _attention(attn: Attention, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        """``Q_P(softmax(Q_q(q) Q_k(k)ᵀ · s + mask)) · Q_v(v)``, each operand fake-quantized (B1.3)."""
        query, key = attn.q_quantizer(query), attn.k_quantizer(key)  # before the 1/√d scale
        scores = query @ key.transpose(-1, -2) * attn.scale  # (B, h, N, M)
        if mask is not None:
            scores = scores + mask
        probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
        probs = attn.softmax_quantizer(probs.to(query.dtype))  # P ∈ [0, 1], unsigned grid
        return probs @ attn.v_quantizer(value)


def apply_attention_quantization(model: nn.Module, adapter, config) -> list[str]:
    """Quantize the attention matmuls of every ``adapter.attention_modules(model)`` entry (in place).

    A structural step (before calibration; the new quantizers are then calibrated like every input quantizer).
    Nothing happens unless ``config.quantize_attention`` and activations are quantized.

    Args:
        model: the (converted) model.
        adapter: its ``ModelAdapter``.
        config: the ``QuantConfig`` (``activations`` gives the q/k/v scheme, ``softmax_bits`` P's bit-width).

    Returns:
        Names of the attention modules now using ``QuantAttnProcessor``.
    """
    if not (config.quantize_attention and config.activations.enabled):
        return []
    names = adapter.attention_modules(model)
    for name in names:
        attn = model.get_submodule(name)
        if not isinstance(attn, Attention):
            raise TypeError(f"{name} is a {type(attn).__name__}, not a diffusers Attention module")
        install_attention_quantizers(attn, config.activations, config.softmax_bits)
    if config.softmax_bits > MAX_BITS:
        logger.info("softmax_bits=%d > %d: the softmax output P stays in floating point", config.softmax_bits,
                    MAX_BITS)
    return names
