"""Tiny random transformer-denoiser pipelines (PixArt-α/Σ, Stable Diffusion 3, Flux.1) built from diffusers' and
transformers' own classes and saved with ``save_pretrained``, so tests exercise the real loading and calling paths
with nothing downloaded.

Shared layout: 8×8 latents with 4 channels; a two-block VAE (``vae_scale_factor`` 2, so 16×16 pixel images); a
16-token CLIP tokenizer (``tests.pipelines.builders.write_tokenizer``); a T5 tokenizer built in code (a Unigram
model over letters, digits and a few words, as ``T5Tokenizer`` builds from a vocabulary) with 2-layer T5 encoders.
The T5 sequence length is the pipeline call's ``max_sequence_length`` (diffusers pads to it), not the tokenizer's
``model_max_length``: pass a small one (e.g. 16) in tests.

Pitfalls of the pipelines themselves: PixArt's ``use_resolution_binning`` (on by default) only knows the real
sample sizes (32/64/128; Σ also 256) and raises for 8, so call it with ``use_resolution_binning=False``;
``FluxPipeline`` ignores the transformer's ``sample_size`` (its default is 128 latents, 256 px here), so pass
``height``/``width``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tests.pipelines.builders import MAX_TOKENS, write_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

LATENT_SIZE = 8  # transformer sample_size: the latent side
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 2  # two VAE blocks: one downsampling
IMAGE_SIZE = LATENT_SIZE * VAE_SCALE_FACTOR
T5_WIDTH = 16  # d_model of the PixArt and Flux T5 encoders
T5_MAX_TOKENS = 32  # the T5 tokenizer's model_max_length (pipelines pad to their own max_sequence_length)
HEADS = 2
HEAD_DIM = 8  # transformer width HEADS * HEAD_DIM = 16
SD3_CLIP_WIDTHS = (16, 8)  # hidden sizes of SD3's CLIP-L / CLIP-G stand-ins
SD3_CLIP_PROJECTIONS = (8, 16)  # their text projection sizes: pooled_projection_dim is the sum
SD3_T5_WIDTH = 32  # > sum(SD3_CLIP_WIDTHS): encode_prompt zero-pads the CLIP states to this width, as SD3 does
FLUX_CLIP_WIDTH = 16  # FluxPipeline pools CLIPTextModel's pooler_output: the hidden size

_T5_WORDS = ("a", "an", "the", "of", "cat", "dog", "photo", "picture", "red", "blue")
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def t5_tokenizer(model_max_length: int = T5_MAX_TOKENS) -> T5Tokenizer:
    """A T5 tokenizer made without any file: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then a Unigram vocabulary that
    spells any lowercase word (``▁`` + letters/digits) and prefers a few whole words; ``T5Tokenizer`` adds its
    Metaspace pre-tokenizer and the ``</s>``-appending post-processor. No sentinel (extra_id) tokens."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in _T5_WORDS]
    vocab += [(char, -3.0) for char in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                       model_max_length=model_max_length)


def _t5_encoder(tokenizer: T5Tokenizer, width: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated GELU, untied embeddings) of ``width`` = d_model."""
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def _clip_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=projection,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _vae(shift_factor: float | None = None, scaling_factor: float = 0.18215,
         quant_convs: bool = True) -> AutoencoderKL:
    """Two blocks of width 8, so ``vae_scale_factor`` = 2 (one downsampling), 4 latent channels. SD3 and Flux
    ship VAEs with a ``shift_factor`` and no quant convs; PixArt's (SD's) has both convs and no shift."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=IMAGE_SIZE,
                         scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=quant_convs,
                         use_post_quant_conv=quant_convs)


def build_pixart(folder: Path, seed: int = 0, sigma: bool = False) -> Path:
    """A random ``PixArtAlphaPipeline`` (``PixArtSigmaPipeline`` when ``sigma``) saved into ``folder``: an
    ada-norm-single ``PixArtTransformer2DModel`` with learned sigma (8 output channels), a T5 encoder and PixArt's
    DPM-Solver++ scheduler; returns ``folder``."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, T5_WIDTH)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=LATENT_CHANNELS,
        out_channels=2 * LATENT_CHANNELS, num_layers=2, cross_attention_dim=HEADS * HEAD_DIM,
        sample_size=LATENT_SIZE, patch_size=2, norm_type="ada_norm_single", caption_channels=T5_WIDTH,
        use_additional_conditions=False).eval()
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
                                            prediction_type="epsilon", lower_order_final=True)
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(), transformer=transformer,
                          scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_sd3(folder: Path, seed: int = 0) -> Path:
    """A random ``StableDiffusion3Pipeline`` saved into ``folder``: two CLIP encoders with projections of different
    widths, whose hidden states (concatenated) encode_prompt pads to the wider T5's width, the transformer's
    ``joint_attention_dim``; pooled text is the two projections concatenated. Returns ``folder``."""
    torch.manual_seed(seed)
    clip_tokenizer = write_tokenizer(folder / "_tok")
    tokenizer_3 = t5_tokenizer()
    (width_l, width_g), (proj_l, proj_g) = SD3_CLIP_WIDTHS, SD3_CLIP_PROJECTIONS
    text_encoder = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, width_l, proj_l)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(clip_tokenizer, width_g, proj_g)).eval()
    text_encoder_3 = _t5_encoder(tokenizer_3, SD3_T5_WIDTH)
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS, joint_attention_dim=SD3_T5_WIDTH,
        caption_projection_dim=HEADS * HEAD_DIM, pooled_projection_dim=proj_l + proj_g,
        pos_embed_max_size=2 * LATENT_SIZE).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(shift_factor=0.1, scaling_factor=1.5, quant_convs=False), text_encoder=text_encoder,
        tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=None, feature_extractor=None)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    return folder


def build_flux(folder: Path, seed: int = 0, guidance_embeds: bool = True, dynamic_shifting: bool = False) -> Path:
    """A random ``FluxPipeline`` saved into ``folder``: a ``FluxTransformer2DModel`` on 2×2-packed latents (16 input
    channels), CLIP pooled text and T5 states, a distilled guidance embedding when ``guidance_embeds`` (Flux.1-dev;
    schnell has none). Its config gets ``sample_size`` = 8 (Flux's has none; tadq's adapter reads it as the latent
    side). ``dynamic_shifting`` uses Flux.1-dev's resolution-dependent shift (μ from the image sequence length)
    instead of the fixed shift 3. Returns ``folder``."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "_tok")
    tokenizer_2 = t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer, FLUX_CLIP_WIDTH, FLUX_CLIP_WIDTH)).eval()
    text_encoder_2 = _t5_encoder(tokenizer_2, T5_WIDTH)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS, joint_attention_dim=T5_WIDTH, pooled_projection_dim=FLUX_CLIP_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).eval()
    transformer.register_to_config(sample_size=LATENT_SIZE)
    if dynamic_shifting:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(shift_factor=0.1, scaling_factor=1.5, quant_convs=False),
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tok")
    return folder
