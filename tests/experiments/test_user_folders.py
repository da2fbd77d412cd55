"""The experiment harness (tadq run, bench, analyze, recipe) pointed at USER diffusers folders saved from
tiny random models built with diffusers' own classes: RGB and odd-sized pixel DDPMs, a v-prediction model, a
class-conditional UNet2DModel with a DDIM scheduler, a flow-matching UNet, a DiTPipeline and a tiny Stable Diffusion
pipeline. Each command must work end to end (finite numbers, FD/agreement reported as not measured with a reason) or
refuse in one line with exit code 2 before any expensive work; reruns reuse finished cells and a changed input
never reuses a stale one."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTPipeline,
    FlowMatchEulerDiscreteScheduler,
    UNet2DModel,
)
from tests.cli.test_harness_commands_input import _refused, _text
from typer.testing import CliRunner

import tadq.experiments.run as run_module
from tadq.cli.app import app

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"


def _unet(channels: int, size: int, classes: int | None = None, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
                       num_class_embeds=classes).eval()


def _ddpm(**kw) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", **kw)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("user-folders")
    out = {}

    def save(name, unet, scheduler):
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(root / name)
        out[name] = root / name

    save("rgb16", _unet(3, 16), _ddpm(prediction_type="epsilon"))
    save("gray24", _unet(1, 24), _ddpm(prediction_type="epsilon"))
    save("vpred8", _unet(1, 8), _ddpm(prediction_type="v_prediction"))
    save("cls", _unet(3, 16, classes=5),
         DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False))
    save("flow", _unet(3, 16), FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0))
    from tests.adapters.test_transformer2d import build_tiny_dit
    from tests.pipelines.builders import _vae, build_sd

    torch.manual_seed(0)
    DiTPipeline(transformer=build_tiny_dit(), vae=_vae().eval(),
                scheduler=DDIMScheduler(num_train_timesteps=1000, clip_sample=False)).save_pretrained(root / "dit")
    out["dit"] = root / "dit"
    out["sd"] = build_sd(root / "sd")
    (root / "calib.txt").write_text("a cat\na dog\n")
    (root / "eval.txt").write_text("cat dog\ndog cat\n")
    out["calib"], out["eval"] = root / "calib.txt", root / "eval.txt"
    return out


@pytest.fixture
def sample_calls(monkeypatch) -> list[int]:
    """Counts the sampling runs of tadq run / bench cells (one per computed, not reused, cell)."""
    calls: list[int] = []
    original = run_module.sample

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "sample", counting)
    return calls


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _run(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--num-samples", "4",
            "--steps", "2", "--calib-trajectories", "4", "--batch-size", "4", "--threads", "1",
            "--out", str(out), "--cache-dir", str(out.parent / "cache"), *extra]


def _bench(model: Path, out: Path, *extra: str, samplers: str = "ddim-eta0") -> list[str]:
    return ["bench", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--samplers", samplers,
            "--steps", "2", "--num-samples", "4", "--calib-trajectories", "4", "--batch-size", "4", "--threads", "1",
            "--out", str(out), "--cache-dir", str(out.parent / "cache"), *extra]


def _recipe(model: Path, out: Path, *extra: str) -> list[str]:
    return ["recipe", str(model), "--budget-bits", "W8A8", "--presets", "W8A8", "--bases", "naive", "--stacks",
            "none", "--steps", "2", "--calib-trajectories", "4", "--fit-trajectories", "4", "--selection-samples", "4",
            "--heldout", "4", "--batch-size", "4", "--threads", "1", "--out", str(out), *extra]


def _check_run_report(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    for name in ("results.md", "samples.png", "per_step_error.png"):
        assert (out / name).is_file(), name
    for name in ("samples.png", "per_step_error.png"):
        assert (out / name).read_bytes()[:8] == PNG
    fp, *rows = results["rows"]
    assert fp["final_mse"] == 0.0
    for row in rows:
        assert math.isfinite(row["psnr"]) and math.isfinite(row["ssim"]) and math.isfinite(row["final_mse"])
        # a user's model: no digit/photo classifier reads its samples, never computed in a foreign feature space
        assert row["fd_digits"] is None and row["agreement"] is None
    assert results["fd_real_vs_real"] is None
    assert "not computed" in results["notes"]["fd"]
    return results


# ---------------------------------------------------------------- what works


@pytest.mark.parametrize("name", ["rgb16", "gray24", "vpred8"])
def test_run_on_rgb_odd_size_and_v_prediction_folders(folders, tmp_path, name):
    _ok(runner.invoke(app, _run(folders[name], tmp_path / "out")))
    _check_run_report(tmp_path / "out")


# ≈ 7 s on a 2-core AVX2 CPU: `make test-slow`; the default suite keeps cell reuse (an interrupted run resumes from its
# cells, tests/experiments/test_run.py) and recomputation after a folder change (below)
@pytest.mark.slow
def test_run_rerun_reuses_cells_and_a_changed_flag_recomputes(folders, tmp_path, sample_calls):
    out = tmp_path / "out"
    _ok(runner.invoke(app, _run(folders["rgb16"], out)))
    assert len(sample_calls) == 2  # FP + naive
    first = json.loads((out / "results.json").read_text())["rows"]
    _ok(runner.invoke(app, _run(folders["rgb16"], out)))
    assert len(sample_calls) == 2  # nothing sampled again
    assert json.loads((out / "results.json").read_text())["rows"][1]["psnr"] == first[1]["psnr"]
    _ok(runner.invoke(app, _run(folders["rgb16"], out, "--eta", "0.5")))
    assert len(sample_calls) == 4  # another sampler: both cells recomputed
    _ok(runner.invoke(app, _run(folders["rgb16"], out, "--fp-layers", "none")))
    assert len(sample_calls) == 5  # the FP cell is shared, the naive row is not


def test_run_flow_matching_folder_needs_flow_euler(folders, tmp_path, sample_calls):
    """A flow-matching folder runs on flow-euler, the sampler tadq run picks for it when none is named; DDIM named
    explicitly is refused before any sampling, as flow-euler is on a discrete-schedule folder."""
    _refused(runner.invoke(app, _run(folders["flow"], tmp_path / "ddim", "--sampler", "ddim")), "'ddim'",
             "flow-euler")
    assert not (tmp_path / "ddim").exists() and not sample_calls
    _refused(runner.invoke(app, _run(folders["rgb16"], tmp_path / "fe", "--sampler", "flow-euler")), "'flow-euler'")
    assert not (tmp_path / "fe").exists()
    _ok(runner.invoke(app, _run(folders["flow"], tmp_path / "out")))
    assert _check_run_report(tmp_path / "out")["config"]["sampler"]["data"]["kind"] == "flow-euler"


def test_run_class_conditional_folder_labels_and_guidance(folders, tmp_path):
    model = folders["cls"]
    _refused(runner.invoke(app, _run(model, tmp_path / "a", "--labels", "null")), "--null-class")
    _refused(runner.invoke(app, _run(model, tmp_path / "b", "--guidance-scale", "2")), "--null-class")
    _refused(runner.invoke(app, _run(model, tmp_path / "c", "--null-class", "7")), "null_class=7")
    _refused(runner.invoke(app, _run(folders["rgb16"], tmp_path / "d", "--labels", "random")), "no labels")
    assert not any((tmp_path / x).exists() for x in "abcd")
    _ok(runner.invoke(app, _run(model, tmp_path / "out", "--labels", "random", "--null-class", "4",
                                "--guidance-scale", "2")))
    results = _check_run_report(tmp_path / "out")
    assert results["config"]["workload"]["guidance_scale"] == 2.0


def test_run_dit_and_sd_pipeline_folders(folders, tmp_path):
    _ok(runner.invoke(app, _run(folders["dit"], tmp_path / "dit", "--labels", "random", "--guidance-scale", "2")))
    _check_run_report(tmp_path / "dit")
    _refused(runner.invoke(app, _run(folders["sd"], tmp_path / "sd0")), "--calib-prompts")
    _ok(runner.invoke(app, _run(folders["sd"], tmp_path / "sd", "--calib-prompts", str(folders["calib"]),
                                "--eval-prompts", str(folders["eval"]))))
    run_rows = _check_run_report(tmp_path / "sd")["rows"]
    # the saved bases keep the pipeline's other components, as `tadq quantize` writes them: `tadq sample` runs them
    # (a denoiser-only base named a StableDiffusionPipeline with no VAE, which sample refused)
    (dit_base,) = (tmp_path / "dit" / "models").glob("naive-W8A8-*/")
    (sd_base,) = (tmp_path / "sd" / "models").glob("naive-W8A8-*/")
    assert (dit_base / "vae").is_dir() and (sd_base / "vae").is_dir() and (sd_base / "text_encoder").is_dir()
    _ok(runner.invoke(app, ["verify", str(sd_base)]))
    _ok(runner.invoke(app, ["sample", str(sd_base), "--prompt", "a cat", "--num-samples", "1", "--steps", "2",
                            "--out", str(tmp_path / "sd-samples")]))
    assert (tmp_path / "sd-samples" / "sample_0000.png").read_bytes()[:8] == PNG
    # `tadq evaluate` on the saved base, with the run's evaluation prompts, seed and batches, scores it as the run
    # scored its row: the same FP and quantized samples, decoded by the same VAE (it refused text-to-image artefacts)
    _ok(runner.invoke(app, ["evaluate", str(sd_base), "--reference", str(folders["sd"]), "--eval-prompts",
                            str(folders["eval"]), "--num-samples", "4", "--batch-size", "4", "--threads", "1",
                            "--out", str(tmp_path / "sd-evaluate")]))
    evaluated = json.loads((tmp_path / "sd-evaluate" / "results.json").read_text())
    assert evaluated["settings"]["prompts"] == [line for line in folders["eval"].read_text().splitlines() if line]
    for key in ("psnr", "ssim", "final_mse"):
        assert evaluated["rows"][1][key] == run_rows[1][key], key
    _ok(runner.invoke(app, ["sample", str(dit_base), "--num-samples", "1", "--steps", "2",
                            "--out", str(tmp_path / "dit-samples.png")]))


def test_bases_of_a_folder_whose_components_cannot_be_copied_stay_denoiser_only_with_a_warning(folders, tmp_path,
                                                                                               caplog):
    """The run needs neither the copy nor a matching config: such a folder still runs (a broken link in the VAE
    folder made `save_quantized` refuse the base after its whole quantization), its bases denoiser-only, said."""
    from tadq.experiments.workload import load_workload

    model = _copy(folders["dit"], tmp_path / "dit")
    workload = load_workload(str(model), labels="random")
    assert run_module.base_pipeline_source(model, workload) == model
    (model / "vae" / "unused.bin").symlink_to(tmp_path / "deleted-blob")
    with caplog.at_level("WARNING", logger="tadq.experiments.run"):
        assert run_module.base_pipeline_source(model, workload) is None
    assert "saved without" in caplog.text and "unused.bin" in caplog.text


@pytest.mark.slow  # ≈ 25 s; bench reports and reruns on the shipped layout: tests/experiments/bench
def test_bench_rgb_folder_report_and_rerun_reuses_every_cell(folders, tmp_path, sample_calls):
    out = tmp_path / "bench"
    args = _bench(folders["rgb16"], out, "--methods", "naive,ptqd", samplers="ddim-eta0,euler")
    _ok(runner.invoke(app, args))
    assert len(sample_calls) == 6
    report = json.loads((out / "report.json").read_text())
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    assert len(rows) == 6
    for row in rows:
        assert row["fd_digits"] is None and row["agreement"] is None
        if row["method"] != "fp":
            assert math.isfinite(row["psnr"])
    assert (out / "report.html").is_file()
    for sampler in ("ddim-2-eta0.0", "euler-2"):
        assert (out / sampler / "samples.png").read_bytes()[:8] == PNG
    _ok(runner.invoke(app, args))
    assert len(sample_calls) == 6  # every cell reused


def test_recipe_on_flow_and_class_conditional_folders(folders, tmp_path):
    _ok(runner.invoke(app, _recipe(folders["flow"], tmp_path / "flow")))
    report = json.loads((tmp_path / "flow" / "report.json").read_text())
    assert report["settings"]["space"]["sampler"].startswith("flow-euler")  # the flow model's own sampler
    _ok(runner.invoke(app, _recipe(folders["cls"], tmp_path / "cls")))
    rerun = _ok(runner.invoke(app, _recipe(folders["cls"], tmp_path / "cls")))
    stats = json.loads((tmp_path / "cls" / "report.json").read_text())["stats"]
    assert stats["bases_built"] == 0 and stats["candidates_reused"] == 1, rerun.output


def _quantize(model: Path, out: Path, *extra: str) -> Path:
    _ok(runner.invoke(app, ["quantize", str(model), "--out", str(out), "--preset", "W8A8", "--steps", "2",
                            "--calib-trajectories", "4", "--threads", "1", *extra]))
    return out


def _analyze(artefact: Path, fp: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", str(artefact), "--fp-model", str(fp), "--num-samples", "4", "--batch-size", "4",
            "--no-jacobian", "--threads", "1", "--out", str(out), *extra]


# ≈ 8 s on a 2-core AVX2 CPU (three quantizations, two analyses): `make test-slow`; analyze on a user's folder stays in
# the default suite (test_analyze_does_not_measure_under_another_schedule_than_the_artefact_s, tests/cli)
@pytest.mark.slow
def test_analyze_on_user_artefacts(folders, tmp_path):
    rgb = _quantize(folders["rgb16"], tmp_path / "q-rgb")
    _ok(runner.invoke(app, _analyze(rgb, folders["rgb16"], tmp_path / "a")))
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert (tmp_path / "a" / "propagation.png").read_bytes()[:8] == PNG
    assert all(math.isfinite(v) for v in analysis["measured"])
    _refused(runner.invoke(app, _analyze(rgb, folders["rgb16"], tmp_path / "b", "--sampler", "flow-euler")),
             "'flow-euler'")
    _refused(runner.invoke(app, _analyze(rgb, folders["gray24"], tmp_path / "c")), "differs")
    flow = _quantize(folders["flow"], tmp_path / "q-flow", "--sampler", "flow-euler")
    _ok(runner.invoke(app, _analyze(flow, folders["flow"], tmp_path / "d")))
    cls = _quantize(folders["cls"], tmp_path / "q-cls")
    _refused(runner.invoke(app, _analyze(cls, folders["cls"], tmp_path / "e")), "conditional")
    assert not any((tmp_path / x).exists() for x in "bce")


# ---------------------------------------------------------------- defects found and fixed


def test_run_cells_are_not_reused_after_the_folder_scheduler_changes(folders, tmp_path, sample_calls):
    """The cell key covers the denoiser's weights but not the folder's scheduler: editing scheduler_config.json
    (here beta_end 0.02 -> 0.05: another noise schedule, new calibration data, new base models) reused both old
    cells, so the report shows the old schedule's samples and PSNR under the new one."""
    model = _copy(folders["rgb16"], tmp_path / "model")
    out = tmp_path / "out"
    _ok(runner.invoke(app, _run(model, out)))
    assert len(sample_calls) == 2
    config_file = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["beta_end"] = 0.05
    config_file.write_text(json.dumps(config))
    _ok(runner.invoke(app, _run(model, out)))
    assert len(sample_calls) == 4, "stale cells (sampled with the old noise schedule) were reused"


