"""The numbers tadq reports: PSNR / SSIM / trajectory MSE / Fréchet distances against independent
reference computations (numpy, scipy, scikit-image), edge inputs (identical, constant, out-of-range, NaN/Inf, one
sample, mismatched shapes, low-precision dtypes), batch-size and order independence, refusal of metrics that do not
apply, and honest formatting of None / NaN / inf in the report tables.

Some tests pin defects found and fixed (their docstrings say what happened before); the others pin behaviour that
was checked and found correct.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim
from tests.conftest import build_tiny_unet
from tests.metrics.tiny_inception import save_tiny_inception
from torch import Tensor, nn
from typer.testing import CliRunner

import tadq.metrics.features as features_module
from tadq.evaluation import evaluate_against_reference, quality_metrics
from tadq.metrics import (
    fd_digits,
    frechet_distance,
    inception_fid,
    load_digit_classifier,
    per_step_cosine,
    per_step_mse,
    psnr_per_sample,
    ssim_per_sample,
)
from tadq.metrics.features import DigitsFeatureSpace, MetricMismatchError, TorchScriptFeatureSpace
from tadq.metrics.image import PSNR_CAP_DB, SSIM_SIGMA
from tadq.report.tables import format_cell, markdown_table
from tadq.sampling import SamplerConfig
from tadq.zoo.data import load_digits_split

runner = CliRunner()


# -- helpers: independent reference implementations ------------------------------------------------------------------

def _unit(x: Tensor) -> np.ndarray:
    """[-1, 1] -> [0, 1] float64, the space tadq's image metrics are documented to work in."""
    return ((x.double().clamp(-1, 1) + 1) / 2).numpy()


def _ref_psnr(x: Tensor, ref: Tensor) -> np.ndarray:
    a, b = _unit(x), _unit(ref)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(1.0 / mse), PSNR_CAP_DB)


def _gauss(img: np.ndarray, mode: str) -> np.ndarray:
    # radius 5 (11x11 window) as in Wang et al. 2004, torchmetrics and skimage for sigma 1.5
    return scipy.ndimage.gaussian_filter(img, SSIM_SIGMA, mode=mode, truncate=3.5)


def _ref_ssim_map(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    """Float64 SSIM map of two [0, 1] 2-D images (population variances, C1=(0.01)^2, C2=(0.03)^2)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = _gauss(a, mode), _gauss(b, mode)
    var_a = _gauss(a * a, mode) - mu_a ** 2
    var_b = _gauss(b * b, mode) - mu_b ** 2
    cov = _gauss(a * b, mode) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def _ref_ssim(x: Tensor, ref: Tensor) -> np.ndarray:
    """Mean SSIM over the full (mirror-padded) image and channels: the convention tadq documents (reflect padding)."""
    a, b = _unit(x), _unit(ref)
    return np.array([np.mean([_ref_ssim_map(a[n, c], b[n, c], "mirror").mean() for c in range(a.shape[1])])
                     for n in range(len(a))])


def _ref_frechet(mu1, s1, mu2, s2) -> float:
    """Fréchet distance without scipy.linalg.sqrtm: tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def _random_cov(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, 3 * d))
    return a @ a.T / (3 * d)


class _MeanStd(nn.Module):
    """Toy TorchScript extractor: per-channel means and stds (B, 2C)."""

    def forward(self, images: Tensor) -> Tensor:
        flat = images.flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1)], dim=1)


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture(scope="module")
def digits_space(classifier) -> DigitsFeatureSpace:
    return DigitsFeatureSpace(16, classifier=classifier)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    return save_tiny_inception(tmp_path_factory.mktemp("inception"), pool=8, features=16)


