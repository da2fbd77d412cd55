"""Peer rows and helpers that need no peer tool installed: lazy imports, clear errors, preset mapping."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tadq.experiments.peers import (
    PeerNotInstalled,
    PeerReport,
    UnsupportedPreset,
    calibration_batches,
    quantize_modelopt,
    quantize_quanto,
    quantize_torchao,
)
from tadq.experiments.peers.modelopt import supported_presets as modelopt_presets
from tadq.experiments.peers.quanto import quanto_setting
from tadq.experiments.peers.torchao import torchao_config
from tadq.experiments.rows import method_names, row_for
from tadq.experiments.rows.peers import PEERS
from tadq.experiments.run import RunConfig, run_main_job

PEER_MODULES = ("optimum.quanto", "modelopt", "torchao")
_SCRIPT = """
import json, sys
def peers():
    return sorted(m for m in sys.modules if m.startswith({prefixes!r}))
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
baseline = peers()
import tadq.experiments.peers, tadq.experiments.rows
print(json.dumps([baseline, peers()]))
"""


def test_importing_rows_imports_no_peer_library():
    # diffusers itself imports torchao when installed; tadq.experiments.rows must add nothing to that (one subprocess)
    done = subprocess.run([sys.executable, "-c", _SCRIPT.format(prefixes=PEER_MODULES)], capture_output=True,
                          text=True, timeout=300, check=True)
    baseline, with_rows = (set(names) for names in json.loads(done.stdout.strip().splitlines()[-1]))
    assert with_rows - baseline == set()
    assert not any(m.startswith(("optimum.quanto", "modelopt")) for m in with_rows)


def test_peer_methods_are_registered():
    assert set(PEERS) <= set(method_names())


@pytest.mark.parametrize(("method", "preset"), [("quanto", "W4A4"), ("modelopt-smoothquant", "W4A8"),
                                                ("modelopt-w4a8-awq", "W8A8"), ("torchao-int8-dynamic", "W4A16")])
def test_unsupported_preset_fails_before_anything_is_built(method, preset):
    with pytest.raises(UnsupportedPreset, match="supported presets") as raised:
        row_for(method, None, RunConfig(), preset)  # no models needed: it fails first
    assert isinstance(raised.value, ValueError)


def test_tool_settings_name_what_they_support():
    assert quanto_setting("w4a8") == ("qint4", "qint8")
    with pytest.raises(ValueError, match="W8A8"):
        quanto_setting("W4A4")
    with pytest.raises(ValueError, match="W4A8"):
        torchao_config("W8A16")
    assert modelopt_presets("W4A8_AWQ_BETA_CFG") == ("W4A8",)
    assert modelopt_presets("INT8_SMOOTHQUANT_CFG") == ("W8A8",)


@pytest.fixture
def no_peers(monkeypatch):
    """Make every peer library unimportable, as on an install without the extra."""
    for name in ("optimum.quanto", "modelopt", "modelopt.torch", "modelopt.torch.quantization", "torchao",
                 "torchao.quantization", "torchao.quantization.granularity", "torchao.utils"):
        monkeypatch.setitem(sys.modules, name, None)


def test_missing_tool_raises_install_hint(no_peers, tiny_unet, tiny_calibration):
    for quantize in (lambda: quantize_quanto(tiny_unet, tiny_calibration, "W8A8"),
                     lambda: quantize_modelopt(tiny_unet, tiny_calibration, "INT8_DEFAULT_CFG"),
                     lambda: quantize_torchao(tiny_unet, tiny_calibration, "W8A8")):
        with pytest.raises(ImportError, match=r"pip install -e \.\[peers\]") as raised:
            quantize()
        assert isinstance(raised.value, PeerNotInstalled)
    with pytest.raises(PeerNotInstalled, match="optimum-quanto"):
        row_for("quanto", None, RunConfig(), "W8A8")


def test_calibration_batches_cover_every_input_once(tiny_calibration):
    batches = list(calibration_batches(tiny_calibration, batch_size=24))
    assert [len(x) for x, _, _ in batches] == [24, 24, 16]
    assert all(cond is None for _, _, cond in batches)  # an unconditional model's set carries no conditioning
    seen = torch.cat([t for _, t, _ in batches])
    assert sorted(seen.tolist()) == sorted(tiny_calibration.t.tolist())
    assert not torch.equal(seen, tiny_calibration.t)  # shuffled: every batch mixes timesteps
    again = torch.cat([t for _, t, _ in calibration_batches(tiny_calibration, batch_size=24)])
    assert torch.equal(seen, again)


def test_report_summary_says_what_was_left_out():
    report = PeerReport(tool="torchao", version="0.18.0", setting="int8 dynamic", weights=29, activations=29,
                        convs=0, linears=29, conv_total=35, linear_total=29)
    assert report.total == 64 and report.scope == "Linear only"
    assert report.summary.startswith("torchao 0.18.0 (int8 dynamic): 29 of 64 layers (Linear only)")
    assert report.to_dict()["scope"] == "Linear only"


@pytest.fixture
def never_calibrate(monkeypatch):
    """Fail the test if the main job gets as far as recording calibration data."""
    import tadq.experiments.run as run_module

    def calibrate(*args, **kwargs):
        raise AssertionError("the model was calibrated before the peer row was refused")

    monkeypatch.setattr(run_module, "collect_calibration_set", calibrate)


def test_run_refuses_a_peer_preset_before_calibrating(tmp_path, tiny_model_dir, never_calibrate):
    # tadq run's default presets include W4A4, which quanto has no setting for: refused at once, nothing written
    config = RunConfig(model=str(tiny_model_dir), presets=("W4A4",), methods=("naive", "quanto"), num_samples=2,
                       batch_size=2,
                       out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UnsupportedPreset, match="'W4A4'"):
        run_main_job(config)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_run_refuses_a_missing_peer_tool_before_calibrating(tmp_path, tiny_model_dir, never_calibrate, no_peers):
    config = RunConfig(model=str(tiny_model_dir), presets=("W8A8",), methods=("torchao-int8-dynamic",),
                       num_samples=2, batch_size=2, out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(PeerNotInstalled, match="torchao"):
        run_main_job(config)
    assert not (tmp_path / "out").exists()


def test_modelopt_without_calibration_data_is_refused_by_name(tiny_unet):
    # the forward loop failed inside ModelOpt's calibration (len(None)); refused before the tool is even imported
    with pytest.raises(ValueError, match="pass a calibration set"):
        quantize_modelopt(tiny_unet, None, "INT8_DEFAULT_CFG", preset="W8A16")
