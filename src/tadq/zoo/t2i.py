"""The shipped text-to-image digits model: a tiny latent diffusion model in diffusers' StableDiffusionPipeline layout.

Three parts, trained in two stages (each saved as soon as it is done, so an interrupted run keeps what it finished):

1. an ``AutoencoderKL`` maps 1×16×16 grey digits to 4×8×8 latents (as many numbers as pixels: reconstruction is
   nearly exact, while the KL term keeps the latents smooth enough to diffuse); its ``scaling_factor`` is 1/std of
   the training latents, measured here, as diffusers expects;
2. a tiny ``CLIPTextModel`` (tokenizer from ``tadq.zoo.t2i_text``) and a ``UNet2DConditionModel`` with
   cross-attention are trained together on the frozen VAE's latents, ε-prediction under the digits model's DDPM
   schedule, with ``prompt_dropout`` of the prompts replaced by "" so classifier-free guidance works.

The result loads offline with ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
feature_extractor=None, requires_safety_checker=False)`` and is sampled with the saved ``DDIMScheduler``.
Reproduce the shipped weights with ``tadq zoo train-t2i --out src/tadq/zoo/weights/digits-t2i --seed 0``
(``training_info.json`` beside the weights records the exact command).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from tadq.progress import progress_bar
from tadq.safefiles import diffusers_loading_options
from tadq.utils import atomic_write_json, library_versions
from tadq.zoo.configs import T2ITrainConfig
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.paths import shipped_t2i_path
from tadq.zoo.shipped import error_line, regenerate_hint
from tadq.zoo.t2i_prompts import DIGIT_WORDS, TEMPLATES
from tadq.zoo.t2i_text import build_text_encoder, build_tokenizer
from tadq.zoo.train import (
    CHECKPOINT_NAME,
    RESUME_HINT,
    _learning_rate,
    check_finite_loss,
    load_checkpoint,
    save_checkpoint,
)
from tadq.zoo.unet import build_training_scheduler

__all__ = ["DEFAULT_GUIDANCE_SCALE", "T2ITrainConfig", "build_t2i_unet", "build_t2i_vae", "load_t2i_pipeline",
           "shipped_t2i_path", "train_t2i"]

logger = logging.getLogger(__name__)
VAE_STAGE_NAME = "vae_stage.json"
# Measured on the shipped weights (docs/models.md, benchmarks/t2i_fp_quality.py, 200 samples, DDIM 50): prompt
# agreement 0.86 / 0.995 / 0.995 / 0.995 at guidance 1 / 2 / 3 / 5 while FD-digits grows from 4.8 / 5.1 to 8.5 / 13.6;
# 2 is the smallest scale at which the classifier reads the prompted digit, so it is the model's default.
DEFAULT_GUIDANCE_SCALE = 2.0


def load_t2i_pipeline(path: str | Path | None = None) -> StableDiffusionPipeline:
    """Load the model with diffusers alone (no safety checker: it draws digits), offline, on the CPU.

    A missing or damaged folder is a FileNotFoundError / ValueError that names it and, for the shipped one, how to
    get it back (diffusers' own errors spoke of a hub repo id or of connecting to huggingface.co).
    """
    folder = Path(path) if path is not None else shipped_t2i_path()
    return _load_with_hint(folder, "text-to-image model", lambda: StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        local_files_only=True, **diffusers_loading_options()), index="model_index.json", model=folder)


def _load_with_hint(folder: Path, what: str, load: Callable[[], Any], index: str, model: Path) -> Any:
    """``load()``, or a clear error naming ``folder`` (and how to regenerate ``model`` if tadq ships it) when it is
    missing (no ``index`` file) or fails to load."""
    if not (folder / index).is_file():
        raise FileNotFoundError(f"no {what} at {folder} ({index} is missing){regenerate_hint(model)}")
    try:
        return load()
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"could not load the {what} at {folder} ({error_line(error)}){regenerate_hint(model)}"
                         ) from error


def build_t2i_vae(channels: tuple[int, ...] = (32, 64), resolution: int = 16) -> AutoencoderKL:
    """Grey 1×R×R ↔ 4×(R/2^(L-1))² latents; no attention in the middle (nothing to attend to at 8×8 for digits)."""
    levels = len(channels)
    return AutoencoderKL(
        in_channels=1, out_channels=1, latent_channels=4, block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8, sample_size=resolution, mid_block_add_attention=False,
    )


def build_t2i_unet(latent_size: int = 8, channels: tuple[int, ...] = (32, 64), cross_attention_dim: int = 32
                   ) -> UNet2DConditionModel:
    """ResNet blocks; cross-attention transformers (4 heads) below full resolution and in the middle.

    No attention at the full 8×8 latent resolution: there it cost 1.6× the training step time (measured at one
    thread) while the prompt names one digit, a global property the coarser levels carry.
    """
    levels = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=8,
    )


def _psnr(x: Tensor, y: Tensor) -> float:
    """Mean PSNR (dB) of [-1, 1] images, measured in [0, 1] units."""
    mse = (((x.clamp(-1, 1) - y) / 2) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _train_vae(config: T2ITrainConfig, train: Tensor, heldout: Tensor, out_dir: Path,
               progress: bool = True) -> tuple[AutoencoderKL, dict]:
    """Stage 1, or the saved stage-1 VAE when ``out_dir`` holds one trained with the same settings."""
    stage_file = out_dir / VAE_STAGE_NAME
    if stage_file.is_file() and (out_dir / "vae").is_dir():
        stage = json.loads(stage_file.read_text(encoding="utf-8"))
        if stage.get("config") == config.vae_part():
            logger.info("reusing the VAE of %s (stage 1 done)", out_dir)
            # rebuilt and filled, not from_pretrained: that would add its load path to the saved config's bytes
            vae = build_t2i_vae(config.vae_channels, config.resolution)
            vae.load_state_dict(load_file(str(out_dir / "vae" / "diffusion_pytorch_model.safetensors")))
            vae.register_to_config(scaling_factor=stage["scaling_factor"])
            return vae.eval(), stage
    torch.manual_seed(config.seed)
    vae = build_t2i_vae(config.vae_channels, config.resolution)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed)
    t0, curve, recent = time.perf_counter(), [], []
    vae.train()
    with progress_bar(range(config.vae_steps), desc="train t2i VAE", disable=not progress) as bar:
        for step in bar:
            x = train[torch.randint(0, len(train), (config.vae_batch_size,), generator=generator)]
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=generator)).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = F.mse_loss(recon, x) + config.kl_weight * kl
            check_finite_loss(loss.item(), step, "train t2i VAE", " (vae_learning_rate)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            recent = (recent + [loss.item()])[-100:]
            if (step + 1) % 100 == 0:
                curve.append(round(sum(recent) / len(recent), 6))
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        heldout_psnr = _psnr(vae.decode(vae.encode(heldout).latent_dist.mode()).sample, heldout)
        posterior = vae.encode(train).latent_dist
        latents = posterior.sample(generator=torch.Generator().manual_seed(config.seed))
    scaling = 1.0 / float(latents.std())
    vae.register_to_config(scaling_factor=scaling)
    stage = {
        "config": config.vae_part(), "wall_time_s": round(time.perf_counter() - t0, 1), "loss_every_100": curve,
        "heldout_psnr_db": round(heldout_psnr, 3), "scaling_factor": scaling,
        "latent_mean": float(latents.mean()), "latent_std": float(latents.std()),
        "latent_shape": list(latents.shape[1:]), "parameters": sum(p.numel() for p in vae.parameters()),
    }
    vae.save_pretrained(str(out_dir / "vae"), safe_serialization=True)
    atomic_write_json(stage, stage_file)
    logger.info("VAE: held-out PSNR %.2f dB, scaling factor %.4f", heldout_psnr, scaling)
    return vae, stage


def _prompt_table(tokenizer: Any, max_length: int) -> tuple[Tensor, Tensor]:
    """Token ids (10, templates, L) of every training prompt, and the ids (L,) of the empty prompt."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, padding="max_length", max_length=max_length, truncation=True)["input_ids"]

    table = torch.tensor([[ids(t.format(w=DIGIT_WORDS[d], n=str(d))) for t in TEMPLATES] for d in range(10)])
    return table, torch.tensor(ids(""))


def train_t2i(config: T2ITrainConfig, out_dir: str | Path, command: str = "", progress: bool = True) -> Path:
    """Train both stages and save the StableDiffusionPipeline layout plus ``training_info.json`` in ``out_dir``.

    Stage 2 checkpoints every ``checkpoint_every`` steps (safetensors + JSON); a rerun with the same settings
    resumes from the checkpoint (``steps`` may differ: nothing but the loop's end depends on it).
    ``progress=False`` hides both stages' bars.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT_NAME
    # a resume with other settings is refused before stage 1 could retrain (and overwrite) the finished VAE
    state = load_checkpoint(checkpoint, config) if checkpoint.exists() else None
    if state is None:  # a retrain (--overwrite) of a finished model: interrupted, it must not leave a folder that
        for name in ("model_index.json", "training_info.json"):  # loads with a new VAE and the old UNet
            (out_dir / name).unlink(missing_ok=True)
    split = load_digits_split(DigitsConfig(resolution=config.resolution))
    vae, vae_stage = _train_vae(config, split.train_images, split.heldout_images, out_dir, progress)
    vae.requires_grad_(False)
    with torch.no_grad():  # the VAE is frozen: its posterior for every training digit is computed once
        posterior = vae.encode(split.train_images).latent_dist
        latent_mean, latent_std = posterior.mean, posterior.std
    scaling = float(vae.config.scaling_factor)

    tokenizer = build_tokenizer(config.max_length)
    torch.manual_seed(config.seed + 1)  # independent of whether stage 1 ran or was reused
    text_encoder = build_text_encoder(len(tokenizer.get_vocab()), config.text_hidden, config.text_layers,
                                      max_length=config.max_length)
    unet = build_t2i_unet(latent_mean.shape[-1], config.unet_channels, config.text_hidden)
    text_encoder.requires_grad_(config.train_text_encoder)
    trained = list(unet.parameters()) + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    scheduler = build_training_scheduler()
    optimizer = torch.optim.AdamW(trained, lr=config.learning_rate, weight_decay=0.0)
    ema = EMAModel(trained, decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed + 2)
    table, empty = _prompt_table(tokenizer, config.max_length)
    labels = split.train_labels
    start, elapsed, recent, curve = 0, 0.0, [], []
    if state is not None:
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        start, elapsed = state["step"], state["elapsed"]
        recent = [float(v) for v in state["recent_losses"]]
        curve = [float(v) for v in state["loss_every_100"]]
        logger.info("resuming from step %d", start)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    t0 = time.perf_counter() - elapsed
    with progress_bar(range(start, config.steps), initial=start, total=config.steps,
                      desc="train t2i UNet + text", disable=not progress) as bar:
        loss_value = recent[-1] if recent else float("nan")
        for step in bar:
            index = torch.randint(0, len(labels), (config.batch_size,), generator=generator)
            eps_latent = torch.randn(latent_mean[index].shape, generator=generator)
            x0 = (latent_mean[index] + latent_std[index] * eps_latent) * scaling
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
            template = torch.randint(0, table.shape[1], (config.batch_size,), generator=generator)
            dropped = torch.rand(config.batch_size, generator=generator) < config.prompt_dropout
            ids = torch.where(dropped[:, None], empty[None], table[labels[index], template])
            with torch.set_grad_enabled(config.train_text_encoder):
                context = text_encoder(ids)[0]
            prediction = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=context).sample
            loss = F.mse_loss(prediction, noise)
            loss_value = loss.item()
            check_finite_loss(loss_value, step, "train t2i UNet + text", RESUME_HINT)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            ema.step(trained)
            recent = (recent + [loss_value])[-100:]
            if (step + 1) % 100 == 0:
                curve.append(round(sum(recent) / len(recent), 6))
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save_checkpoint(checkpoint, {
                    "config": asdict(config), "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                    "optimizer": optimizer.state_dict(), "ema": ema.state_dict(), "generator": generator.get_state(),
                    "step": step + 1, "elapsed": time.perf_counter() - t0, "recent_losses": recent,
                    "loss_every_100": curve,
                })
    wall = time.perf_counter() - t0
    ema.copy_to(trained)
    unet.eval()
    text_encoder.eval()
    sampler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)  # latents are not bounded to [-1, 1]
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=sampler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(str(out_dir), safe_serialization=True)
    info = {
        "command": command, "config": asdict(config), "seed": config.seed,
        "wall_time_s": round(vae_stage["wall_time_s"] + wall, 1),
        "vae": {k: v for k, v in vae_stage.items() if k != "config"},
        "unet_text": {
            "wall_time_s": round(wall, 1), "steps": config.steps, "final_batch_loss": loss_value,
            "mean_loss_last_100_steps": sum(recent) / len(recent) if recent else math.nan,
            "loss_every_100": curve,
            "parameters_unet": sum(p.numel() for p in unet.parameters()),
            "parameters_text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        },
        "vocab_size": len(tokenizer.get_vocab()), "torch_num_threads": torch.get_num_threads(),
        "versions": {**library_versions(), "transformers": _transformers_version()},
    }
    atomic_write_json(info, out_dir / "training_info.json")
    checkpoint.unlink(missing_ok=True)
    return out_dir


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
