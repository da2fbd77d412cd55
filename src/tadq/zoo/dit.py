"""The shipped class-conditional DiT: a tiny ``DiTTransformer2DModel`` on the digits, in ``DiTPipeline`` layout.

It diffuses in the latent space of the shipped text-to-image model's VAE (4×8×8 latents of 1×16×16 digits), as
DiT does in Stable Diffusion's: a ``DiTPipeline`` needs a VAE, and 16 tokens of 2×2 latent patches cost 3.6× less
per training step than 64 tokens of 2×2 pixel patches at the same width (0.23 s against 0.83 s per step of 128 on
one thread, measured when the model was chosen; see docs/models.md). The VAE is reused frozen, so both shipped
latent models decode through the same images. Labels 0–9 are the digits, label 10 the null class trained by label
dropout (drawn by the training generator, so a resumed run draws what an uninterrupted one does); guidance needs
tadq's sampler, since diffusers' ``DiTPipeline`` hard-codes ImageNet's null label 1000 (unguided, it samples the
model as is).

Reproduce the shipped weights with ``tadq zoo train-dit --out src/tadq/zoo/weights/digits-dit --threads 1``
(``training_info.json`` beside the weights records the exact command, seed and wall time).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from torch import Tensor, nn

from tadq.utils import atomic_write_text
from tadq.zoo.configs import DiTTrainConfig
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.paths import shipped_dit_path
from tadq.zoo.shipped import regenerate_hint
from tadq.zoo.train import train_ddpm

__all__ = ["DEFAULT_GUIDANCE_SCALE", "DiTTrainConfig", "NUM_CLASSES", "build_digits_dit", "check_shipped_vae",
           "digit_latents", "load_shipped_vae", "shipped_dit_path", "train_digits_dit"]

NUM_CLASSES = 10  # the digits; label NUM_CLASSES is the null class
# Measured on the shipped weights (benchmarks/dit_fp_quality.py, 200 samples, DDIM 50; docs/models.md): class
# agreement 0.905 / 0.985 / 1.0 / 1.0 at guidance 1 / 1.5 / 2 / 3 while FD-digits is 6.2 / 3.9 / 6.2 / 11.3; 1.5 has
# the lowest FD with agreement within 1.5 % of perfect, so it is the model's default.
DEFAULT_GUIDANCE_SCALE = 1.5


def check_shipped_vae() -> None:
    """FileNotFoundError, naming how to get it back, unless the shipped text-to-image model's VAE is there: what
    ``tadq zoo train-dit`` checks before it creates --out (diffusers' own error spoke of connecting to
    huggingface.co, after the output folder was made)."""
    from tadq.zoo.t2i import shipped_t2i_path

    folder = shipped_t2i_path() / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no VAE of the shipped text-to-image model at {folder} (config.json is missing)"
                                f"{regenerate_hint(shipped_t2i_path())}")


def load_shipped_vae() -> AutoencoderKL:
    """The shipped text-to-image model's VAE (frozen, eval mode): the DiT's latent space."""
    from tadq.safefiles import diffusers_loading_options
    from tadq.zoo.t2i import _load_with_hint, shipped_t2i_path

    check_shipped_vae()
    folder = shipped_t2i_path() / "vae"
    vae = _load_with_hint(folder, "VAE of the shipped text-to-image model", lambda: AutoencoderKL.from_pretrained(
        folder, local_files_only=True, **diffusers_loading_options()), index="config.json", model=shipped_t2i_path())
    return vae.eval().requires_grad_(False)


def build_digits_dit(latent_channels: int = 4, latent_size: int = 8, *, heads: int = 4, head_dim: int = 32,
                     layers: int = 4, patch_size: int = 2) -> DiTTransformer2DModel:
    """DiT with adaLN-Zero blocks conditioned on (timestep, digit), ε-prediction only (no learned variance).

    ``num_embeds_ada_norm`` = 10 digits; the label table has an 11th row (the null class) because diffusers builds
    it with a class-dropout probability > 0.
    """
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=latent_channels,
        out_channels=latent_channels, num_layers=layers, sample_size=latent_size, patch_size=patch_size,
        num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
    )


def digit_latents(vae: AutoencoderKL, images: Tensor, batch_size: int = 256) -> Tensor:
    """The scaled posterior means ``scaling_factor · E[z | x]`` of images in [-1, 1]: what the DiT learns to sample
    and what ``DiTPipeline`` divides by the scaling factor before decoding."""
    scaling = float(vae.config.scaling_factor)
    with torch.no_grad():
        parts = [vae.encode(images[i:i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    return torch.cat(parts) * scaling


def _save_pipeline(vae: AutoencoderKL) -> Callable[[nn.Module, DDPMScheduler, Path], None]:
    def save(model: nn.Module, scheduler: DDPMScheduler, out_dir: Path) -> None:
        sampler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)  # latents are not in [-1, 1]
        DiTPipeline(transformer=model, vae=vae, scheduler=sampler).save_pretrained(out_dir, safe_serialization=True)
        # the VAE was read from the t2i folder: diffusers writes that path into its config, which would ship the
        # training machine's folder layout in a file that says nothing about the model
        config_file = Path(out_dir) / "vae" / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            atomic_write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", config_file)

    return save


def train_digits_dit(config: DiTTrainConfig, out_dir: str | Path, command: str = "", progress: bool = True) -> Path:
    """Encode the training digits once with the frozen VAE, train, save the ``DiTPipeline`` layout;
    ``progress=False`` hides the training bar."""
    vae = load_shipped_vae()
    split = load_digits_split(DigitsConfig(resolution=int(vae.config.sample_size)))
    latents = digit_latents(vae, split.train_images)
    torch.manual_seed(config.seed)
    model = build_digits_dit(latents.shape[1], latents.shape[-1], heads=config.heads, head_dim=config.head_dim,
                             layers=config.layers, patch_size=config.patch_size)
    for module in model.modules():  # tadq drops labels itself, with the training generator (resumable)
        if hasattr(module, "class_embedder"):
            module.class_embedder.dropout_prob = 0.0
    return train_ddpm(config, model, latents, out_dir, command=command, labels=split.train_labels,
                      null_label=NUM_CLASSES, label_dropout=config.label_dropout, desc="train digits DiT",
                      save=_save_pipeline(vae), progress=progress)
