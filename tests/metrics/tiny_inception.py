"""A TorchScript file with inception-2015-12-05.pt's call signature at test size, for the Inception FID tests."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TinyInception(nn.Module):
    """Takes RGB images in [0, 255] and returns class probabilities, or ``features`` features with
    ``return_features=True``, as the real network's script does."""

    def __init__(self, pool: int, features: int) -> None:
        super().__init__()
        self.pool = pool
        self.proj = nn.Linear(3 * pool * pool, features)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        features = self.proj(F.adaptive_avg_pool2d(x / 255.0, self.pool).flatten(1))
        return features if return_features else features.softmax(dim=1)


def save_tiny_inception(folder: Path, pool: int, features: int) -> Path:
    """The scripted network (weights from seed 0) saved in ``folder``; its path."""
    torch.manual_seed(0)
    path = folder / "tiny-inception.pt"
    torch.jit.script(TinyInception(pool, features)).save(str(path))
    return path