def _pair(n: int = 6, c: int = 1, size: int = 16, noise: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, c, size, size, generator=g) * 2 - 1
    x = (ref + noise * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    return x, ref


# -- PSNR / SSIM against independent references (checked: correct) --------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_matches_numpy_and_skimage(channels) -> None:
    x, ref = _pair(c=channels)
    ours = psnr_per_sample(x, ref).double().numpy()
    np.testing.assert_allclose(ours, _ref_psnr(x, ref), rtol=1e-5)
    skimage_values = [sk_psnr(_unit(ref[i : i + 1]), _unit(x[i : i + 1]), data_range=1.0) for i in range(len(x))]
    np.testing.assert_allclose(ours, skimage_values, rtol=1e-5)


def test_reference_ssim_agrees_with_skimage_on_the_interior() -> None:
    # validates the hand-written reference: skimage crops the 5-pixel border, so compare the cropped map's mean
    x, ref = _pair(n=2, size=32)
    a, b = _unit(x), _unit(ref)
    for i in range(2):
        expected = sk_ssim(a[i, 0], b[i, 0], data_range=1.0, gaussian_weights=True, sigma=SSIM_SIGMA,
                           use_sample_covariance=False)
        ours = _ref_ssim_map(a[i, 0], b[i, 0], "mirror")[5:-5, 5:-5].mean()
        assert ours == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_an_independent_float64_reference(channels) -> None:
    x, ref = _pair(c=channels, noise=0.2)
    np.testing.assert_allclose(ssim_per_sample(x, ref).double().numpy(), _ref_ssim(x, ref), atol=2e-5)
    digits = load_digits_split().heldout_images[:8]
    noisy = (digits + 0.05 * torch.randn(digits.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    np.testing.assert_allclose(ssim_per_sample(noisy, digits).double().numpy(), _ref_ssim(noisy, digits), atol=2e-5)


def test_identical_and_constant_images_give_finite_capped_values() -> None:
    x, _ = _pair()
    assert torch.equal(psnr_per_sample(x, x), torch.full((len(x),), PSNR_CAP_DB))
    assert torch.allclose(ssim_per_sample(x, x), torch.ones(len(x)))
    const = torch.full((3, 1, 16, 16), 0.25)
    assert torch.equal(psnr_per_sample(const, const), torch.full((3,), PSNR_CAP_DB))
    assert torch.allclose(ssim_per_sample(const, const), torch.ones(3))
    # two different constants: MSE is exact, so PSNR is too (unit values 0.625 / 0.125: MSE 0.25 -> 6.0206 dB)
    assert torch.allclose(psnr_per_sample(const, -const * 3), torch.full((3,), 10 * math.log10(4.0)), atol=1e-4)
    # a mean over a batch mixing identical and noisy pairs stays finite (the cap)
    y, ref = _pair()
    y[0] = ref[0]
    assert math.isfinite(float(psnr_per_sample(y, ref).mean()))


def test_out_of_range_pixels_are_clipped_as_documented() -> None:
    x, ref = _pair()
    wild = x * 5  # outside [-1, 1]
    assert torch.equal(psnr_per_sample(wild, ref), psnr_per_sample(wild.clamp(-1, 1), ref))
    assert torch.equal(ssim_per_sample(wild, ref), ssim_per_sample(wild.clamp(-1, 1), ref))


def test_paired_metrics_are_batch_and_order_independent() -> None:
    x, ref = _pair(n=7)
    whole_psnr, whole_ssim = psnr_per_sample(x, ref), ssim_per_sample(x, ref)
    assert torch.equal(torch.cat([psnr_per_sample(x[i : i + 1], ref[i : i + 1]) for i in range(7)]), whole_psnr)
    assert torch.allclose(torch.cat([ssim_per_sample(x[i : i + 3], ref[i : i + 3]) for i in range(0, 7, 3)]),
                          whole_ssim, atol=1e-7)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(psnr_per_sample(x[order], ref[order]), whole_psnr[order])


def test_low_precision_inputs_are_measured_in_float32() -> None:
    x, ref = _pair()
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        xl, rl = x.to(dtype), ref.to(dtype)
        assert torch.allclose(psnr_per_sample(xl, rl), psnr_per_sample(xl.float(), rl.float()), atol=1e-5)
        assert torch.allclose(ssim_per_sample(xl, rl), ssim_per_sample(xl.float(), rl.float()), atol=1e-6)
        assert psnr_per_sample(xl, rl).dtype == torch.float32


def test_paired_metrics_refuse_mismatched_batches() -> None:
    x, ref = _pair()
    for other in (ref[:-1], ref.expand(-1, 3, -1, -1), F.interpolate(ref, size=8), ref[0]):
        with pytest.raises(ValueError, match="equal shape"):
            psnr_per_sample(x, other)
        with pytest.raises(ValueError, match="equal shape"):
            ssim_per_sample(x, other)


# -- trajectory metrics -----------------------------------------------------------------------------------------------

def test_per_step_mse_and_cosine_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(5, 4, 1, 6, 6, generator=g)
    q = fp + torch.linspace(0, 0.5, 5).view(5, 1, 1, 1, 1) * torch.randn(fp.shape, generator=g)
    a, b = fp.double().numpy(), q.double().numpy()
    np.testing.assert_allclose(per_step_mse(fp, q).numpy(), ((a - b) ** 2).reshape(5, -1).mean(1), rtol=1e-12)
    fa, fb = a.reshape(5, 4, -1), b.reshape(5, 4, -1)
    cos = (fa * fb).sum(-1) / (np.linalg.norm(fa, axis=-1) * np.linalg.norm(fb, axis=-1))
    np.testing.assert_allclose(per_step_cosine(fp, q).numpy(), cos.mean(1), rtol=1e-12)
    # bf16 states are promoted, not rounded further; sample order and batch split do not matter
    assert torch.equal(per_step_mse(fp.bfloat16(), q.bfloat16()),
                       per_step_mse(fp.bfloat16().double(), q.bfloat16().double()))
    order = torch.randperm(4, generator=g)
    assert torch.allclose(per_step_mse(fp[:, order], q[:, order]), per_step_mse(fp, q), rtol=1e-12)
    halves = (per_step_mse(fp[:, :2], q[:, :2]) + per_step_mse(fp[:, 2:], q[:, 2:])) / 2
    assert torch.allclose(halves, per_step_mse(fp, q), rtol=1e-12)
    with pytest.raises(ValueError):
        per_step_mse(fp, q[:, :3])


# -- Fréchet distances ------------------------------------------------------------------------------------------------

def test_frechet_distance_matches_an_eigendecomposition_reference() -> None:
    d = 12
    s1, s2 = _random_cov(d, 1), _random_cov(d, 2)
    mu1, mu2 = np.linspace(0, 1, d), np.linspace(1, 0, d)
    expected = _ref_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2, eps=0.0) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1, eps=0.0) == pytest.approx(expected, rel=1e-9)  # symmetric
    # the default ridge moves the value by about D * eps only
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 10 * d * 1e-6
    # equal covariances: the distance is |mu1 - mu2|^2 exactly
    assert frechet_distance(mu1, s1, mu2, s1, eps=0.0) == pytest.approx(float(np.sum((mu1 - mu2) ** 2)), rel=1e-8)


def test_fd_digits_matches_an_independent_pipeline(classifier, split) -> None:
    real, fake = split.heldout_images, split.train_images[:300]
    with torch.no_grad():
        fr, ff = classifier.eval().features(real).double().numpy(), classifier.features(fake).double().numpy()
    mu1, s1 = fr.mean(0), np.cov(fr, rowvar=False)
    mu2, s2 = ff.mean(0), np.cov(ff, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root))
    ours = fd_digits(real, fake, classifier)
    assert ours == pytest.approx(expected, rel=1e-3)
    assert ours == pytest.approx(_ref_frechet(mu1, s1, mu2, s2), rel=1e-3)
    # batch-size and order independence, and bf16 input accepted
    assert fd_digits(real, fake, classifier, batch_size=7) == pytest.approx(ours, rel=1e-6)
    perm = torch.randperm(len(fake), generator=torch.Generator().manual_seed(0))
    assert fd_digits(real.flip(0), fake[perm], classifier) == pytest.approx(ours, rel=1e-6)
    assert math.isfinite(fd_digits(real, fake.bfloat16(), classifier))


