"""Tiny random Stable Diffusion and SDXL pipelines built from diffusers' and transformers' own classes and saved
with ``save_pretrained`` (8×8 latents, a 16-token tokenizer written from a small vocab.json + merges.txt)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

MAX_TOKENS = 16  # tokenizer limit, start and end tokens included
HIDDEN = 16
PROJECTION = 8
TIME_EMBED = 4
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.!'"
_MERGES = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over lowercase letters, digits and some punctuation (each alone or word-final), with
    two merged words (cat, dog)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += [c for c in _CHARS] + [c + "</w>" for c in _CHARS]
    tokens += ["".join(pair) for pair in _MERGES]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in _MERGES) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=PROJECTION,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=8)


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _unet(cross_attention_dim: int, sdxl: bool) -> UNet2DConditionModel:
    extra = {}
    if sdxl:
        extra = {"addition_embed_type": "text_time", "addition_time_embed_dim": TIME_EMBED,
                 "projection_class_embeddings_input_dim": TIME_EMBED * 6 + PROJECTION}
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim,
                                attention_head_dim=2, norm_num_groups=4, **extra)


def build_sd(folder: Path, seed: int = 0) -> Path:
    """A random ``StableDiffusionPipeline`` saved into ``folder`` (no safety checker); returns ``folder``."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "_tok")
    text_encoder = CLIPTextModel(_text_config(tokenizer)).eval()
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=_unet(HIDDEN, sdxl=False), scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tok")
    return folder


def build_dit(folder: Path, seed: int = 0) -> Path:
    """A random ``DiTPipeline`` saved into ``folder``: a learned-variance DiT (K = 10 classes, null class 10) on the
    4×8×8 latents of a one-level VAE (3×8×8 images), DDIM training scheduler; returns ``folder``."""
    from diffusers import DiTPipeline
    from tests.adapters.test_transformer2d import build_tiny_dit

    torch.manual_seed(seed)
    DiTPipeline(transformer=build_tiny_dit(seed), vae=_vae().eval(), scheduler=_scheduler()).save_pretrained(folder)
    return folder


def build_sdxl(folder: Path, seed: int = 0) -> Path:
    """A random ``StableDiffusionXLPipeline`` (two text encoders, pooled embeddings, time ids) saved into
    ``folder``; returns ``folder``."""
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(folder / "_tok")
    config = _text_config(tokenizer)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(config).eval(),
        text_encoder_2=CLIPTextModelWithProjection(config).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=_unet(2 * HIDDEN, sdxl=True), scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tok")
    return folder


def with_scheduler(source: Path, folder: Path, scheduler) -> Path:
    """A copy of the pipeline folder ``source`` at ``folder`` whose ``scheduler/`` is ``scheduler`` (its class named in
    ``model_index.json``); returns ``folder``."""
    import shutil

    shutil.copytree(source, folder)
    shutil.rmtree(folder / "scheduler")
    scheduler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _remove_tree(folder: Path) -> None:
    for item in sorted(folder.rglob("*"), reverse=True):
        item.rmdir() if item.is_dir() else item.unlink()
    folder.rmdir()