def test_run_cells_are_not_reused_after_the_folder_vae_changes(folders, tmp_path, sample_calls):
    """A DiTPipeline's cells keep the images decoded by the folder's VAE; the key does not cover the VAE, so
    replacing vae/ reused images decoded by the old one."""
    from tests.pipelines.builders import _vae

    model = _copy(folders["dit"], tmp_path / "model")
    out = tmp_path / "out"
    _ok(runner.invoke(app, _run(model, out)))
    assert len(sample_calls) == 2
    torch.manual_seed(123)
    vae = _vae().eval()
    with torch.no_grad():
        for parameter in vae.parameters():
            parameter.mul_(1.5)
    shutil.rmtree(model / "vae")
    vae.save_pretrained(model / "vae")
    _ok(runner.invoke(app, _run(model, out)))
    assert len(sample_calls) == 4, "stale cells (images decoded by the old VAE) were reused"


def test_bench_refuses_a_sampler_the_scheduler_cannot_drive_before_any_work(folders, tmp_path, sample_calls):
    """--samplers ddim-eta0,flow-euler on an ε DDPM folder: the whole ddim matrix (calibration, base models, cells)
    ran first, then flow-euler was refused with exit 2 and no report; it should be refused up front."""
    out = tmp_path / "bench"
    _refused(runner.invoke(app, _bench(folders["rgb16"], out, samplers="ddim-eta0,flow-euler")), "'flow-euler'")
    assert not sample_calls, f"{len(sample_calls)} cells sampled before the refusal"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bench_class_conditional_guidance_names_flags_bench_has(folders, tmp_path):
    """tadq bench on a user's class-conditional folder with --guidance-scale is refused with 'use --labels random
    --null-class N', flags that tadq bench does not have (run and recipe do): guided bench of such a model is
    impossible and the advice cannot be followed."""
    result = runner.invoke(app, _bench(folders["cls"], tmp_path / "a", "--guidance-scale", "2"))
    help_text = runner.invoke(app, ["bench", "--help"]).output
    if result.exit_code == 2:
        named = set(re.findall(r"--[a-z][a-z-]+", result.output))
        missing = sorted(flag for flag in named if flag not in help_text)
        assert not missing, f"the refusal names flags tadq bench does not take: {missing}: {_text(result)}"
    guided = runner.invoke(app, _bench(folders["cls"], tmp_path / "b", "--guidance-scale", "2", "--labels", "random",
                                       "--null-class", "4"))
    assert guided.exit_code == 0, guided.output


