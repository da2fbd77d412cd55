"""A tiny bench matrix for the tests: naive rows that run, a peer with no setting for the presets asked, a method
whose optional extra is missing, and one whose build fails — the last three must become "not supported" rows."""

from __future__ import annotations

from pathlib import Path

import pytest

import tadq.experiments.rows.base as rows_base
from tadq.config import CalibrationConfig
from tadq.experiments.bench import BenchConfig
from tadq.experiments.peers.base import PeerNotInstalled
from tadq.experiments.rows import Variant
from tadq.sampling import SamplerConfig

ETA0 = SamplerConfig(kind="ddim", num_steps=4, eta=0.0)
ETA1 = SamplerConfig(kind="ddim", num_steps=4, eta=1.0)
CALIB = CalibrationConfig(sampler=ETA0, num_trajectories=8, num_steps_kept=3, samples_per_step=8, seed=0,
                          batch_size=8)
METHODS = ("naive", "modelopt-w4a8-awq", "fake-extra", "fake-build")  # the peer only does W4A8
PRESETS = ("W8A8", "W4A4")


def _needs_extra(bases, config, preset_name):
    raise PeerNotInstalled("fake-extra needs the 'imaginary' extra: pip install -e .[imaginary]")


def _fails_to_build(bases, config, preset_name):
    def build():
        raise NotImplementedError(f"fake-build has no kernel for {preset_name}")

    return Variant("Fake build", preset_name, build, {"method": "fake-build", "preset": preset_name})


def register_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two throw-away methods in the registry, removed again when ``monkeypatch`` undoes."""
    monkeypatch.setitem(rows_base._METHODS, "fake-extra", ("Fake extra", _needs_extra))
    monkeypatch.setitem(rows_base._METHODS, "fake-build", ("Fake build", _fails_to_build))


def bench_config(model_dir: Path, out: Path, **changes) -> BenchConfig:
    fields = dict(model=str(model_dir), methods=METHODS, presets=PRESETS, samplers=(ETA0, ETA1), num_samples=8,
                  eval_seed=1, calibration=CALIB, batch_size=8, out_dir=str(out), cache_dir=str(out / "cache"),
                  grid_samples=8, threads=1)
    fields.update(changes)
    return BenchConfig(**fields)