def test_fd_refuses_single_samples_and_colour(classifier, split, digits_space) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        fd_digits(split.heldout_images, split.train_images[:1], classifier)
    with pytest.raises(MetricMismatchError):
        digits_space.fd(split.train_images[:1])
    with pytest.raises(MetricMismatchError):
        digits_space.fd(torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_frechet_distance_refuses_non_finite_statistics() -> None:
    """NaN / Inf statistics must be refused with a ValueError naming the problem: a NaN mean returned NaN
    (reported in tables as "–", i.e. "not measured"), an Inf mean returns inf, and a NaN covariance raises
    FloatingPointError advising "try a larger eps" (on 128-d features it first spins in sqrtm for ~100 s)."""
    d = 4
    eye = np.eye(d)
    nan_mu = np.full(d, np.nan)
    inf_mu = np.full(d, np.inf)
    nan_cov = eye.copy()
    nan_cov[0, 0] = np.nan
    for args in ((nan_mu, eye, np.zeros(d), eye), (inf_mu, eye, np.zeros(d), eye), (np.zeros(d), nan_cov,
                                                                                      np.zeros(d), eye)):
        with pytest.raises(ValueError, match="(?i)nan|inf|finite"):
            frechet_distance(*args)


def test_feature_space_fd_refuses_non_finite_samples_before_sqrtm(digits_space, monkeypatch) -> None:
    """``FeatureSpace.fd`` (what ``tadq evaluate`` / ``tadq run`` call) skips the finiteness check ``fd_digits`` has:
    NaN samples reach scipy's sqrtm, which spun for 102 s here before a LinAlgError "Internal error ... -102".
    The guard below makes the test fail fast instead of hanging."""
    reached = []

    def guarded(mu1, s1, mu2, s2, *args, **kwargs):
        if not all(np.isfinite(a).all() for a in (mu1, s1, mu2, s2)):
            reached.append(1)
            raise AssertionError("non-finite statistics reached frechet_distance (scipy sqrtm would spin)")
        return frechet_distance(mu1, s1, mu2, s2, *args, **kwargs)

    monkeypatch.setattr(features_module, "frechet_distance", guarded)
    images = load_digits_split().heldout_images[:8].clone()
    images[2] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        digits_space.fd(images)
    assert not reached


def test_inception_fid_refuses_non_finite_samples(inception_weights, split) -> None:
    """``inception_fid`` has no finiteness check: NaN samples become NaN features and end in scipy's
    LinAlgError "Internal error in scipy.linalg.sqrtm: -102" (with the real 2048-d network, after minutes)."""
    fake = split.train_images[:8].clone()
    fake[0] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan|finite"):
        inception_fid(split.heldout_images[:8], fake, inception_weights)


def test_image_metrics_never_turn_non_finite_pixels_into_finite_scores() -> None:
    """+Inf pixels are clamped to 1 before PSNR/SSIM, so a sample holding Inf gets an ordinary-looking score
    (24.2 dB here). Either refuse non-finite inputs (as fd_digits does) or let the score be non-finite."""
    x, ref = _pair()
    x[0, 0, 3, 3] = float("inf")
    for metric in (psnr_per_sample, ssim_per_sample):
        try:
            values = metric(x, ref)
        except ValueError:
            continue
        assert not math.isfinite(float(values[0])), f"{metric.__name__} gave {float(values[0])} for an Inf sample"


# -- evaluation: refusal before sampling, and no silent fallbacks -----------------------------------------------------

def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def _tiny_grey_space(tmp_path: Path, channels: int = 1) -> TorchScriptFeatureSpace:
    torch.jit.script(_MeanStd()).save(str(tmp_path / "meanstd.pt"))
    real = torch.rand(16, channels, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"images": real.contiguous()}, str(tmp_path / "real.safetensors"))
    return TorchScriptFeatureSpace(tmp_path / "meanstd.pt", tmp_path / "real.safetensors", name="meanstd")


