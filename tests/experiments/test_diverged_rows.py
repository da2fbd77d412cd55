"""A variant whose samples hold NaN or Inf (a low-bit row that diverged) becomes a row saying so, with NaN quality
numbers, instead of stopping the report after every other cell was sampled; an FP reference that is not finite
is refused, since nothing can be measured against it."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tadq.config import CalibrationConfig
from tadq.experiments.bench.rows import _measured_row
from tadq.experiments.run import RunConfig, write_report
from tadq.sampling import SamplerConfig

STEPS, N = 2, 4


def _cell(name: str, bits: str, images: torch.Tensor) -> dict:
    states = torch.stack([images] * (STEPS + 1))
    return {"name": name, "bits": bits, "images": images, "states": states, "setup_s": 1.0, "sampling_s": 2.0}


def _refuse_constant(name: str):
    raise AssertionError(f"{name} is not JSON")


def _report(tmp_path, cells):
    sampler = SamplerConfig("ddim", num_steps=STEPS)
    config = RunConfig(presets=("W8A8", "W4A4"), methods=("naive",), num_samples=N, sampler=sampler,
                       calibration=CalibrationConfig(sampler=sampler, num_steps_kept=STEPS), out_dir=str(tmp_path),
                       grid_samples=N)
    workload = SimpleNamespace(features=None, expected_labels=None, name="tiny", settings={})
    return write_report(config, cells, workload)


def test_a_diverged_row_is_reported_and_the_others_are_measured(tmp_path):
    generator = torch.Generator().manual_seed(0)
    fp = torch.rand(N, 1, 8, 8, generator=generator) * 2 - 1
    good = (fp + 0.01 * torch.randn(N, 1, 8, 8, generator=generator)).clamp(-1, 1)
    bad = good.clone()
    bad[1, 0, 3, 3] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    results = _report(tmp_path, [_cell("FP", "W32A32", fp), _cell("naive PTQ", "W8A8", good),
                                 _cell("naive PTQ", "W4A4", bad)])
    fp_row, good_row, bad_row = results["rows"]
    assert math.isfinite(good_row["psnr"]) and "diverged" not in good_row
    assert bad_row["diverged"] == f"2 of {N} samples hold NaN or Inf"
    assert all(math.isnan(bad_row[key]) for key in ("psnr", "ssim", "final_mse"))
    assert "naive PTQ W4A4" in results["notes"]["diverged"] and not fp_row.get("diverged")
    markdown = (tmp_path / "results.md").read_text()
    assert "NaN" in markdown and "Diverged" in markdown
    # strict JSON (jq and JavaScript refuse the bare NaN token json.dumps writes): NaN is null, and the row says why
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=_refuse_constant)
    assert saved["rows"][2]["psnr"] is None and saved["rows"][2]["diverged"] == bad_row["diverged"]
    assert saved["rows"][1]["psnr"] == good_row["psnr"]
    row = _measured_row(SamplerConfig("ddim", num_steps=STEPS), "naive", "W4A4", bad_row, {}, {})
    assert row["status"].startswith("diverged: 2 of")


def test_no_diverged_note_when_every_row_is_finite(tmp_path):
    fp = torch.zeros(N, 1, 8, 8)
    results = _report(tmp_path, [_cell("FP", "W32A32", fp), _cell("naive PTQ", "W8A8", fp + 0.1)])
    assert results["notes"]["diverged"] == "" and "Diverged" not in (tmp_path / "results.md").read_text()


def test_a_non_finite_fp_reference_is_refused_by_name(tmp_path):
    fp = torch.zeros(N, 1, 8, 8)
    fp[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="FP model produced 1 non-finite samples"):
        _report(tmp_path, [_cell("FP", "W32A32", fp), _cell("naive PTQ", "W8A8", torch.zeros(N, 1, 8, 8))])


def test_the_bench_report_json_is_strict_with_a_diverged_row(tmp_path, monkeypatch):
    """report.json held a diverged row's NaN as the bare token ``NaN``, which jq and JavaScript refuse."""
    import tadq.experiments.bench.report as bench_report
    from tadq.experiments.bench.config import BenchConfig

    sampler = SamplerConfig("ddim", num_steps=STEPS)
    row = {"method": "naive", "bits": "W4A4", "psnr": math.nan, "final_mse": math.inf, "status": "diverged: 2 of 4"}
    section = {"sampler": sampler, "title": "DDIM", "rows": [row], "description": [], "verdicts": [], "figures": [],
               "fd_floor": None, "wall_s": 1.0}
    monkeypatch.setattr(bench_report, "_section", lambda bench, table: section)
    monkeypatch.setattr(bench_report, "_markdown", lambda *args: "")
    monkeypatch.setattr(bench_report, "_html", lambda *args: "")
    bench = BenchConfig(methods=("naive",), presets=("W4A4",), samplers=(sampler,), out_dir=str(tmp_path))
    bench_report.write_bench_report(bench, [{}], wall_s=1.0)
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=_refuse_constant)
    assert saved["rows"][0]["psnr"] is None and saved["rows"][0]["final_mse"] is None
    assert saved["rows"][0]["status"] == row["status"]


def test_the_bench_report_json_names_figures_from_the_bench_folder(tmp_path, monkeypatch):
    """report.json listed each figure by the path --out was given as (relative to the working directory, or
    absolute): wrong once the folder was moved or read from another directory; report.md links them from the
    folder."""
    import tadq.experiments.bench.report as bench_report
    from tadq.experiments.bench.config import BenchConfig

    sampler = SamplerConfig("ddim", num_steps=STEPS)
    monkeypatch.chdir(tmp_path)
    bench = BenchConfig(methods=("naive",), presets=("W4A4",), samplers=(sampler,), out_dir="runs/b")
    figure = bench.sampler_dir(sampler) / "samples.png"
    section = {"sampler": sampler, "title": "DDIM", "rows": [], "columns": (("method", "method"),), "description": [],
               "verdicts": [], "figures": [(figure, "samples")], "fd_floor": None, "wall_s": 1.0}
    monkeypatch.setattr(bench_report, "_section", lambda bench, table: section)
    monkeypatch.setattr(bench_report, "_html", lambda *args: "")
    bench_report.write_bench_report(bench, [{}], wall_s=1.0)
    saved = json.loads((tmp_path / "runs" / "b" / "report.json").read_text())
    listed = saved["samplers"][sampler.key]["figures"]
    assert listed == [f"{sampler.key}/samples.png"]
    assert f"]({listed[0]})" in (tmp_path / "runs" / "b" / "report.md").read_text()  # as report.md links it
