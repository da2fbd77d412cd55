"""``tadq evaluate`` / ``tadq analyze`` sample the artefact and its FP reference from the same noise with the
artefact's scheduler: a reference folder whose own scheduler walks another grid or reads the network's output
otherwise (prediction type, beta schedule, training timesteps, timestep spacing) was sampled under a schedule it
does not have, and PSNR/FD against it were reported without a word. It is refused before sampling, naming both
folders and the fields; a scheduler of another class with the same schedule is no difference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler
from tests.conftest import build_tiny_unet
from typer.testing import CliRunner

from tadq.cli.app import app

runner = CliRunner()


def _invoke(args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, " ".join(result.output.split())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedule")
    fp = root / "fp"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(fp)
    result, text = _invoke(["quantize", fp, "--out", root / "q", "--cache-dir", root / "cache", "--preset", "W8A8",
                            "--steps", 3, "--calib-trajectories", 4, "--threads", 1])
    assert result.exit_code == 0, text
    return fp, root / "q"


def _edited(fp: Path, folder: Path, **fields) -> Path:
    shutil.copytree(fp, folder)
    file = folder / "scheduler" / "scheduler_config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | fields))
    return folder


@pytest.mark.parametrize("fields", [{"prediction_type": "v_prediction"}, {"beta_schedule": "squaredcos_cap_v2"},
                                    {"num_train_timesteps": 500}, {"timestep_spacing": "trailing"}])
def test_a_reference_with_another_schedule_is_refused_before_sampling(folders, tmp_path, fields):
    fp, artefact = folders
    reference = _edited(fp, tmp_path / "reference", **fields)
    (field, value), = fields.items()
    for command, alias in (("evaluate", "--reference"), ("analyze", "--fp-model")):  # analyze names it --reference
        out = tmp_path / command
        result, text = _invoke([command, artefact, alias, reference, "--num-samples", 2, "--threads", 1,
                                "--out", out])
        assert result.exit_code == 2, text
        assert f"--reference {reference}" in text and f"({artefact})" in text, text
        assert f"{field}: " in text and repr(value) in text, text
        assert "Sampling" not in text and not out.exists()


def test_a_reference_scheduler_of_another_class_with_the_same_schedule_is_accepted(folders, tmp_path):
    fp, artefact = folders
    reference = tmp_path / "reference"
    shutil.copytree(fp, reference)
    shutil.rmtree(reference / "scheduler")
    # DDIM's own config, without DDPM's variance_type (which a DDIM built from a DDPM config keeps, unread)
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(reference / "scheduler")
    result, text = _invoke(["evaluate", artefact, "--reference", reference, "--num-samples", 2, "--threads", 1])
    assert result.exit_code == 0, text
    assert "PSNR" in text
