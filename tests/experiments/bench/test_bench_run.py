"""``tadq bench`` end to end on a tiny model: complete, self-contained report; one row per (method, preset,
sampler) with "not supported" rows; finished cells are skipped on a rerun and an interrupted bench resumes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from tests.conftest import build_tiny_unet
from tests.experiments.bench.common import ETA0, ETA1, METHODS, PRESETS, bench_config, register_fakes

import tadq.experiments.rows.base as rows_base
import tadq.experiments.run as run_module
from tadq.experiments.bench import run_bench


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("bench-model") / "tiny-ddpm"
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=build_tiny_unet(), scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bench(tiny_dir, tmp_path_factory):
    """One bench run shared by the tests that only read its report."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        register_fakes(monkeypatch)
        config = bench_config(tiny_dir, out)
        return config, run_bench(config)


def _counting(monkeypatch) -> dict[str, int]:
    """Count quantizations (base-model builds) and sampling calls from here on."""
    counts = {"quantize": 0, "sample": 0}
    real_quantize, real_sample = rows_base.quantize, run_module.sample

    def quantize(*args, **kwargs):
        counts["quantize"] += 1
        return real_quantize(*args, **kwargs)

    def sample(*args, **kwargs):
        counts["sample"] += 1
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(rows_base, "quantize", quantize)
    monkeypatch.setattr(run_module, "sample", sample)
    return counts


def test_report_files_exist_and_html_is_self_contained(bench):
    config, _ = bench
    out = Path(config.out_dir)
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0
    for sampler in config.samplers:
        assert (out / sampler.key / "samples.png").is_file() and (out / sampler.key / "results.json").is_file()
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<script" not in page and "<link" not in page and "url(" not in page
    images = page.count('src="data:image/png;base64,')
    assert images >= 2 * len(config.samplers) and images == page.count("<img")  # every image is embedded
    assert config.command() in page and "simulation" in page and "not supported: " in page


def test_json_has_one_row_per_method_preset_sampler(bench):
    config, report = bench
    rows = [r for r in report["rows"] if r["method"] != "fp"]
    cells = {(r["method"], r["preset"], r["sampler"]) for r in rows}
    assert len(rows) == len(cells) == len(METHODS) * len(PRESETS) * len(config.samplers)
    assert sum(r["method"] == "fp" for r in report["rows"]) == len(config.samplers)
    status = {(r["method"], r["preset"], r["sampler"]): r["status"] for r in rows}
    for sampler in config.samplers:
        for preset in PRESETS:
            assert status[("naive", preset, sampler.key)] == "ok"
            assert "supported presets: ['W4A8']" in status[("modelopt-w4a8-awq", preset, sampler.key)]
            assert "PeerNotInstalled" in status[("fake-extra", preset, sampler.key)]
            assert f"no kernel for {preset}" in status[("fake-build", preset, sampler.key)]
    assert all(s.startswith("not supported: ") for s in status.values() if s != "ok")
    assert json.loads((Path(config.out_dir) / "report.json").read_text())["rows"] == report["rows"]


def test_measured_rows_carry_costs_measured_in_the_same_run(bench):
    config, report = bench
    for sampler in config.samplers:
        naive = {r["preset"]: r for r in report["rows"] if r["sampler"] == sampler.key and r["method"] == "naive"}
        fp = next(r for r in report["rows"] if r["sampler"] == sampler.key and r["method"] == "fp")
        assert naive["W8A8"]["final_mse"] < naive["W4A4"]["final_mse"]
        assert fp["bitops"] > naive["W8A8"]["bitops"] > naive["W4A4"]["bitops"] > 0
        assert naive["W4A4"]["artefact_bytes"] < naive["W8A8"]["artefact_bytes"]
        assert naive["W8A8"]["overhead"] == 1.0 and naive["W8A8"]["vs_fp"] > 0  # naive is its own base
        assert naive["W8A8"]["setup_s"] > 0 and naive["W8A8"]["sampling_s"] > 0
        assert naive["W8A8"]["hook_share"] == 0.0 and fp["hook_share"] is None  # no corrections / not hooked


def test_bench_rows_equal_tadq_run_rows_and_time_the_correction_hooks(tiny_dir, tmp_path):
    """The bench (timed hooks, own variant list) scores exactly what ``tadq run`` scores for the same config."""
    from tadq.config import ReconstructionConfig

    config = bench_config(tiny_dir, tmp_path / "bench", methods=("qdiffusion", "ptqd"), presets=("W4A8",),
                          samplers=(ETA1,), reconstruction=ReconstructionConfig(weight_iters=4, activation_iters=2,
                                                                                batch_size=8))
    report = run_bench(config)
    reference = run_module.run_main_job(dataclasses.replace(config.run_config(ETA1), out_dir=str(tmp_path / "run")))
    keys = ("fd_digits", "agreement", "psnr", "ssim", "final_mse")
    assert [[r[k] for k in keys] for r in report["rows"]] == [[r[k] for k in keys] for r in reference["rows"]]
    ptqd = report["rows"][-1]
    assert ptqd["method"] == "ptqd" and 0 < ptqd["hook_share"] < 1 and ptqd["overhead"] is not None


def test_rerun_skips_every_finished_cell(bench, monkeypatch):
    config, first = bench
    register_fakes(monkeypatch)
    counts = _counting(monkeypatch)
    again = run_bench(config)
    assert counts == {"quantize": 0, "sample": 0}
    keys = ("method", "preset", "sampler", "status", "psnr", "fd_digits", "final_mse", "bitops", "artefact_bytes")
    assert [{k: r.get(k) for k in keys} for r in again["rows"]] == [{k: r.get(k) for k in keys} for r in first["rows"]]


def test_interrupted_bench_resumes_where_it_stopped(tiny_dir, tmp_path, monkeypatch):
    config = bench_config(tiny_dir, tmp_path / "out", methods=("naive",), samplers=(ETA0,))
    real_quantize = rows_base.quantize

    def interrupted(model, scheduler, quant_config, **kwargs):
        if quant_config.label == "W4A4":
            raise KeyboardInterrupt
        return real_quantize(model, scheduler, quant_config, **kwargs)

    monkeypatch.setattr(rows_base, "quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_bench(config)
    assert len(list((tmp_path / "out" / ETA0.key / "cells").glob("*.safetensors"))) == 2  # FP and naive W8A8 kept
    assert not (tmp_path / "out" / "report.html").exists()
    monkeypatch.setattr(rows_base, "quantize", real_quantize)
    counts = _counting(monkeypatch)
    report = run_bench(config)
    assert counts == {"quantize": 1, "sample": 1}  # only the unfinished W4A4 cell
    assert [r["status"] for r in report["rows"]] == ["ok", "ok", "ok"]


def test_every_embedded_image_of_the_report_is_a_whole_png(bench):
    """The structure a browser needs: every <img> is a data URI holding a complete PNG (signature, IEND chunk)."""
    import base64
    import re

    config, _ = bench
    page = (Path(config.out_dir) / "report.html").read_text()
    sources = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', page)
    assert sources and len(sources) == page.count("<img")
    for encoded in sources:
        data = base64.b64decode(encoded, validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[-12:-4] == b"\x00\x00\x00\x00IEND"


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package (`make browser` installs it)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser on this machine: install Debian's chromium "
                    "(`make browser`) to render the report; the structure is checked by the test above")
def test_the_report_renders_in_headless_chromium_with_every_image_decoded(bench, tmp_path):
    """A real browser opens the report and decodes every image (naturalWidth > 0), read back from the DOM."""
    import re
    import subprocess

    config, _ = bench
    page = (Path(config.out_dir) / "report.html").read_text()
    probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
             "[...document.images].map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0).join(',')); "
             "});</script></body>")
    copy = tmp_path / "report.html"
    copy.write_text(page.replace("</body>", probe))
    result = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                             "--virtual-time-budget=10000", "--dump-dom", copy.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-500:]
    found = re.search(r'data-images="([^"]*)"', result.stdout)
    assert found, "the load handler did not run"
    widths = [int(w) for w in found.group(1).split(",")]
    assert len(widths) == page.count("<img") and all(w > 0 for w in widths)


