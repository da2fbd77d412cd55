"""Distances between image sets of shapes that do not fit each other are refused, before any sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from tests.metrics.tiny_inception import save_tiny_inception
from torch import Tensor, nn
from typer.testing import CliRunner

from tadq.metrics import inception_fid
from tadq.zoo.data import SUPPORTED_RESOLUTIONS

runner = CliRunner()


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return save_tiny_inception(tmp_path_factory.mktemp("inception"), pool=4, features=8)


def test_inception_fid_refuses_grey_real_images_against_colour_samples(inception_weights) -> None:
    """Grey real images are copied to three channels on the way in, so grey digits against RGB samples gave a
    plausible FID of two different kinds of data."""
    g = torch.Generator().manual_seed(0)
    grey, colour = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1, torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    for real, fake in ((grey, colour), (colour, grey)):
        with pytest.raises(ValueError, match="same channels"):
            value = inception_fid(real, fake, inception_weights)
            pytest.fail(f"{tuple(real.shape[1:])} vs {tuple(fake.shape[1:])} scored {value}")
    assert inception_fid(colour, colour, inception_weights) == pytest.approx(0.0, abs=1e-3)  # same data: allowed


def test_evaluate_refuses_inception_fid_at_a_size_without_real_digits_before_sampling(tmp_path, monkeypatch,
                                                                                   inception_weights) -> None:
    """A grey model of a size the real digits do not exist at (12x12) was sampled twice, then ``--inception-weights``
    failed with "resolution must be one of (8, 16, 32), got 12"."""
    import tadq.api
    from tadq.cli.app import app

    side = min(SUPPORTED_RESOLUTIONS) + 4
    assert side not in SUPPORTED_RESOLUTIONS
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=side, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "fp")
    result = runner.invoke(app, ["quantize", str(tmp_path / "fp"), "--out", str(tmp_path / "q"), "--cache-dir",
                                 str(tmp_path / "cache"), "--preset", "W8A8", "--steps", "2", "--calib-trajectories",
                                 "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    sampled = []

    def no_sampling(*args, **kwargs):
        sampled.append(1)
        raise RuntimeError("SAMPLED-BEFORE-CHECK")

    monkeypatch.setattr(tadq.api, "sample", no_sampling)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "q"), "--reference", str(tmp_path / "fp"),
                                 "--num-samples", "4", "--steps", "2", "--threads", "1",
                                 "--inception-weights", str(inception_weights)])
    assert not sampled, "both models were sampled before the real digits' sizes were checked"
    assert result.exit_code == 2 and f"{side}×{side}" in result.output, result.output


def test_digit_features_at_a_size_without_real_digits_name_the_way_out() -> None:
    """``--features digits`` on a 12x12 grey model said only "resolution must be one of (8, 16, 32), got 12"."""
    from tadq.metrics.features import DigitsFeatureSpace, MetricMismatchError

    side = min(SUPPORTED_RESOLUTIONS) + 4
    with pytest.raises(MetricMismatchError, match=f"not {side}.*--features none"):
        DigitsFeatureSpace(side)


class _Brightness(nn.Module):
    """A user's extractor with one feature: each image's mean pixel (B, 1)."""

    def forward(self, images: Tensor) -> Tensor:
        return images.flatten(1).mean(dim=1, keepdim=True)


def test_one_feature_gives_the_closed_form_distance(tmp_path) -> None:
    """``np.cov`` of one feature is a 0-d array: every one-feature Fréchet distance (a user's extractor returning
    (N, 1)) failed with "shape mismatch: mu (1,) / (1,), sigma () / ()". In one dimension the distance is
    (m1 - m2)² + (s1 - s2)² of the means and standard deviations (each variance plus the ridge)."""
    from safetensors.torch import save_file

    from tadq.metrics.features import TorchScriptFeatureSpace
    from tadq.metrics.frechet import DEFAULT_RIDGE, frechet_distance, gaussian_statistics

    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(30, 1, 8, 8, generator=g) * 1.5 - 0.5).clamp(-1, 1)
    a, b = (_Brightness()(x).double() for x in (real, fake))

    def closed_form() -> float:
        deviation = [float((x.var(unbiased=True) + DEFAULT_RIDGE).sqrt()) for x in (a, b)]
        return float((a.mean() - b.mean()) ** 2) + (deviation[0] - deviation[1]) ** 2

    mu1, sigma1 = gaussian_statistics(a)
    mu2, sigma2 = gaussian_statistics(b)
    assert sigma1.shape == (1, 1)
    tolerance = 64 * torch.finfo(torch.float64).eps * max(1.0, closed_form())  # a handful of float64 operations
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(closed_form(), abs=tolerance)
    torch.jit.script(_Brightness()).save(str(tmp_path / "brightness.pt"))
    save_file({"images": real}, str(tmp_path / "real.safetensors"))
    space = TorchScriptFeatureSpace(tmp_path / "brightness.pt", tmp_path / "real.safetensors", name="brightness")
    # the extractor runs in float32 here, so the space's value is compared at float32 precision
    assert space.fd(fake) == pytest.approx(closed_form(), rel=1e3 * torch.finfo(torch.float32).eps)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        gaussian_statistics(a.flatten())
