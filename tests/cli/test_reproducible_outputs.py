"""Three CLI promises, checked on tiny models (8x8, a few steps, a few samples):

(a) the same seed gives the same numbers and the same artefact bytes (also in another process);
(b) an interrupted run (real SIGINT / SIGTERM) resumes to the numbers of an uninterrupted one and never leaves a
    half-written output in place of a finished one;
(c) nothing is overwritten or damaged that tadq did not write, and a rerun into a folder tadq wrote with other
    settings never silently mixes old and new results.

Every CLI call that writes, writes under pytest's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.distributed.tiny_runs import save_tiny_model
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.safefiles import load_checked

runner = CliRunner()
SRC = Path(__file__).resolve().parents[2] / "src"
TADQ = [sys.executable, "-m", "tadq.cli.app"]

QUANT = ["--steps", "4", "--calib-trajectories", "8", "--threads", "1"]
RUN = ["--methods", "naive", "--num-samples", "4", "--steps", "3", "--calib-trajectories", "4", "--batch-size", "4",
       "--threads", "1"]
RECIPE = ["--budget-bits", "W8A8", "--presets", "W8A8,W4A8", "--bases", "naive", "--stacks", "none,tac", "--steps",
          "2", "--calib-trajectories", "4", "--fit-trajectories", "4", "--selection-samples", "2", "--heldout", "4",
          "--batch-size", "4", "--threads", "1"]


def _cli(*args) -> object:
    result = runner.invoke(app, [str(a) for a in args])
    return result


def _ok(*args) -> str:
    result = _cli(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("redteam")


@pytest.fixture(scope="module")
def model_dir(root) -> Path:
    return save_tiny_model(root / "model", 0)


@pytest.fixture(scope="module")
def artefact(root, model_dir) -> Path:
    _ok("quantize", model_dir, "--out", root / "artefact", "--cache-dir", root / "cache", *QUANT)
    return root / "artefact"


@pytest.fixture(scope="module")
def run_folder(root, model_dir) -> Path:
    """A finished two-preset ``tadq run`` report folder (tests copy it before changing it)."""
    _ok("run", "--model", model_dir, "--presets", "W8A8,W4A8", *RUN, "--out", root / "run",
        "--cache-dir", root / "cache")
    return root / "run"


# ---------------------------------------------------------------------------------------------------------------
# (c) output ownership


@pytest.mark.parametrize("command", ["run", "recipe"])
def test_run_or_recipe_pointed_at_an_artefact_leaves_it_loadable(command, artefact, model_dir, tmp_path):
    """`tadq run --out ARTEFACT` / `tadq recipe --out ARTEFACT` were accepted (the folder carries tadq's marker) and
    rewrote the artefact's tadq_output.json with another "kind": the artefact then fails its own manifest, and
    `tadq verify` / `tadq sample` / `tadq.load` refuse it. They should refuse the folder (another kind of tadq
    output) or leave every file the manifest lists untouched."""
    target = tmp_path / "artefact"
    shutil.copytree(artefact, target)
    assert _cli("verify", target).exit_code == 0
    if command == "run":
        _cli("run", "--model", model_dir, "--presets", "W8A8", *RUN, "--out", target, "--cache-dir",
             tmp_path / "cache")
    else:
        _cli("recipe", model_dir, *RECIPE, "--out", target)
    verified = _cli("verify", target)
    assert verified.exit_code == 0, f"tadq {command} --out ARTEFACT damaged the artefact: {verified.output}"


def test_quantize_overwrite_never_deletes_a_users_file_in_a_run_folder(run_folder, model_dir, tmp_path):
    """--overwrite is documented as "Replace an existing tadq artefact"; a `tadq run` report folder is no artefact,
    and a user's notes put into it are not tadq's. It replaced the whole folder (notes, cells, base models)."""
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    (folder / "notes.txt").write_text("my analysis of the run")
    _cli("quantize", model_dir, "--out", folder, "--overwrite", "--cache-dir", tmp_path / "cache", *QUANT)
    assert (folder / "notes.txt").is_file(), "tadq quantize --overwrite deleted a file tadq did not write"
    assert (folder / "notes.txt").read_text() == "my analysis of the run"


def test_verify_accepts_the_base_models_that_tadq_run_saved(run_folder):
    """`tadq run` saves its base models as artefacts (docs/results/digits.md: `tadq analyze
    runs/main-full/models/...`), then adds tadq_run_timing.json after the manifest: `tadq verify` called tadq's own
    artefact damaged."""
    models = [p for p in sorted((run_folder / "models").iterdir()) if p.is_dir()]
    assert models
    for folder in models:
        result = _cli("verify", folder)
        assert result.exit_code == 0, result.output


def test_a_base_model_timing_left_inside_by_an_older_tadq_moves_beside_it(run_folder, model_dir, root, tmp_path):
    """Base models saved before the fix hold tadq_run_timing.json: the next run that loads one moves it out (its
    recorded quantize time kept), after which the artefact verifies."""
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    models = sorted(p for p in (run / "models").iterdir() if p.is_dir())
    recorded = {}
    for folder in models:  # as an older tadq left them
        timing = run / "models" / f"timing-{folder.name}.json"
        recorded[folder.name] = json.loads(timing.read_text())["quantize_s"]
        timing.rename(folder / "tadq_run_timing.json")
        assert _cli("verify", folder).exit_code != 0
    shutil.rmtree(run / "cells")  # the cells are rebuilt from the saved base models
    _ok("run", "--model", model_dir, "--presets", "W8A8,W4A8", *RUN, "--out", run, "--cache-dir", root / "cache")
    for folder in models:
        assert not (folder / "tadq_run_timing.json").exists()
        moved = json.loads((run / "models" / f"timing-{folder.name}.json").read_text())["quantize_s"]
        assert moved == recorded[folder.name]  # moved, not re-measured (the base model was loaded, not rebuilt)
        assert _cli("verify", folder).exit_code == 0


def test_quantize_refuses_a_cache_dir_inside_the_input_model(model_dir, tmp_path):
    """run and bench refuse a --cache-dir in the input model (tests/cli/test_harness_commands_input.py); quantize
    wrote its calibration cache into the model folder it reads."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = sorted(str(p.relative_to(model)) for p in model.rglob("*"))
    result = _cli("quantize", model, "--out", tmp_path / "q", "--cache-dir", model, *QUANT)
    after = sorted(str(p.relative_to(model)) for p in model.rglob("*"))
    assert after == before, f"quantize wrote into the input model folder: {sorted(set(after) - set(before))}"
    assert result.exit_code == 2, result.output


def test_quantize_with_the_cache_inside_out_fails_before_any_work_or_succeeds(model_dir, tmp_path):
    """--cache-dir OUT/cache: the cache created --out first, and after the whole quantization the save refused
    --out as a folder tadq did not write (the work was lost, and a foreign-looking folder stays behind)."""
    out = tmp_path / "q"
    result = _cli("quantize", model_dir, "--out", out, "--cache-dir", out / "cache", *QUANT)
    if result.exit_code == 0:
        import tadq

        tadq.load(out)  # it saved a loadable artefact: fine too
    else:
        assert result.exit_code == 2 and not out.exists(), \
            f"refused only after quantizing, leaving {sorted(p.name for p in out.iterdir())}: {result.output}"


# ---------------------------------------------------------------------------------------------------------------
# (c) reruns into a folder tadq wrote with other settings: no silent mix


def test_run_rerun_with_fewer_presets_leaves_no_stale_per_preset_figure(run_folder, model_dir, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder)
    _ok("run", "--model", model_dir, "--presets", "W8A8", *RUN, "--out", folder, "--cache-dir", tmp_path / "cache")
    bits = {row["bits"] for row in json.loads((folder / "results.json").read_text())["rows"]}
    figures = {p.name for p in folder.glob("per_step_error_*.png")}
    stale = sorted(name for name in figures if name[len("per_step_error_"):-len(".png")] not in bits)
    assert not stale, f"figures of rows that are not in this report: {stale} (rows: {sorted(bits)})"


def test_text_to_image_sample_rerun_with_fewer_samples_leaves_no_stale_images(tmp_path):
    from tests.pipelines.builders import build_sd

    sd = build_sd(tmp_path / "sd")
    out = tmp_path / "images"
    base = ["sample", sd, "--steps", "2", "--out", out, "--threads", "1"]
    _ok(*base, "--prompt", "a cat", "--num-samples", "3")
    _ok(*base, "--prompt", "a dog", "--num-samples", "1")
    listed = set(json.loads((out / "prompts.json").read_text())["samples"])
    images = {p.name for p in out.glob("sample_*.png")}
    assert images == listed, f"images of the earlier run left beside this one: {sorted(images - listed)}"


def test_sample_sharded_rerun_with_more_samples_leaves_no_stale_assembled_files(model_dir, tmp_path):
    """A rerun with a larger N is supported (chunks reused); with --no-metrics/--no-assemble it left the first run's
    samples.safetensors (4 images) and metrics.json (num_samples 4) beside a manifest saying 6, complete."""
    out = tmp_path / "sharded"
    base = ["sample-sharded", model_dir, "--steps", "3", "--batch-size", "2", "--seed", "7", "--threads", "1",
            "--device", "cpu", "--out-dir", out]
    _ok(*base, "--num-samples", "4")
    _ok(*base, "--num-samples", "6", "--no-metrics", "--no-assemble")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["complete"]
    if (out / "samples.safetensors").exists():
        images = load_checked(out / "samples.safetensors", "samples")[0]["images"]
        assert images.shape[0] == 6, f"samples.safetensors holds {images.shape[0]} images of a 6-sample run"
    if (out / "metrics.json").exists():
        counted = json.loads((out / "metrics.json").read_text())["metrics"]["num_samples"]
        assert counted == 6, f"metrics.json reports {counted} samples of a 6-sample run"


# ---------------------------------------------------------------------------------------------------------------
# (b) interruption


def test_interrupted_sample_keeps_the_previous_png(artefact, tmp_path, monkeypatch):
    """README: reports "go through a temp file and a rename". `tadq sample --out` saves the grid with savefig
    straight onto the path, so an interrupt while writing destroys the finished PNG of the previous run."""
    import matplotlib.figure

    out = tmp_path / "s.png"
    base = ["sample", artefact, "--num-samples", "4", "--threads", "1", "--out", out]
    _ok(*base, "--seed", "1")
    before = out.read_bytes()
    original = matplotlib.figure.Figure.savefig

    def interrupted_savefig(self, fname, *args, **kwargs):
        original(self, fname, *args, **kwargs)
        if isinstance(fname, (str, os.PathLike)):
            os.truncate(fname, 64)  # the process dies while the bytes are being written
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted_savefig)
    try:
        runner.invoke(app, [str(a) for a in [*base, "--seed", "2"]])
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert out.read_bytes() == before, "an interrupted `tadq sample` left a truncated PNG in place of the finished one"