def test_a_damaged_cell_is_refused_not_reported_as_an_unsupported_method(tiny_dir, tmp_path):
    """A finished cell truncated on disk raised DamagedFileError, a ValueError, which the bench took for "this method
    cannot do this preset": the naive row read "not supported" in every report, the damage unsaid."""
    config = bench_config(tiny_dir, tmp_path / "out", methods=("naive",), presets=("W8A8",), samplers=(ETA0,),
                          num_samples=2, grid_samples=2)
    run_bench(config)
    (cell,) = (tmp_path / "out" / ETA0.key / "cells").glob("naive-*.safetensors")
    cell.write_bytes(cell.read_bytes()[: cell.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cell.name}.*delete it"):
        run_bench(config)


def test_an_interrupted_rerun_never_leaves_the_earlier_benchs_report_beside_its_own_tables(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    """A rerun into the same folder with another seed, interrupted once its first sampler's table is rewritten: the
    earlier bench's report.md/.json/.html stayed, its numbers beside (and, in report.md, linking) the new run's
    figures and results, with nothing saying so. They are removed when the first table is rewritten, as
    ``tadq run`` removes its results.json."""
    import tadq.experiments.bench.runner as runner_module

    config = bench_config(tiny_dir, tmp_path / "out", methods=("naive",), presets=("W8A8",), samplers=(ETA0, ETA1))
    run_bench(config)
    out = Path(config.out_dir)
    assert all((out / name).is_file() for name in ("report.json", "report.md", "report.html"))
    rerun = dataclasses.replace(config, eval_seed=2)
    real_run_sampler = runner_module.run_sampler

    def first_table_then_interrupt(bench, sampler):
        if sampler == ETA1:
            raise KeyboardInterrupt
        return real_run_sampler(bench, sampler)

    monkeypatch.setattr(runner_module, "run_sampler", first_table_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_bench(rerun)
    assert json.loads((out / ETA0.key / "results.json").read_text())["config"]["eval_seed"] == 2  # rewritten
    for name in ("report.json", "report.md", "report.html"):
        assert not (out / name).exists(), f"the earlier bench's {name} is left beside the new {ETA0.key} table"
    monkeypatch.undo()
    assert run_bench(rerun)["config"]["eval_seed"] == 2  # the rerun finishes the report