def test_evaluation_metrics_match_direct_computation() -> None:
    unet = build_tiny_unet()
    evaluation = evaluate_against_reference(unet, build_tiny_unet(seed=1), _scheduler(), SamplerConfig("ddim", 3),
                                            num_samples=4, seed=2, progress=False, batch_size=3)
    fp, q = evaluation.reference, evaluation.candidate
    row = evaluation.candidate_metrics
    assert row.psnr == pytest.approx(float(_ref_psnr(q.images, fp.images).mean()), rel=1e-5)
    assert row.ssim == pytest.approx(float(_ref_ssim(q.images, fp.images).mean()), abs=2e-5)
    assert row.final_mse == pytest.approx(float(per_step_mse(fp.trajectory.states, q.trajectory.states)[-1]))
    assert evaluation.reference_metrics.psnr is None and evaluation.reference_metrics.final_mse == 0.0


def test_evaluation_checks_decoded_images_are_finite() -> None:
    """``evaluate_against_reference`` checks the samples for NaN/Inf *before* the decoder (a latent model's VAE) and
    never after it: a decoder that produces NaN gives PSNR = SSIM = NaN (printed as "–", "not measured"), one that
    overflows to Inf gives PSNR 100 dB and SSIM 1.0 (Inf clamped to 1 in both runs) — a perfect score."""
    unet = build_tiny_unet()
    decoders = {"nan": lambda z: z * float("nan"), "inf": lambda z: torch.full_like(z, float("inf"))}
    outcomes = {}
    for name, decoder in decoders.items():
        try:
            evaluation = evaluate_against_reference(unet, unet, _scheduler(), SamplerConfig("ddim", 2),
                                                    num_samples=3, seed=1, progress=False, decoder=decoder)
            outcomes[name] = (evaluation.candidate_metrics.psnr, evaluation.candidate_metrics.ssim)
        except ValueError:
            outcomes[name] = "refused"
    assert outcomes == {"nan": "refused", "inf": "refused"}


