"""Inception FID from a local TorchScript file, exercised with a tiny scripted stand-in of the same signature."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tadq.metrics import InceptionFeatures, inception_fid
from tadq.zoo.data import load_digits_split


class _TinyInception(nn.Module):
    """Same call signature as inception-2015-12-05.pt, 16 features instead of 2048."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, 16)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        torch._assert(x.shape[1] == 3 and x.shape[2] == 299 and x.shape[3] == 299, "expects (B, 3, 299, 299)")
        features = self.proj(F.adaptive_avg_pool2d(x / 255.0, 8).flatten(1))
        if return_features:
            return features
        return features.softmax(dim=1)


class _WrongSignature(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _script(module: nn.Module, path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.script(module).save(str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _script(_TinyInception(), tmp_path_factory.mktemp("inception") / "tiny-inception.pt")


@pytest.fixture(scope="module")
def digits() -> tuple[Tensor, Tensor]:
    split = load_digits_split()
    return split.heldout_images[:60], split.train_images[:60]


def test_features_from_grey_digits(weights, digits) -> None:
    extractor = InceptionFeatures(weights)
    assert extractor.num_features == 16
    prepared = InceptionFeatures.prepare(digits[0][:3])
    assert prepared.shape == (3, 3, 299, 299)
    assert prepared.min() >= 0 and prepared.max() <= 255 and prepared.max() > 1
    assert extractor(digits[0][:5]).shape == (5, 16)


def test_fid_orders_real_and_noise(weights, digits) -> None:
    real, other_real = digits
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert inception_fid(real, real, weights) < 1e-6
    assert 0 < inception_fid(real, other_real, weights, batch_size=32) < inception_fid(real, noise, weights)


def test_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="TorchScript"):
        InceptionFeatures(tmp_path / "inception-2015-12-05.pt")


def test_non_torchscript_files_are_rejected(tmp_path) -> None:
    state_dict = tmp_path / "state_dict.pt"
    torch.save(_TinyInception().state_dict(), state_dict)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    for path in (state_dict, text):
        with pytest.raises(ValueError, match="TorchScript"):
            InceptionFeatures(path)


def test_wrong_call_signature_is_rejected(tmp_path) -> None:
    with pytest.raises(ValueError, match="calling"):
        InceptionFeatures(_script(_WrongSignature(), tmp_path / "wrong.pt"))
