"""The sampling flags the commands share (--num-samples, --batch-size, --seed, --guidance-scale, --chunk-size):
a bad value is refused in one line naming the flag (exit code 2), before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import tadq.experiments.workload
import tadq.models
from tadq.cli.app import app

runner = CliRunner()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail any attempt to read a model's weights: the refusal must come before them."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was refused")

    monkeypatch.setattr(tadq.models, "load_pipeline_parts", loaded)
    # a module binding the name at import (the harness's workload) would otherwise keep this stand-in for good when
    # a command first imports it here: every later test of the process then "loaded the model" (test order leak)
    monkeypatch.setattr(tadq.experiments.workload, "load_pipeline_parts", loaded)


def _refused(result, *needles: str) -> None:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, text


@pytest.mark.parametrize("extra, needles", [
    (("--num-samples", "0"), ("--num-samples must be >= 1, got 0",)),
    (("--batch-size", "0"), ("--batch-size must be >= 1, got 0",)),
    (("--batch-size", "-3"), ("--batch-size must be >= 1, got -3",)),
    (("--seed", "-1"), ("--seed must be an int in [0, 2**32 - 1], got -1",)),
    (("--seed", str(2**32)), ("--seed must be an int in [0, 2**32 - 1]",)),
    # on an unconditional model nan read "--guidance-scale nan needs an unconditional branch", after loading it
    (("--guidance-scale", "nan"), ("--guidance-scale must be a finite number >= 0", "nan")),
    (("--guidance-scale", "inf"), ("--guidance-scale must be a finite number >= 0", "inf")),
    (("--guidance-scale", "-1"), ("--guidance-scale must be a finite number >= 0", "-1")),
])
def test_sample_refuses_a_bad_sampling_flag_by_name_before_loading(tmp_path, tiny_model_dir, no_model_loads, extra,
                                                                   needles):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", str(tiny_model_dir), "--num-samples", "2", "--batch-size", "2",
                                 "--steps", "2", "--out", str(out), *extra])
    _refused(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("extra, needles", [
    (("--batch-size", "0"), ("--batch-size must be >= 1, got 0",)),
    (("--seed", "-1"), ("--seed must be an int in [0, 2**32 - 1], got -1",)),
    (("--seed", str(2**32)), ("--seed must be an int in [0, 2**32 - 1]",)),
    (("--chunk-size", "-1"), ("--chunk-size must be >= 0 (0: the batch size), got -1",)),
    (("--num-samples", "0", "--no-metrics"), ("--num-samples must be >= 1, got 0",)),
])
def test_sample_sharded_refuses_a_bad_sampling_flag_by_name_before_loading(tmp_path, tiny_model_dir, no_model_loads,
                                                                           extra, needles):
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample-sharded", str(tiny_model_dir), "--num-samples", "2", "--batch-size", "2",
                                 "--steps", "2", "--device", "cpu", "--out-dir", str(out), *extra])
    _refused(result, *needles)
    assert not out.exists()


@pytest.mark.parametrize("seed", ["-1", str(2**64)])
def test_quantize_refuses_a_seed_outside_the_range_every_command_takes(tmp_path, tiny_model_dir, no_model_loads,
                                                                       seed):
    # -1 went to torch.manual_seed as is (every other --seed refuses it); 2**64 read "Overflow when unpacking long"
    out = tmp_path / "artefact"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--preset", "W8A8", "--method", "naive",
                                 "--steps", "2", "--calib-trajectories", "2", "--out", str(out),
                                 "--cache-dir", str(tmp_path / "cache"), "--seed", seed])
    _refused(result, f"--seed must be an int in [0, 2**32 - 1], got {seed}")
    assert not out.exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-1"])
def test_recipe_refuses_a_bad_guidance_scale_by_name_before_loading(tmp_path, tiny_model_dir, no_model_loads, scale):
    # it read "guidance_scale=nan needs a conditional model" after the model was loaded
    out = tmp_path / "search"
    result = runner.invoke(app, ["recipe", str(tiny_model_dir), "--budget-bits", "W8A8", "--steps", "2",
                                 "--calib-trajectories", "2", "--batch-size", "2", "--out", str(out),
                                 "--guidance-scale", scale])
    _refused(result, "--guidance-scale must be a finite number >= 0", scale)
    assert not Path(out).exists()


def _steps_command(command: str, model: Path, tmp_path: Path) -> list[str]:
    out = str(tmp_path / "out")
    return {
        "quantize": ["quantize", str(model), "--preset", "W8A8", "--method", "naive", "--calib-trajectories", "2",
                     "--out", out, "--cache-dir", str(tmp_path / "cache")],
        "sample": ["sample", str(model), "--num-samples", "2", "--batch-size", "2", "--out", f"{out}.png"],
        "sample-sharded": ["sample-sharded", str(model), "--num-samples", "2", "--batch-size", "2", "--device", "cpu",
                           "--out-dir", out],
        "run": ["run", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--num-samples", "2",
                "--calib-trajectories", "2", "--batch-size", "2", "--out", out, "--cache-dir", str(tmp_path / "c")],
        "bench": ["bench", "--model", str(model), "--presets", "W8A8", "--methods", "naive", "--num-samples", "2",
                  "--calib-trajectories", "2", "--batch-size", "2", "--out", out, "--cache-dir", str(tmp_path / "c")],
        "recipe": ["recipe", str(model), "--budget-bits", "W8A8", "--calib-trajectories", "2", "--batch-size", "2",
                   "--out", out],
    }[command]


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "run", "bench", "recipe"])
def test_more_steps_than_training_timesteps_are_refused_by_the_flag_before_loading(tmp_path, tiny_model_dir,
                                                                                   no_model_loads, command):
    """diffusers refused them when the sampling plan was built, after the model was loaded (and calibrated, for
    run and bench), naming ``num_inference_steps``; the schedule's size is in its config."""
    import json

    train = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
    result = runner.invoke(app, [*_steps_command(command, tiny_model_dir, tmp_path), "--steps", str(train + 1)])
    _refused(result, f"--steps {train + 1}", f"trained on {train} timesteps", f"at most {train} steps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("methods", ["qdiffusion", "naive,ptqd", "best"])
def test_run_refuses_a_dtype_a_rows_method_cannot_take_before_any_work(tmp_path, tiny_model_dir, monkeypatch,
                                                                       methods):
    """``tadq run --dtype bfloat16 --methods qdiffusion`` sampled the FP reference and calibrated before the row's
    block reconstruction refused the dtype; ``tadq quantize`` refuses it before loading."""
    import tadq.experiments.run

    def job(*args, **kwargs):
        raise AssertionError("the job started before the dtype was refused")

    monkeypatch.setattr(tadq.experiments.run, "run_main_job", job)
    out = tmp_path / "out"
    result = runner.invoke(app, [*_steps_command("run", tiny_model_dir, tmp_path), "--methods", methods,
                                 "--dtype", "bfloat16"])
    _refused(result, "--dtype bfloat16", "quantize with dtype=float32")
    assert not out.exists()


def test_run_takes_a_dtype_every_row_can_take(tmp_path, tiny_model_dir, monkeypatch):
    import tadq.experiments.run

    started = []
    monkeypatch.setattr(tadq.experiments.run, "run_main_job", lambda config: started.append(config) or {})
    runner.invoke(app, [*_steps_command("run", tiny_model_dir, tmp_path), "--methods", "naive", "--dtype",
                        "bfloat16"])
    assert [config.dtype for config in started] == ["bfloat16"]


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "run", "bench", "recipe"])
def test_a_thread_count_torch_cannot_take_is_a_one_line_refusal(tmp_path, tiny_model_dir, no_model_loads, command):
    # torch.set_num_threads raised "Overflow when unpacking long" out of setup, a traceback with exit code 1
    import torch

    before = torch.get_num_threads()
    threads = str(2**40)
    result = runner.invoke(app, [*_steps_command(command, tiny_model_dir, tmp_path), "--threads", threads])
    _refused(result, f"--threads {threads}", "torch cannot use that many threads")
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("command", ["sample", "sample-sharded", "run", "bench", "evaluate", "analyze"])
def test_more_samples_than_noise_indices_are_refused_in_one_line(tmp_path, tiny_model_dir, no_model_loads, command):
    # 10**20 samples ended sample and evaluate in an OverflowError traceback once the models were loaded
    count = str(10**20)
    if command in ("evaluate", "analyze"):  # refused before the (here absent) artefact is looked at
        args = [command, str(tmp_path / "artefact"), "--out", str(tmp_path / "out")]
    else:
        args = _steps_command(command, tiny_model_dir, tmp_path)
    result = runner.invoke(app, [*args, "--num-samples", count])
    _refused(result, "--num-samples must be at most 2**32", count)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, flag", [("run", "--seed"), ("run", "--calib-seed"), ("bench", "--seed"),
                                           ("bench", "--calib-seed"), ("recipe", "--seed"), ("recipe", "--eval-seed"),
                                           ("quantize", "--calib-seed")])
