"""A small digits CNN: the domain feature extractor behind FD-digits and classifier agreement.

Inception-v3 features were learnt on ImageNet photographs and say little about 16x16 grey digits, so tadq measures
its generated digits with a classifier trained on the digits themselves. Its penultimate activations play the role
Inception's pool features play in FID; its predicted labels tell whether a quantized model still draws the same digit.

Reproduce the shipped weights with ``tadq zoo train-classifier --out src/tadq/zoo/weights/digits-classifier``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.metrics._classifier_training import classifier_accuracy, fit_classifier, save_classifier_folder
from tadq.utils import atomic_write_json, library_versions
from tadq.zoo.configs import ClassifierTrainConfig
from tadq.zoo.data import DigitsConfig, load_digits_split
from tadq.zoo.shipped import load_classifier_folder

__all__ = [
    "ClassifierTrainConfig",
    "DEFAULT_CLASSIFIER_COMMAND",
    "DigitClassifier",
    "default_classifier_path",
    "load_digit_classifier",
    "save_digit_classifier",
    "train_digit_classifier",
]

logger = logging.getLogger(__name__)

DEFAULT_CLASSIFIER_COMMAND = "tadq zoo train-classifier --out src/tadq/zoo/weights/digits-classifier"
INFO_NAME = "training_info.json"
NUM_CLASSES = 10


def default_classifier_path() -> Path:
    """Folder of the shipped classifier, found beside the installed package so it works from any directory."""
    import tadq

    return Path(tadq.__file__).parent / "zoo" / "weights" / "digits-classifier"


class DigitClassifier(nn.Module):
    """Two conv stages and one hidden linear layer; the hidden layer's activations are the features.

    Args:
        resolution: side length the network is trained at; other sizes are resized bilinearly on the way in,
            so 8x8 or 32x32 digits can be measured with the same 16x16 network.
        channels: conv widths of the two stages (each stage is two 3x3 convs and a 2x2 max-pool).
        num_features: width of the hidden layer whose post-ReLU output ``features`` returns.
        dropout: dropout before the final layer (training only).
    """

    def __init__(
        self, resolution: int = 16, channels: tuple[int, int] = (32, 64), num_features: int = 128, dropout: float = 0.3
    ) -> None:
        super().__init__()
        if resolution % 4 != 0 or resolution < 4:
            raise ValueError(f"resolution must be a positive multiple of 4, got {resolution}")
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"channels must be two positive ints, got {channels}")
        self.resolution = int(resolution)
        self.channels = (int(channels[0]), int(channels[1]))
        self.num_features = int(num_features)
        self.dropout = float(dropout)
        c1, c2 = self.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        # BatchNorm before the ReLU keeps every hidden unit active on real digits: without it about half the units
        # died in training, leaving FD-digits a rank-deficient feature space.
        self.hidden = nn.Sequential(
            nn.Linear(c2 * (resolution // 4) ** 2, self.num_features, bias=False), nn.BatchNorm1d(self.num_features)
        )
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.num_features, NUM_CLASSES))

    def architecture(self) -> dict[str, object]:
        """Constructor arguments, saved as ``config.json`` so a loader can rebuild the network."""
        return {
            "resolution": self.resolution, "channels": list(self.channels), "num_features": self.num_features,
            "dropout": self.dropout,
        }

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected grey images (B, 1, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = x.to(self.head[-1].weight.dtype)
        if x.shape[-2:] != (self.resolution, self.resolution):
            size = (self.resolution, self.resolution)
            downsampling = max(x.shape[-2:]) > self.resolution
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downsampling)
        return x

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, num_features) of images (B, 1, H, W) in [-1, 1]."""
        return F.relu(self.hidden(self.body(self._prepare(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, 10) of images (B, 1, H, W) in [-1, 1]."""
        return self.head(self.features(x))


def _augment(images: Tensor, config: ClassifierTrainConfig, generator: torch.Generator) -> Tensor:
    """Random whole-pixel shifts (background-padded, not wrapped) plus Gaussian noise."""
    if config.max_shift > 0:
        s = config.max_shift
        padded = F.pad(images, (s, s, s, s), value=-1.0)
        offsets = torch.randint(0, 2 * s + 1, (len(images), 2), generator=generator)
        size = images.shape[-1]
        images = torch.stack(
            [padded[i, :, dy : dy + size, dx : dx + size] for i, (dy, dx) in enumerate(offsets.tolist())]
        )
    if config.noise_std > 0:
        images = images + config.noise_std * torch.randn(images.shape, generator=generator)
    return images


def train_digit_classifier(
    config: ClassifierTrainConfig, out_dir: str | Path, command: str = DEFAULT_CLASSIFIER_COMMAND,
    progress: bool = True,
) -> dict:
    """Train on the digits train split, measure held-out accuracy, save weights, architecture and provenance.

    Writes ``model.safetensors``, ``config.json`` (constructor arguments) and ``training_info.json`` (command,
    config, seed, wall time, held-out accuracy, library versions) into ``out_dir`` and returns the training info.
    The same seed gives the same weights on the same machine and thread count. ``progress=False`` hides the bar.
    """
    out_dir = Path(out_dir)
    split = load_digits_split(DigitsConfig(resolution=config.resolution))
    model, loss_value, wall = fit_classifier(
        lambda: DigitClassifier(resolution=config.resolution), split.train_images, split.train_labels,
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        seed=config.seed, augment=lambda images, generator: _augment(images, config, generator),
        desc="train digits classifier", progress=progress)
    heldout_accuracy = classifier_accuracy(model, split.heldout_images, split.heldout_labels)
    train_accuracy = classifier_accuracy(model, split.train_images, split.train_labels)
    logger.info("digits classifier: held-out accuracy %.4f, train accuracy %.4f", heldout_accuracy, train_accuracy)
    save_digit_classifier(model, out_dir)
    info = {
        "command": command, "config": asdict(config), "seed": config.seed, "wall_time_s": round(wall, 1),
        "heldout_accuracy": heldout_accuracy, "heldout_size": len(split.heldout_labels),
        "train_accuracy": train_accuracy, "final_batch_loss": loss_value,
        "parameters": sum(p.numel() for p in model.parameters()), "torch_num_threads": torch.get_num_threads(),
        "versions": library_versions(),
    }
    atomic_write_json(info, out_dir / INFO_NAME)
    (out_dir / INFO_NAME).chmod(0o644)  # temp-file writes leave 0600; shipped package data must be world-readable
    return info


def save_digit_classifier(model: DigitClassifier, out_dir: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` (constructor arguments), the layout the loader reads."""
    save_classifier_folder(model, out_dir)


def load_digit_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load a saved classifier in eval mode with gradients off (it is a fixed measuring instrument).

    Args:
        path: folder holding ``model.safetensors`` and ``config.json``; ``None`` means the shipped classifier.
    """
    folder = Path(path) if path is not None else default_classifier_path()
    return load_classifier_folder(folder, DigitClassifier, "digits classifier", "train-classifier")  # type: ignore[return-value]
