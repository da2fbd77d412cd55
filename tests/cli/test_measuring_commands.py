"""Red-team of the measuring and checking commands (``tadq evaluate``, ``tadq analyze``, ``tadq verify``) and the
report code they share: a reference of another training, feature files and real images that do not fit, images
too small for SSIM, NaN in a JSON report, a damaged manifest and an interrupted ``--overwrite``."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from safetensors.torch import save_file
from tests.conftest import build_tiny_unet
from tests.io.tiny_artefacts import save_tiny_artefact
from torch import nn
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.corrections import PTQDConfig, TCECConfig
from tadq.evaluation import check_same_weights, evaluate_against_reference, quality_metrics
from tadq.io import load_quantized
from tadq.io.manifest import MANIFEST_FILE, ArtefactDamaged, verify_manifest
from tadq.metrics.features import MetricMismatchError, TorchScriptFeatureSpace, load_reference_images
from tadq.report import dumps_json
from tadq.sampling import SamplerConfig

runner = CliRunner()


def _fp_folder(path: Path, seed: int) -> Path:
    """The tests' tiny UNet (``seed`` picks the training) as a diffusers pipeline folder."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=build_tiny_unet(seed=seed), scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A W8A8 artefact of the seed-0 tiny UNet, one with a correction stack, its FP folder and another training's."""
    root = tmp_path_factory.mktemp("measuring")
    return {
        "artefact": save_tiny_artefact(root / "q", "W8A8"),
        "stacked": save_tiny_artefact(root / "qc", "W8A8", corrections=(
            PTQDConfig(num_samples=2, seed=1), TCECConfig(num_samples=2, seed=3, select=False))),
        "fp": _fp_folder(root / "fp", seed=0),
        "other": _fp_folder(root / "fp-other", seed=1),
    }


def _strict_json(path: Path):
    """Parse as strict JSON: the bare NaN / Infinity tokens Python writes are refused, as jq or a browser would."""
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


# -- the reference must be the model the artefact was quantized from ------------------------------------------------

def test_a_reference_of_another_training_is_refused_before_sampling(folders, tmp_path) -> None:
    """Same config, other weights: the paired metrics were the distance between two models (21 dB reported as
    W8A8's quantization error). Refused by evaluate and analyze before either model samples or a report is written."""
    for command, flag in (("evaluate", "--reference"), ("analyze", "--reference")):
        out = tmp_path / command
        result = runner.invoke(app, [command, str(folders["artefact"]), flag, str(folders["other"]),
                                     "--num-samples", "2", "--steps", "2", "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert "not the ones the artefact was quantized from" in result.output, result.output
        assert "sampling" not in result.output and not (out / "results.json").exists()
        assert not (out / "analysis.json").exists()


def test_an_artefact_of_another_model_without_a_reference_flag_is_told_to_name_one(folders, tmp_path) -> None:
    """Without --reference the shipped digits DDPM is the reference; an artefact of the user's own model
    was refused with "pass the FP model it was quantized from", naming neither the flag nor the default it met."""
    for command, flag in (("evaluate", "--reference"), ("analyze", "--reference")):
        out = tmp_path / command
        result = runner.invoke(app, [command, str(folders["artefact"]), "--num-samples", "2", "--steps", "2",
                                     "--out", str(out)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert "differs" in text and f"no {flag} given" in text and "shipped digits DDPM" in text, text
        assert "sampling" not in result.output and not (out / "results.json").exists()
        assert not (out / "analysis.json").exists()


def test_an_evaluation_seed_the_artefact_was_calibrated_or_fitted_on_is_refused_before_sampling(folders, tmp_path):
    """Sample i of the calibration (or a correction's fitting) seed is that run's trajectory i: scored on it, the
    model was measured on its own noise. Both commands named the seed only after sampling; the API refuses it too."""
    cases = [("artefact", "0", "calibration.seed"), ("stacked", "3", r"corrections\[1\]\.seed \(TCECConfig\)")]
    for (name, seed, where), (command, flag) in zip(cases * 2, [("evaluate", "--reference")] * 2
                                                     + [("analyze", "--reference")] * 2, strict=True):
        out = tmp_path / f"{command}-{name}"
        result = runner.invoke(app, [command, str(folders[name]), flag, str(folders["fp"]), "--num-samples", "2",
                                     "--steps", "2", "--seed", seed, "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert re.search(rf"--seed {seed} is the seed of the model's {where}", " ".join(result.output.split()))
        assert not (out / "results.json").exists() and not (out / "analysis.json").exists()
    qmodel, scheduler = load_quantized(folders["stacked"])
    with pytest.raises(ValueError, match=r"seed 1 is the seed of the model's corrections\[0\]"):
        evaluate_against_reference(qmodel, build_tiny_unet(seed=0), scheduler, SamplerConfig("ddim", 2),
                                   num_samples=2, seed=1, progress=False)
    qmodel.recipe = None  # a model quantized from a bare QuantConfig: its calibration seed still counts
    with pytest.raises(ValueError, match=r"seed 0 is the seed of the model's calibration\.seed"):
        evaluate_against_reference(qmodel, build_tiny_unet(seed=0), scheduler, SamplerConfig("ddim", 2),
                                   num_samples=2, seed=0, progress=False)


def test_the_source_passes_and_psnr_matches_an_independent_computation(folders) -> None:
    qmodel, scheduler = load_quantized(folders["artefact"])
    fp = build_tiny_unet(seed=0)
    check_same_weights(qmodel, fp)  # its own FP model: every kept tensor equal, every weight within rounding
    with pytest.raises(ValueError, match="quantized from"):
        check_same_weights(qmodel, build_tiny_unet(seed=1))
    evaluation = evaluate_against_reference(qmodel, fp, scheduler, SamplerConfig("ddim", 2), num_samples=3, seed=5,
                                            progress=False)
    q, ref = evaluation.candidate.images, evaluation.reference.images
    # PSNR on [0, 1] pixels, by hand in float64: 10·log10(1 / MSE) per sample, then the mean
    q01 = (q.double().clamp(-1, 1).numpy() + 1) / 2
    ref01 = (ref.double().clamp(-1, 1).numpy() + 1) / 2
    mse = ((q01 - ref01) ** 2).reshape(len(q01), -1).mean(axis=1)
    expected = float(np.mean(10 * np.log10(1.0 / mse)))
    # torchmetrics computes in float32: its MSE carries a relative error ~1e-6, i.e. 10·log10(1 + 1e-6) dB
    assert evaluation.candidate_metrics.psnr == pytest.approx(expected, abs=1e-4)
    assert 20 < expected < 100  # quantization moved the samples, but not far


def test_two_fp_models_are_still_compared_without_the_weight_check() -> None:
    """``evaluate_against_reference`` of two plain FP models (a metric comparison, not an artefact) is not refused."""
    check_same_weights(build_tiny_unet(seed=0), build_tiny_unet(seed=1))


# -- a user's feature file and real images ------------------------------------------------------------------------

class _FlatLinear(nn.Module):
    """An extractor that reads exactly ``pixels`` values per image (a fixed input shape)."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(pixels, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))


def _real(path: Path, images: torch.Tensor) -> Path:
    save_file({"images": images.contiguous()}, str(path))
    return path


def _grey(count: int = 16) -> torch.Tensor:
    return torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_a_feature_file_of_another_input_shape_is_refused_before_sampling(folders, tmp_path) -> None:
    """A 16×16 extractor with 8×8 real images used to crash inside TorchScript after both models had sampled."""
    torch.jit.script(_FlatLinear(256)).save(str(tmp_path / "f256.pt"))
    real = _real(tmp_path / "real.safetensors", _grey())
    with pytest.raises(MetricMismatchError, match=r"cannot read images of shape \(1, 8, 8\).*mat1 and mat2"):
        TorchScriptFeatureSpace(tmp_path / "f256.pt", real)
    result = runner.invoke(app, ["evaluate", str(folders["artefact"]), "--reference", str(folders["fp"]),
                                 "--num-samples", "2", "--steps", "2", "--features", str(tmp_path / "f256.pt"),
                                 "--reference-images", str(real)])
    assert result.exit_code == 2 and "cannot read images of shape" in result.output, result.output
    assert "sampling" not in result.output and "Traceback" not in result.output


def test_a_fitting_feature_file_is_read_once_for_the_real_images(tmp_path) -> None:
    torch.jit.script(_FlatLinear(64)).save(str(tmp_path / "f64.pt"))
    space = TorchScriptFeatureSpace(tmp_path / "f64.pt", _real(tmp_path / "real.safetensors", _grey()))
    assert space.features(space.real) is space.features(space.real)  # cached at construction
    assert space.features(_grey(3)).shape == (3, 4)


@pytest.mark.parametrize(("images", "message"), [
    (((_grey() + 1) * 127.5).to(torch.uint8), "not floating point"),
    ((_grey() + 1) / 2, r"images in \[0, 1\], not \[-1, 1\]"),
    (_grey() * 3, r"must be in \[-1, 1\], got values in \[-3"),
])
def test_real_images_in_another_dtype_or_range_are_refused(tmp_path, images, message) -> None:
    """[0, 1] images passed the [-1, 1] test and moved every real image into the upper half of the range."""
    with pytest.raises(ValueError, match=message):
        load_reference_images(_real(tmp_path / "real.safetensors", images))


def test_half_precision_real_images_in_range_are_read(tmp_path) -> None:
    images = load_reference_images(_real(tmp_path / "real.safetensors", _grey().half()))
    assert images.dtype == torch.float32 and images.min() < 0


# -- SSIM of images smaller than its window --------------------------------------------------------------------------

def test_ssim_of_images_smaller_than_its_window_is_not_measured_and_said(caplog) -> None:
    """4×4 samples: SSIM raised only after both models sampled; now it is reported as not measured, with a warning,
    and the other metrics are still computed."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    reference = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    states = torch.stack([reference, images])
    with caplog.at_level(logging.WARNING, logger="tadq.evaluation"):
        row = quality_metrics(images, states, reference, torch.stack([reference, reference]), None)
    assert row.ssim is None and row.psnr is not None and row.final_mse > 0
    assert "SSIM not measured" in caplog.text


# -- reports -----------------------------------------------------------------------------------------------------

def test_report_json_writes_nan_and_inf_as_null() -> None:
    text = dumps_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (float("-inf"), 2), "d": "NaN"})
    assert json.loads(text, parse_constant=lambda token: pytest.fail(token)) == {
        "a": None, "b": [1.0, None], "c": [None, 2], "d": "NaN"}


def test_analyze_of_a_correction_stack_says_what_it_measured_and_writes_strict_json(folders, tmp_path) -> None:
    out = tmp_path / "analysis"
    result = runner.invoke(app, ["analyze", str(folders["stacked"]), "--fp-model", str(folders["fp"]),
                                 "--num-samples", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "corrections (PTQD, TCEC) are not applied" in " ".join(result.output.split()), result.output
    report = _strict_json(out / "analysis.json")
    assert report["settings"]["corrections_not_applied"] == ["PTQD", "TCEC"]
    assert report["num_samples"] == 1 and report["measured"][0] == 0.0 and report["measured"][-1] > 0
    assert (out / "propagation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_report_is_strict_json(folders, tmp_path) -> None:
    out = tmp_path / "report"
    args = ["evaluate", str(folders["artefact"]), "--reference", str(folders["fp"]), "--num-samples", "2",
            "--steps", "2", "--features", "none", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    rows = _strict_json(out / "results.json")["rows"]
    assert rows[0]["psnr"] is None and rows[1]["psnr"] > 20


# -- verify --------------------------------------------------------------------------------------------------------

def test_a_byte_changed_in_the_manifest_is_named_as_the_manifests_damage(folders, tmp_path) -> None:
    """A flipped hex digit in a recorded hash blamed an intact file ("fails its SHA-256 check")."""
    copy = shutil.copytree(folders["artefact"], tmp_path / "q")
    manifest = copy / MANIFEST_FILE
    text = manifest.read_text()
    at = text.index('"sha256": "') + len('"sha256": "')
    manifest.write_text(text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1:])
    with pytest.raises(ArtefactDamaged, match=r"tadq_manifest\.json itself was changed after saving"):
        verify_manifest(copy)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "itself was changed" in result.output, result.output


def test_a_file_replaced_with_its_manifest_entry_rewritten_to_match_is_refused(folders, tmp_path) -> None:
    """Every file matched its (edited) entry, and the digest was read only once a file failed: verify said OK."""
    import json

    from tadq.io.manifest import file_sha256

    copy = shutil.copytree(folders["artefact"], tmp_path / "q")
    name = "tadq_config.json"
    (copy / name).write_text((copy / name).read_text() + " ")  # still the same JSON, another file
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["files"][name] = {"sha256": file_sha256(copy / name), "bytes": (copy / name).stat().st_size}
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtefactDamaged, match=r"tadq_manifest\.json itself was changed after saving"):
        verify_manifest(copy)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "itself was changed" in result.output, result.output


def test_a_manifest_without_a_digest_still_names_the_damaged_file(folders, tmp_path) -> None:
    """Manifests written before the digest: a changed file is named as before."""
    copy = shutil.copytree(folders["artefact"], tmp_path / "q")
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    del manifest["digest"]
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with (copy / "model_index.json").open("a") as handle:
        handle.write(" ")
    with pytest.raises(ArtefactDamaged, match=r"model_index\.json has \d+ bytes"):
        verify_manifest(copy)


def test_verify_names_the_artefact_an_interrupted_overwrite_left_behind(folders, tmp_path) -> None:
    """Killed between ``tadq.io.save``'s two renames: no folder at the path, the previous artefact in a hidden
    sibling; verify says where it is instead of only "not a folder"."""
    leftover = tmp_path / ".q.old-x1y2"
    leftover.mkdir()
    shutil.copytree(folders["artefact"], leftover / "q")
    result = runner.invoke(app, ["verify", str(tmp_path / "q")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "overwrite was interrupted" in text and ".q.old-x1y2/q" in text, result.output
    assert runner.invoke(app, ["verify", str(leftover / "q")]).exit_code == 0


@pytest.mark.parametrize(("command", "flag", "args"), [
    ("evaluate", "--reference", ["--seed", "-1"]),
    ("analyze", "--reference", ["--seed", "4294967296"]),
    ("analyze", "--reference", ["--batch-size", "0"]),
])
def test_a_bad_seed_or_batch_is_refused_before_the_models_load(folders, tmp_path, command, flag, args) -> None:
    """Refused by the sampler only after both models were loaded and placed (minutes for a large model)."""
    result = runner.invoke(app, [command, str(folders["artefact"]), flag, str(folders["fp"]), "--num-samples", "2",
                                 "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 2 and args[0] in result.output, result.output
    assert "INFO" not in result.output  # nothing loaded, nothing sampled


def test_a_custom_fd_matches_an_independent_computation(tmp_path) -> None:
    """FD in a user's feature space, recomputed by hand: tr((S1 S2)^½) from the eigenvalues of S1^½ S2 S1^½
    (symmetric, so no general matrix square root), with the same 1e-6 ridge on both covariances."""
    torch.jit.script(_FlatLinear(64)).save(str(tmp_path / "f64.pt"))
    space = TorchScriptFeatureSpace(tmp_path / "f64.pt", _real(tmp_path / "real.safetensors", _grey(40)))
    fake = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 1.6 - 0.9
    extractor = torch.jit.load(str(tmp_path / "f64.pt"))
    with torch.no_grad():
        real_f, fake_f = (extractor(images).double().numpy() for images in (space.real, fake))
    ridge = 1e-6 * np.eye(real_f.shape[1])
    s1, s2 = np.cov(real_f, rowvar=False) + ridge, np.cov(fake_f, rowvar=False) + ridge
    values, vectors = np.linalg.eigh(s1)
    root1 = (vectors * np.sqrt(values)) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    expected = float(np.sum((real_f.mean(0) - fake_f.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)
    assert expected > 0.01
    # both float64 on 4 features: only round-off of the two square-root routes differs
    assert space.fd(fake) == pytest.approx(expected, rel=1e-8, abs=1e-10)


def test_verify_names_the_staging_folder_of_an_unfinished_save(folders, tmp_path) -> None:
    """Killed before the manifest was written: the hidden staging folder holds a config but no manifest, and was
    reported as an artefact "saved by an older tadq"."""
    staging = shutil.copytree(folders["artefact"], tmp_path / ".q.tmp-ab12_x")
    (staging / MANIFEST_FILE).unlink()
    result = runner.invoke(app, ["verify", str(staging)])
    assert result.exit_code == 1 and "staging folder of a save that did not finish" in result.output, result.output


def test_analyze_names_its_reference_flag_as_evaluate_does_and_keeps_the_older_name() -> None:
    """`tadq evaluate --reference` and `tadq analyze --fp-model` took the same folder under two names; analyze reads
    both now (``--reference`` first), and a typo in either refuses as before."""
    help_text = " ".join(runner.invoke(app, ["analyze", "--help"], terminal_width=200).output.split())
    assert "--reference" in help_text and "--fp-model" in help_text, help_text
    result = runner.invoke(app, ["analyze", "x", "--fp-modle", "y"])
    assert result.exit_code == 2 and "No such option" in result.output, result.output
