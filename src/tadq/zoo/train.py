"""Train the shipped digits DDPM (the project's embedded default model).

Reproduce the shipped weights with ``tadq zoo train --out src/tadq/zoo/weights/digits-ddpm`` (defaults below);
the command, seed and wall time are written to ``training_info.json`` beside the weights. Training checkpoints
every ``checkpoint_every`` steps into the output folder, so an interrupted run resumes where it stopped.
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
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from tadq.progress import progress_bar
from tadq.safefiles import join_tensors, load_checked, save_checked, split_tensors
from tadq.utils import atomic_write_json, library_versions
from tadq.zoo.configs import TrainConfig, check_learning_rates, check_training_fields
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.unet import build_digits_unet, build_training_scheduler

__all__ = ["TrainConfig", "check_finite_loss", "check_learning_rates", "check_training_fields", "load_checkpoint",
           "save_checkpoint",
           "train_ddpm", "train_digits_ddpm"]

logger = logging.getLogger(__name__)
CHECKPOINT_NAME = "train_checkpoint.safetensors"


def check_finite_loss(loss: float, step: int, what: str, hint: str = "") -> None:
    """ValueError at the first NaN or infinite training loss: the run diverged (typically a learning rate too high
    for the model), and every later step would only carry NaN into the weights saved as a finished model."""
    if not math.isfinite(loss):
        raise ValueError(f"{what}: the training loss became {loss} at step {step + 1}; training diverged and no model "
                         f"was saved. Train again with a lower learning rate{hint}")


RESUME_HINT = (f" (a resumable {CHECKPOINT_NAME} in --out keeps the old settings: choose another --out or delete "
               "that file)")


def _learning_rate(config: TrainConfig | Any, step: int) -> float:
    return config.learning_rate * min(1.0, (step + 1) / max(1, config.warmup_steps))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a resumable training state (tensors in safetensors, the rest as JSON metadata, checksummed)."""
    tree, tensors = split_tensors(state)
    save_checked(tensors, tree, path)


def load_checkpoint(path: Path, config: Any) -> dict[str, Any]:
    """Read a state written by ``save_checkpoint``; ValueError unless it was written by ``config`` (but ``steps``).

    ``steps`` may differ: nothing but the loop's end depends on it (constant learning rate after the warm-up), so a
    run resumed with other steps is the run that had those steps from the start.
    """
    tensors, tree = load_checked(path, "training checkpoint")
    state = join_tensors(tree, tensors)
    saved, current = dict(state["config"]), json.loads(json.dumps(asdict(config)))
    if {**saved, "steps": 0} != {**current, "steps": 0}:
        raise ValueError(f"{path} was written by a different TrainConfig ({type(config).__name__}); delete it or use "
                         "another --out")
    if state["step"] > config.steps:
        raise ValueError(f"{path} is at step {state['step']}, past steps={config.steps}")
    return state


def train_digits_ddpm(config: TrainConfig, out_dir: str | Path, command: str = "", progress: bool = True) -> Path:
    """Train, then save a diffusers ``DDPMPipeline`` layout (``unet/``, ``scheduler/``) with EMA weights;
    ``progress=False`` hides the training bar."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    images = load_digits_split(DigitsConfig(resolution=config.resolution)).train_images
    return train_ddpm(config, build_digits_unet(config.resolution), images, out_dir, command=command,
                      progress=progress)


def train_ddpm(
    config: TrainConfig | Any, unet: UNet2DModel | nn.Module, images: Tensor, out_dir: str | Path, command: str = "",
    labels: Tensor | None = None, null_label: int | None = None, label_dropout: float = 0.0,
    desc: str = "train digits DDPM", save: Callable[[nn.Module, DDPMScheduler, Path], None] | None = None,
    progress: bool = True,
) -> Path:
    """The DDPM loop shared by the shipped models (EMA, clipping, warm-up, resumable checkpoints).

    ``config`` needs TrainConfig's optimisation fields (steps, batch_size, learning_rate, warmup_steps, ema_decay,
    seed, checkpoint_every); all but ``steps`` must match on resume. With ``labels`` the UNet is class-conditional:
    each label is replaced by ``null_label`` with probability ``label_dropout`` (drawn after the timesteps, so an
    unconditional run draws exactly what it drew before), which trains the unconditional branch that
    classifier-free guidance needs. The caller seeds torch before building ``unet``. ``save(model, scheduler,
    out_dir)`` writes the trained (EMA) model; by default a ``DDPMPipeline`` layout. ``progress=False`` hides the
    step bar (a caller's setting, as the sampling and calibration functions take it).
    """
    if labels is not None and (null_label is None or not 0.0 <= label_dropout < 1.0):
        raise ValueError("a class-conditional run needs null_label and label_dropout in [0, 1)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = build_training_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay)
    generator = torch.Generator().manual_seed(config.seed)
    start, elapsed, recent = 0, 0.0, []  # recent: the last 100 batch losses
    checkpoint = out_dir / CHECKPOINT_NAME
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, config)
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        start, elapsed = state["step"], state["elapsed"]
        recent = [float(value) for value in state.get("recent_losses", [])]
        logger.info("resuming from step %d", start)
    unet.train()
    t0 = time.perf_counter() - elapsed
    with progress_bar(range(start, config.steps), initial=start, total=config.steps, desc=desc,
                      disable=not progress) as bar:
        loss_value = recent[-1] if recent else float("nan")
        for step in bar:
            index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
            x0 = images[index]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
            class_labels = None
            if labels is not None:
                dropped = torch.rand(config.batch_size, generator=generator) < label_dropout
                class_labels = torch.where(dropped, torch.full_like(labels[index], null_label), labels[index])
            prediction = unet(scheduler.add_noise(x0, noise, t), t, class_labels=class_labels).sample
            loss = torch.nn.functional.mse_loss(prediction, noise)
            loss_value = loss.item()
            check_finite_loss(loss_value, step, desc, RESUME_HINT)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.step(unet.parameters())
            recent = (recent + [loss_value])[-100:]
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                save_checkpoint(checkpoint, {
                    "config": asdict(config), "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema": ema.state_dict(), "generator": generator.get_state(), "step": step + 1,
                    "elapsed": time.perf_counter() - t0, "recent_losses": recent,
                })
    wall = time.perf_counter() - t0
    ema.copy_to(unet.parameters())
    unet.eval()
    if save is None:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    else:
        save(unet, scheduler, out_dir)
    info = {
        "command": command, "config": asdict(config), "wall_time_s": round(wall, 1),
        "final_batch_loss": loss_value, "versions": library_versions(),
        "mean_loss_last_100_steps": sum(recent) / len(recent) if recent else float("nan"),
        "torch_num_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }
    # atomic: a half-written record read as a finished run (refused without --overwrite) or, in the shipped folder
    # that carries no marker, as a folder tadq did not write
    atomic_write_json(info, out_dir / "training_info.json")
    checkpoint.unlink(missing_ok=True)
    return out_dir