def test_interrupt_while_replacing_an_artefact_never_leaves_out_without_one(artefact, tmp_path, monkeypatch):
    """save_quantized(overwrite=True) renames the old artefact aside, then the new one into place; an interrupt
    between the two renames (KeyboardInterrupt: SIGINT) runs the cleanup, which deletes the new staging folder and
    never puts the old one back: --out is gone, the old artefact sits in a hidden .NAME.old-* folder."""
    import tadq
    from tadq.io import save_quantized

    target = tmp_path / "q"
    shutil.copytree(artefact, target)
    qmodel, scheduler = tadq.load(target)
    real_replace = os.replace
    interrupted = []

    def replace(src, dst):
        if Path(dst) == target and not interrupted:  # one signal, just before the new folder is renamed into place
            interrupted.append(src)
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(qmodel, target, scheduler, overwrite=True)
    monkeypatch.undo()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert target.is_dir(), f"--out no longer exists after an interrupted overwrite (left: {hidden})"
    assert _cli("verify", target).exit_code == 0


# ≈ 20 s each on a 2-core AVX2 CPU: both `make test-slow`; the default suite resumes an interrupted run in process
# (tests/experiments/test_run.py) and unwinds a real SIGTERM (tests/cli/test_termination_signals.py)
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_killed_by_a_real_signal_resumes_to_the_uninterrupted_numbers(sig, model_dir, tmp_path):
    args = ["run", "--model", str(model_dir), "--presets", "W8A8,W4A8", "--methods", "naive", "--num-samples", "32",
            "--steps", "20", "--calib-trajectories", "4", "--batch-size", "32", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache")]
    # the signal's default disposition in the child (a job started from a non-interactive shell ignores SIGINT,
    # and an ignored signal is inherited across exec). After the FP cell less than a second of work is left, which a
    # loaded machine can finish before the polling parent sends the signal: then the attempt is repeated in a fresh
    # folder (a run that ignored or swallowed the signal would finish every time and fail the test)
    for attempt in range(3):
        out = tmp_path / f"killed-{attempt}"
        process = subprocess.Popen([*TADQ, *args, "--out", str(out)], env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
        deadline = time.time() + 90
        while time.time() < deadline and process.poll() is None:
            if len(list((out / "cells").glob("*.safetensors")) if (out / "cells").is_dir() else []) >= 1:
                break
            time.sleep(0.01)
        process.send_signal(sig)
        process.wait(timeout=60)
        if process.returncode != 0:
            break
    assert process.returncode != 0, "the run finished before the signal in 3 attempts"
    assert not (out / "results.json").exists()
    _ok(*args, "--out", out)  # the rerun resumes
    _ok(*args, "--out", tmp_path / "clean")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]  # noqa: E731
    resumed = json.loads((out / "results.json").read_text())
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert strip(resumed["rows"]) == strip(clean["rows"])
    assert resumed["per_step_mse"] == clean["per_step_mse"]
    assert (out / "samples.png").read_bytes() == (tmp_path / "clean" / "samples.png").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# (a) determinism


@pytest.mark.slow  # ≈ 16 s; test_reproducibility_settings keeps a fresh-process byte check in the default suite
def test_quantize_with_reconstruction_and_corrections_is_byte_identical_in_another_process(model_dir, tmp_path):
    """The existing check runs two naive quantizations in one process; here Q-Diffusion (split shortcuts, attention)
    with PTQD + TAC + TCEC, once in this process and once in a subprocess with another hash seed."""
    args = ["quantize", str(model_dir), "--preset", "W4A8", "--method", "qdiffusion", "--correct", "ptqd,tac,tcec",
            "--split-shortcut", "--quantize-attention", *QUANT,
            "--set", "calibration.num_steps_kept=2", "--set", "calibration.samples_per_step=4",
            "--set", "calibration.batch_size=8", "--set", "corrections.0.num_samples=8",
            "--set", "corrections.1.num_samples=8", "--set", "corrections.2.num_samples=8",
            "--set", "corrections.2.selection_samples=4"]
    _ok(*args, "--out", tmp_path / "a", "--cache-dir", tmp_path / "cache-a")
    done = subprocess.run([*TADQ, *args, "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "cache-b")],
                          env={**_env(), "PYTHONHASHSEED": "12345"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []


# ≈ 10 s on a 2-core AVX2 CPU (two whole searches): `make test-slow`; the default suite checks an interrupted search
# resumes to the same results (tests/search/test_recipe_search.py)
@pytest.mark.slow
def test_recipe_search_twice_gives_the_same_recipe_artefact_and_scores(model_dir, tmp_path):
    for name in ("one", "two"):
        _ok("recipe", model_dir, *RECIPE, "--out", tmp_path / name)
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "recipe.json").read_bytes() == (two / "recipe.json").read_bytes()
    assert _tree(one / "model") == _tree(two / "model")
    assert (one / "pareto.png").read_bytes() == (two / "pareto.png").read_bytes()

    def scores(folder: Path) -> tuple:
        report = json.loads((folder / "report.json").read_text())
        return report["winner"], report["pareto_front"], [(c["name"], c["status"], c.get("score"), c["bytes"])
                                                           for c in report["candidates"]]

    assert scores(one) == scores(two)


def test_sample_twice_gives_identical_png_and_tensor_bytes(artefact, tmp_path):
    for name in ("a", "b"):
        _ok("sample", artefact, "--num-samples", "4", "--seed", "3", "--sampler", "ddim", "--threads", "1",
            "--out", tmp_path / f"{name}.png", "--tensor-out", tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    images = load_checked(tmp_path / "a.safetensors", "samples")[0]["images"]
    assert images.shape[0] == 4 and torch.isfinite(images).all()