def test_evaluation_refuses_too_few_samples_for_fd_before_sampling(tmp_path) -> None:
    """``num_samples=1`` with a feature space cannot give a Fréchet distance; it is refused only after both models
    were sampled (``FeatureSpace.fd`` raises). ``tadq sample-sharded`` checks this up front; evaluate should too."""
    space = _tiny_grey_space(tmp_path)
    unet = build_tiny_unet()
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_against_reference(unet, unet, _scheduler(), SamplerConfig("ddim", 2), num_samples=1, seed=1,
                                   features=space, progress=False)
    assert not calls, f"the models were sampled ({len(calls)} denoiser calls) before the refusal"


def test_misfit_feature_space_is_refused_before_sampling(tmp_path) -> None:
    space = _tiny_grey_space(tmp_path, channels=3)
    unet = build_tiny_unet()
    calls = []
    unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(MetricMismatchError):
        evaluate_against_reference(unet, unet, _scheduler(), SamplerConfig("ddim", 2), num_samples=4, seed=1,
                                   features=space, progress=False)
    assert not calls
    with pytest.raises(ValueError, match="config differs"):
        evaluate_against_reference(unet, build_tiny_unet(num_class_embeds=3), _scheduler(), SamplerConfig("ddim", 2),
                                   num_samples=4, seed=1, progress=False)
    assert not calls


