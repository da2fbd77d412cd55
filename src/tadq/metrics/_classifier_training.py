"""What the digits and photo classifiers share: the training loop, held-out accuracy and the saved folder layout.

Both are small CNNs with a BatchNorm hidden layer, trained with AdamW on a cosine schedule over shuffled epochs of
augmented images, and saved as ``model.safetensors`` plus ``config.json`` (``tadq.zoo.shipped.load_classifier_folder``
reads both); one copy of that code keeps the two instruments trained, measured and written the same way. Each module
keeps its own data, augmentation and training record.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.progress import progress_bar
from tadq.safefiles import save_safetensors
from tadq.utils import atomic_write_json

WEIGHTS_NAME, CONFIG_NAME = "model.safetensors", "config.json"


def fit_classifier(build: Callable[[], nn.Module], images: Tensor, labels: Tensor, *, epochs: int,
                   batch_size: int, lr: float, weight_decay: float, seed: int,
                   augment: Callable[[Tensor, torch.Generator], Tensor], desc: str,
                   progress: bool) -> tuple[nn.Module, float, float]:
    """Seed, build and train a classifier with cross-entropy; returns ``(model in eval mode, last batch loss, wall
    seconds)``. ``seed`` seeds torch's global RNG (initialisation and dropout) and a generator handed to
    ``augment(batch, generator)`` (batch order and augmentation), in that order, so a seed gives the same weights.
    ``desc`` names the progress bar and the run in a diverged-loss error."""
    from tadq.zoo.train import check_finite_loss

    torch.manual_seed(seed)  # initialisation and dropout
    generator = torch.Generator().manual_seed(seed)  # batch order and augmentation
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    t0 = time.perf_counter()
    loss_value, step = float("nan"), 0
    with progress_bar(range(epochs), desc=desc, disable=not progress) as bar:
        for _ in bar:
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                if len(index) < 2:  # BatchNorm cannot train on a single image
                    continue
                loss = F.cross_entropy(model(augment(images[index], generator)), labels[index])
                loss_value = loss.item()
                check_finite_loss(loss_value, step, desc)
                step += 1
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
    wall = time.perf_counter() - t0
    model.eval()
    return model, loss_value, wall


@torch.no_grad()
def classifier_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Share of ``images`` whose predicted class is ``labels`` (the model is put in eval mode and restored)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(images[i:i + batch_size]).argmax(dim=1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    model.train(was_training)
    return correct / len(images)


def save_classifier_folder(model: nn.Module, out_dir: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (``model.architecture()``, the constructor arguments), each
    atomically and world-readable: the layout ``load_classifier_folder`` reads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    # a temp file of this process: a fixed ".model.safetensors.tmp" was shared by two trainings saving into one
    # folder (one renamed the other's half-written file into place) and left behind by a failed write
    save_safetensors(state, out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(model.architecture(), out_dir / CONFIG_NAME)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (out_dir / name).chmod(0o644)  # temp-file writes leave 0600; shipped package data must be world-readable