def test_recipe_sampler_refusal_leaves_no_out_folder(folders, tmp_path):
    """tadq recipe FLOW_FOLDER --sampler ddim is refused (exit 2, names flow-euler) but leaves --out behind
    (tadq_output.json, cache/candidates/); its other refusals, and tadq run's/bench's, leave no folder."""
    _refused(runner.invoke(app, _recipe(folders["flow"], tmp_path / "ddim", "--sampler", "ddim")), "flow-euler")
    assert not (tmp_path / "ddim").exists(), sorted(str(p) for p in (tmp_path / "ddim").rglob("*"))


@pytest.mark.parametrize("command", ["run", "recipe"])
def test_labels_are_refused_for_a_text_to_image_folder(folders, tmp_path, command):
    """--labels/--null-class on a Stable Diffusion folder were silently ignored (exit 0, a prompt-conditioned
    report), while an unconditional folder refuses them by name."""
    prompts = ("--calib-prompts", str(folders["calib"]), "--eval-prompts", str(folders["eval"]))
    extra = (*prompts, "--labels", "null", "--null-class", "3")
    args = _run(folders["sd"], tmp_path / "out", *extra) if command == "run" else _recipe(
        folders["sd"], tmp_path / "out", *extra)
    _refused(runner.invoke(app, args), "label")
    assert not (tmp_path / "out").exists()