def test_a_seed_flag_out_of_range_is_named_as_the_flag(tmp_path, tiny_model_dir, no_model_loads, command, flag):
    # run's --seed -1 read "eval_seed must be ...", recipe's "CalibrationConfig.seed must be ..."
    result = runner.invoke(app, [*_steps_command(command, tiny_model_dir, tmp_path), flag, "-1"])
    _refused(result, f"{flag} must be an int in [0, 2**32 - 1], got -1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "run", "recipe"])
def test_sampler_names_are_taken_in_any_case_by_every_command(tmp_path, tiny_model_dir, no_model_loads, command):
    """``tadq recipe --sampler DDIM`` searched with ddim while sample, quantize and run refused ``DDIM``
    ("SamplerConfig.kind='DDIM' is not supported"); every name flag (--methods, --preset, --fp-layers, bench's
    --samplers) takes any case, and now --sampler does too. Each command builds its sampler before it checks
    --steps against the schedule, so the --steps refusal shows the sampler was taken."""
    import json

    train = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
    result = runner.invoke(app, [*_steps_command(command, tiny_model_dir, tmp_path), "--steps", str(train + 1),
                                 "--sampler", " DDIM "])
    _refused(result, f"--steps {train + 1}", f"trained on {train} timesteps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "run", "recipe", "evaluate", "analyze"])
def test_an_unknown_sampler_is_refused_by_the_flag_with_the_choices(tmp_path, tiny_model_dir, no_model_loads,
                                                                    command):
    from tadq.sampling import SAMPLER_KINDS

    if command in ("evaluate", "analyze"):
        args = [command, str(tmp_path / "artefact"), "--out", str(tmp_path / "out")]
    else:
        args = [*_steps_command(command, tiny_model_dir, tmp_path), "--steps", "2"]
    result = runner.invoke(app, [*args, "--sampler", "dim"])
    _refused(result, "--sampler", "'dim' is not a sampler", ", ".join(SAMPLER_KINDS))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("extra, needle", [
    (("--num-samples", "1"), "--num-samples must be >= 2, got 1"),
    (("--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (("--seed", "7", "--calib-seed", "7"), "--calib-seed must differ from --seed"),
    (("--num-samples", "2", "--eval-prompts", "PROMPTS"), "--num-samples 2 for 3 evaluation prompts"),
])
def test_run_and_bench_name_the_flags_not_the_config_fields(tmp_path, tiny_model_dir, no_model_loads, command,
                                                            extra, needle):
    """``tadq run --num-samples 1`` read "num_samples must be >= 2", ``--seed 7 --calib-seed 7`` "calibration.seed
    must differ from eval_seed": RunConfig's field names, not the flags typed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    extra = [str(prompts) if word == "PROMPTS" else word for word in extra]
    result = runner.invoke(app, [*_steps_command(command, tiny_model_dir, tmp_path), *extra])
    _refused(result, needle)
    text = " ".join(result.output.split())
    assert "num_samples" not in text and "batch_size" not in text and "eval_seed" not in text, text
    assert not (tmp_path / "out").exists()


def _lock_out(out: Path, pid: int) -> Path:
    import json

    from tadq.fsguard import lock_path
    from tadq.utils import _host_tag

    lock = lock_path(out)
    lock.write_text(json.dumps({"pid": pid, "host": _host_tag(), "token": "theirs", "since": 0}))
    return lock


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "run", "bench", "recipe"])
def test_an_out_folder_another_live_command_writes_is_refused_before_any_work(tmp_path, tiny_model_dir,
                                                                              no_model_loads, command):
    """Two commands writing one --out interleaved their files (cells, chunks, reports): a folder lock now, held
    by the test's own (live) pid here."""
    import os

    out = tmp_path / ("out.png" if command == "sample" else "out")
    lock = _lock_out(out, os.getpid())
    before = lock.read_bytes()
    result = runner.invoke(app, _steps_command(command, tiny_model_dir, tmp_path))
    flag = "--out-dir" if command == "sample-sharded" else "--out"
    _refused(result, f"{flag} {out} is being written by another tadq process (pid {os.getpid()},", f"delete {lock}")
    assert not out.exists() and lock.read_bytes() == before


def test_a_lock_left_by_an_ended_command_is_taken_over(tmp_path, tiny_model_dir, monkeypatch):
    import os
    import subprocess
    import sys

    import tadq.experiments.run

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    lock = _lock_out(tmp_path / "out", child.pid)
    started = []
    monkeypatch.setattr(tadq.experiments.run, "run_main_job", lambda config: started.append(lock.read_text()) or {})
    runner.invoke(app, _steps_command("run", tiny_model_dir, tmp_path))
    assert len(started) == 1 and f'"pid": {os.getpid()}' in started[0]  # held by this run while it worked
    assert not lock.exists()  # and released


@pytest.mark.parametrize("command", ["quantize", "sample", "sample-sharded", "evaluate"])
def test_zero_steps_are_refused_by_the_flag_not_the_config_field(tmp_path, tiny_model_dir, no_model_loads, command):
    """``--steps 0`` read "SamplerConfig.num_steps must be a positive int", a name the command line does not have."""
    if command == "evaluate":
        args = [command, str(tiny_model_dir), "--out", str(tmp_path / "out")]
    else:
        args = _steps_command(command, tiny_model_dir, tmp_path)
    result = runner.invoke(app, [*args, "--steps", "0"])
    _refused(result, "--steps must be >= 1, got 0")
    assert "SamplerConfig" not in result.output


def test_quantize_names_the_calibration_trajectories_flag(tmp_path, tiny_model_dir, no_model_loads):
    result = runner.invoke(app, [*_steps_command("quantize", tiny_model_dir, tmp_path), "--calib-trajectories", "0"])
    _refused(result, "--calib-trajectories must be >= 1, got 0")


@pytest.fixture
def no_artefact_loads(monkeypatch):
    import tadq.io

    def loaded(*args, **kwargs):
        raise AssertionError("the artefact was loaded before the bad flag was refused")

    monkeypatch.setattr(tadq.io, "load_quantized", loaded)


@pytest.mark.parametrize("extra, needles", [
    # a name that is no feature space: "a feature extractor file needs --reference-images", after both models loaded
    (("--features", "digit"), ("--features digit is neither one of auto, digits, photos, none nor an existing file",)),
    (("--features", "{tmp}/f.pt"), ("--features", "f.pt", "needs --reference-images")),
    (("--features", "{tmp}/f.pt", "--reference-images", "{tmp}/real.safetensors"),
     ("--reference-images", "real.safetensors", "does not exist")),
    (("--features", "none", "--reference-images", "{tmp}/real.safetensors"), ("would be ignored",)),
    (("--inception-weights", "{tmp}/missing.pt"), ("missing.pt does not exist",)),
    # a folder with no model was named only once the artefact had been loaded
    (("--reference", "{tmp}/empty"), ("empty is not a diffusers model folder",)),
])
def test_evaluate_refuses_its_metric_inputs_before_loading_either_model(tmp_path, tiny_model_dir, no_model_loads,
                                                                        no_artefact_loads, extra, needles):
    (tmp_path / "f.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    result = runner.invoke(app, ["evaluate", str(tiny_model_dir), *(flag.format(tmp=tmp_path) for flag in extra)])
    _refused(result, *needles)
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_tensor_out_file_another_live_command_writes_is_refused_before_any_work(tmp_path, tiny_model_dir,
                                                                                  no_model_loads):
    """``--out`` was locked but ``--tensor-out`` was not: two sampling runs could write the same tensor file."""
    import os

    tensors = tmp_path / "latents.safetensors"
    lock = _lock_out(tensors, os.getpid())
    before = lock.read_bytes()
    result = runner.invoke(app, [*_steps_command("sample", tiny_model_dir, tmp_path), "--tensor-out", str(tensors)])
    _refused(result, f"--tensor-out {tensors} is being written by another tadq process (pid {os.getpid()},",
             f"delete {lock}")
    assert not tensors.exists() and lock.read_bytes() == before
    assert not (tmp_path / "out.png").exists()