def test_inception_fid_of_rgb_samples_is_refused_not_scored_against_grey_digits(inception_weights,
                                                                                    monkeypatch) -> None:
    """``tadq evaluate --inception-weights`` always scores against the real *digits* (grey), whatever the model:
    RGB samples (the photos model, a user's model) get an "Inception FID vs real digits" computed silently, the
    grey digits copied to three channels. A reference that does not fit the samples must be refused."""
    import tadq.zoo.data
    from tadq.cli.evaluate import _inception_fids

    real_split = tadq.zoo.data.load_digits_split
    monkeypatch.setattr(tadq.zoo.data, "load_digits_split",  # 8 real digits: resizing 1438 to 299x299 takes 8 s
                        lambda config=None: SimpleNamespace(train_images=real_split(config).train_images[:8]))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    evaluation = SimpleNamespace(reference=SimpleNamespace(images=images), candidate=SimpleNamespace(images=images))
    with pytest.raises(ValueError):
        values = _inception_fids(evaluation, inception_weights)
        pytest.fail(f"RGB samples were scored against grey digits: {values}")


def _quantized_tiny(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "tiny"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=_scheduler()).save_pretrained(model_dir)
    from tadq.cli.app import app

    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(model_dir), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                                 "--preset", "W8A8", "--steps", "4", "--calib-trajectories", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    return model_dir, out


def test_evaluate_checks_inception_weights_before_sampling(tmp_path, monkeypatch) -> None:
    """A missing ``--inception-weights`` file is reported only after both models were sampled (1000 samples twice
    by default); like ``--reference-images`` and ``--out``, it should be checked before any sampling."""
    import tadq.api
    from tadq.cli.app import app

    model_dir, out = _quantized_tiny(tmp_path)
    sampled = []

    def no_sampling(*args, **kwargs):
        sampled.append(1)
        raise RuntimeError("SAMPLED-BEFORE-CHECK")

    monkeypatch.setattr(tadq.api, "sample", no_sampling)
    result = runner.invoke(app, ["evaluate", str(out), "--reference", str(model_dir), "--num-samples", "4",
                                 "--steps", "2", "--inception-weights", str(tmp_path / "missing.pt")])
    assert result.exit_code != 0
    assert not sampled, "sampling started before the missing Inception weights file was noticed"


def test_custom_feature_file_named_digits_is_not_reported_as_fd_digits(tmp_path) -> None:
    """``--features my/digits.pt`` names the metric after the file stem, so a user's extractor is reported as
    ``fd_digits`` / "FD-digits" — the name the README reserves for the shipped classifier (same for photos.pt)."""
    from tadq.cli.evaluate import _feature_space

    torch.jit.script(_MeanStd()).save(str(tmp_path / "digits.pt"))
    real = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"images": real.contiguous()}, str(tmp_path / "real.safetensors"))
    try:
        space = _feature_space(str(tmp_path / "digits.pt"), tmp_path, tmp_path / "real.safetensors", 16)
    except Exception:  # refusing the ambiguous name is fine too
        return
    assert space.metric_key not in ("fd_digits", "fd_photos"), \
        f"a user's TorchScript extractor is reported as {space.metric_key!r}"