def test_analyze_does_not_measure_under_another_schedule_than_the_artefact_s(folders, tmp_path):
    """tadq analyze samples with --fp-model's scheduler, not the one saved in the artefact (tadq evaluate uses the
    artefact's): an FP folder whose scheduler differs (beta_end 0.02 -> 0.05, same weights and config) is accepted
    and the artefact is measured under a schedule it was never calibrated for (final MSE ~4x). It should refuse
    the differing scheduler or use the artefact's own."""
    artefact = _quantize(folders["rgb16"], tmp_path / "q")
    other = _copy(folders["rgb16"], tmp_path / "fp-other-schedule")
    config_file = other / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config["beta_end"] = 0.05
    config_file.write_text(json.dumps(config))
    _ok(runner.invoke(app, _analyze(artefact, folders["rgb16"], tmp_path / "own")))
    result = runner.invoke(app, _analyze(artefact, other, tmp_path / "other"))
    if result.exit_code == 2:
        assert "schedul" in _text(result)
        return
    assert result.exit_code == 0, result.output
    own = json.loads((tmp_path / "own" / "analysis.json").read_text())["measured"]
    measured = json.loads((tmp_path / "other" / "analysis.json").read_text())["measured"]
    assert measured == pytest.approx(own, rel=1e-5), "measured under the FP folder's schedule, not the artefact's"
