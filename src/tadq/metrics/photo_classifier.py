"""A small CNN that names the source photograph of a 32×32 RGB patch: the feature extractor behind FD-photos.

Inception-v3 reads 299×299 ImageNet photographs; upsampling a 32×32 patch tenfold measures the resize more than
the patch. tadq measures the photos model with a classifier trained on the patches themselves: its penultimate
activations are the features of FD-photos (FID's formula, not FID: the values are not comparable with published
FID), and its predicted label tells whether a conditional sample shows the photograph it was prompted with.

Reproduce the shipped weights with ``tadq zoo train-photo-classifier`` (defaults below); the held-out accuracy is
measured on the held-out region of every photograph (``tadq.zoo.photos``), never seen in training.
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
from tadq.zoo.configs import PhotoClassifierTrainConfig
from tadq.zoo.photos import PhotosConfig, load_photos_split, num_photo_classes
from tadq.zoo.shipped import load_classifier_folder

__all__ = ["DEFAULT_PHOTO_CLASSIFIER_COMMAND", "PhotoClassifier", "PhotoClassifierTrainConfig",
           "default_photo_classifier_path", "load_photo_classifier", "photo_accuracy", "photo_features",
           "save_photo_classifier", "train_photo_classifier"]

logger = logging.getLogger(__name__)

DEFAULT_PHOTO_CLASSIFIER_COMMAND = "tadq zoo train-photo-classifier --out src/tadq/zoo/weights/photo-classifier"
INFO_NAME = "training_info.json"


def default_photo_classifier_path() -> Path:
    """Folder of the shipped photo classifier, beside the installed package."""
    import tadq

    return Path(tadq.__file__).parent / "zoo" / "weights" / "photo-classifier"


class PhotoClassifier(nn.Module):
    """Three conv stages (32→16→8→4) and one hidden linear layer whose activations are the features.

    Args:
        num_classes: photographs to tell apart.
        channels: widths of the three stages (each: two 3×3 convs and a 2×2 max-pool).
        num_features: width of the hidden layer (BatchNorm before the ReLU keeps every unit alive, so the
            Fréchet distance is taken in a full-rank space, as for FD-digits).
        dropout: dropout before the final layer (training only).
    """

    def __init__(self, num_classes: int | None = None, channels: tuple[int, int, int] = (32, 64, 64),
                 num_features: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive ints, got {channels}")
        self.num_classes = int(num_classes if num_classes is not None else num_photo_classes())
        self.channels = tuple(int(c) for c in channels)
        self.num_features, self.dropout = int(num_features), float(dropout)
        layers: list[nn.Module] = []
        previous = 3
        for width in self.channels:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            previous = width
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(previous * 4 * 4, self.num_features, bias=False),
                                    nn.BatchNorm1d(self.num_features))
        self.head = nn.Sequential(nn.Dropout(self.dropout), nn.Linear(self.num_features, self.num_classes))

    def architecture(self) -> dict[str, object]:
        """Constructor arguments, saved as ``config.json``."""
        return {"num_classes": self.num_classes, "channels": list(self.channels),
                "num_features": self.num_features, "dropout": self.dropout}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, num_features) of patches (B, 3, 32, 32) in [-1, 1]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, 32, 32):
            raise ValueError(f"expected RGB patches (B, 3, 32, 32) in [-1, 1], got shape {tuple(x.shape)}")
        return F.relu(self.hidden(self.body(x.to(self.head[-1].weight.dtype))))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


def _augment(images: Tensor, config: PhotoClassifierTrainConfig, generator: torch.Generator) -> Tensor:
    if config.flip:
        flipped = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flipped[:, None, None, None], images.flip(-1), images)
    if config.noise_std > 0:
        images = images + config.noise_std * torch.randn(images.shape, generator=generator)
    return images


def photo_accuracy(model: PhotoClassifier, images: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Share of patches whose predicted photograph is ``labels`` (the model is put in eval mode and restored)."""
    return classifier_accuracy(model, images, labels, batch_size)


@torch.no_grad()
def photo_features(images: Tensor, classifier: PhotoClassifier, batch_size: int = 256) -> Tensor:
    """Float64 features (N, num_features) of patches (N, 3, 32, 32) in [-1, 1], in eval mode (batch-independent)."""
    classifier.eval()
    device = next(classifier.parameters()).device
    chunks = [classifier.features(images[i:i + batch_size].to(device)).cpu().double()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks)


def train_photo_classifier(config: PhotoClassifierTrainConfig, out_dir: str | Path,
                           command: str = DEFAULT_PHOTO_CLASSIFIER_COMMAND, progress: bool = True) -> dict:
    """Train on the training regions, measure held-out-region accuracy, save weights, architecture and provenance."""
    out_dir = Path(out_dir)
    split = load_photos_split(PhotosConfig())
    model, loss_value, wall = fit_classifier(
        lambda: PhotoClassifier(num_classes=len(split.class_names)), split.train_images, split.train_labels,
        epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, weight_decay=config.weight_decay,
        seed=config.seed, augment=lambda images, generator: _augment(images, config, generator),
        desc="train photo classifier", progress=progress)
    heldout = photo_accuracy(model, split.heldout_images, split.heldout_labels)
    train = photo_accuracy(model, split.train_images, split.train_labels)
    logger.info("photo classifier: held-out accuracy %.4f, train accuracy %.4f", heldout, train)
    save_photo_classifier(model, out_dir)
    info = {
        "command": command, "config": asdict(config), "seed": config.seed, "wall_time_s": round(wall, 1),
        "heldout_accuracy": heldout, "heldout_size": len(split.heldout_labels), "train_accuracy": train,
        "chance_accuracy": 1.0 / len(split.class_names), "class_names": list(split.class_names),
        "final_batch_loss": loss_value, "parameters": sum(p.numel() for p in model.parameters()),
        "torch_num_threads": torch.get_num_threads(), "versions": library_versions(),
    }
    atomic_write_json(info, out_dir / INFO_NAME)
    (out_dir / INFO_NAME).chmod(0o644)  # shipped package data must be world-readable
    return info


def save_photo_classifier(model: PhotoClassifier, out_dir: str | Path) -> None:
    """Write ``model.safetensors`` and ``config.json`` atomically (never a half-written weights file)."""
    save_classifier_folder(model, out_dir)


def load_photo_classifier(path: str | Path | None = None) -> PhotoClassifier:
    """Load a saved photo classifier in eval mode with gradients off; ``None`` is the shipped one."""
    folder = Path(path) if path is not None else default_photo_classifier_path()
    return load_classifier_folder(folder, PhotoClassifier, "photo classifier", "train-photo-classifier")  # type: ignore[return-value]