def test_reference_images_are_not_silently_ignored(tmp_path) -> None:
    """``tadq evaluate --reference-images mine.safetensors`` without a feature file (features auto/digits) ignores
    the user's real images and scores against the training digits, saying nothing. It should refuse the
    combination (or use the images)."""
    import typer

    from tadq.cli.evaluate import _feature_space

    real = torch.rand(16, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_file({"images": real.contiguous()}, str(tmp_path / "mine.safetensors"))
    for features in ("auto", "digits"):
        try:
            space = _feature_space(features, None, tmp_path / "mine.safetensors", 16)
        except (typer.BadParameter, ValueError):
            continue
        assert space is not None and torch.equal(space.real, real), \
            f"--features {features} --reference-images: the given images were ignored (FD vs {len(space.real)} " \
            "training digits)"


def test_sample_sharded_refuses_rgb_metrics_before_sampling(tmp_path) -> None:
    """``tadq sample-sharded`` on an RGB model with metrics on (the default) samples every chunk and only then
    says FD-digits reads grey digits; the sample shape is known before sampling (on a 50k run this wastes hours)."""
    from tadq.cli.app import app

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
    DDPMPipeline(unet=unet, scheduler=_scheduler()).save_pretrained(tmp_path / "rgb")
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["sample-sharded", str(tmp_path / "rgb"), "--num-samples", "2", "--steps", "2",
                                 "--batch-size", "2", "--threads", "1", "--out-dir", str(run_dir)])
    assert result.exit_code == 2 and "grey" in result.output, result.output
    chunks = sorted(p.name for p in run_dir.rglob("*.safetensors")) if run_dir.exists() else []
    assert not chunks, f"samples were written before the refusal: {chunks}"


def test_ssim_on_tiny_images_is_a_clear_error_or_a_value() -> None:
    """Decoded images under 6x6 make torchmetrics' reflect padding fail with a bare torch RuntimeError."""
    x, ref = _pair(n=2, size=4)
    try:
        values = ssim_per_sample(x, ref)
    except ValueError:
        return
    except RuntimeError as error:
        pytest.fail(f"unclear error for 4x4 images: {error}")
    assert torch.isfinite(values).all()


# -- report tables ---------------------------------------------------------------------------------------------------

def test_table_formats_none_as_not_measured_and_inf_as_inf() -> None:
    assert format_cell("psnr", None) == "–" and format_cell("fd_digits", None) == "–"
    assert "inf" in format_cell("fd_digits", float("inf")).lower()
    assert format_cell("psnr", PSNR_CAP_DB) == "100.00"
    assert format_cell("ssim", 0.98765) == "0.988" and format_cell("final_mse", 1.234e-5) == "1.23e-05"
    assert format_cell("psnr", np.float64(31.234)) == "31.23"


def test_table_shows_a_nan_metric_differently_from_not_measured() -> None:
    """``format_cell`` prints NaN as "–", the mark for "not measured" (None), so a model whose PSNR / FD came out
    NaN looks as if the metric had been skipped. A measured NaN must be visible (e.g. "NaN")."""
    for key in ("psnr", "ssim", "fd_digits", "agreement", "final_mse"):
        assert format_cell(key, float("nan")) != format_cell(key, None), key


def test_markdown_table_does_not_drop_measured_columns() -> None:
    """``markdown_table`` keeps one FD column (the first non-digits ``fd_*`` key) and no Inception FID column:
    rows carrying ``fd_digits`` next to rows carrying ``fd_photos`` show the FD-digits values as "–" (not
    measured), and ``tadq evaluate --inception-weights`` writes a results.md without the Inception FID it printed."""
    rows = [
        {"method": "FP", "bits": "W32A32", "fd_digits": 1.31, "psnr": None, "final_mse": 0.0},
        {"method": "naive", "bits": "W8A8", "fd_photos": 7.77, "psnr": 40.0, "final_mse": 1e-4},
    ]
    table = markdown_table(rows)
    assert "1.31" in table and "7.77" in table, table
    rows = [{"method": "FP", "bits": "W32A32", "fd_digits": 1.31, "inception_fid": 12.34, "final_mse": 0.0}]
    assert "12.34" in markdown_table(rows), markdown_table(rows)


def test_quality_metrics_fp_row_and_no_features_are_honest() -> None:
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    states = torch.stack([torch.randn(4, 1, 8, 8), images])
    fp_row = quality_metrics(images, states, images, states, None).to_dict()
    assert fp_row["psnr"] is None and fp_row["ssim"] is None and fp_row["fd"] is None and fp_row["final_mse"] == 0
    assert "–" in markdown_table([{"method": "FP", "bits": "W32A32", **fp_row}])
