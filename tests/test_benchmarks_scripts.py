"""Every script in benchmarks/ imports against today's library and parses its flags, and a count below its floor or
an unknown preset is refused by the parser: a refactor that breaks one fails here rather than at the start of a
benchmark run (the GPU scripts included: they must import on a CPU). In-process, one import each; ``parse_args``
never returns into the script, so no model is loaded."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tadq.models
from tadq.config import CalibrationConfig
from tadq.sampling import SamplerConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
HELPERS = {"common", "arguments", "speed_kernels"}  # modules the scripts import; no command line of their own
SCRIPTS = sorted(path.stem for path in BENCHMARKS.glob("*.py") if path.stem not in HELPERS)
AT_LEAST_ONE = ("--samples", "--num-samples", "--steps", "--calls", "--rounds", "--repeats", "--batch",
                "--batch-size", "--trajectories", "--kept", "--per-step", "--probe-inputs", "--sens-samples",
                "--procs", "--calib-trajectories", "--per-class", "--profiled", "--width")
PARSE_ARGS = argparse.ArgumentParser.parse_args


class Parsed(Exception):
    """Raised instead of returning the parsed flags: the test stops the script before it does any work."""


@pytest.fixture
def load(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    original = PARSE_ARGS
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while defined
        spec.loader.exec_module(module)
        return module

    return load


def _main(module, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()


def _help(module, monkeypatch, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, "--help")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_every_script_is_covered():
    shipped = {path.stem for path in BENCHMARKS.glob("*.py")}
    assert HELPERS <= shipped, "a helper module listed here no longer exists"
    assert len(SCRIPTS) >= 30


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_imports_and_prints_its_help(name, load, monkeypatch, capsys):
    module = load(name)
    assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
    # a main() that parses no flags would start its work on --help (minutes of sampling) instead of printing usage
    assert "parse_args(" in inspect.getsource(module.main), f"benchmarks/{name}.py's main() parses no flags"
    assert _help(module, monkeypatch, capsys).startswith("usage:")


@pytest.mark.parametrize("name", SCRIPTS)
def test_counts_below_one_and_unknown_presets_are_refused_while_parsing(name, load, monkeypatch, capsys):
    module = load(name)
    options = _help(module, monkeypatch, capsys).partition("\noptions:\n")[2]  # not the description's mentions
    flags = set(re.findall(r"^ {2}(?:-\w, )?(--[a-z][a-z-]*)", options, re.MULTILINE))
    assert "--help" in flags
    bad = [(flag, value, "must be at least 1") for flag in AT_LEAST_ONE if flag in flags for value in ("0", "-3")]
    bad += [("--threads", "-1", "must be")] if "--threads" in flags else []
    bad += [(flag, "W9A9", "unknown preset") for flag in ("--preset", "--presets") if flag in flags]
    for flag, value, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            _main(module, monkeypatch, flag, value)
        assert exit_info.value.code == 2, f"{name} {flag} {value}"
        assert message in capsys.readouterr().err, f"{name} {flag} {value}"


@pytest.mark.parametrize("flags, message", [(("--budgets", "1000"), "weight_iters:activation_iters"),
                                            (("--budgets", "500:-1"), "weight_iters:activation_iters"),
                                            (("--roundings", "nearest"), "rounding must be"),
                                            (("--loss-reductions", "mean"), "loss_reduction must be"),
                                            (("--fp-layers", "everything"), "unknown fp_layers")])
def test_reconstruction_budget_refuses_a_malformed_list_before_loading_the_model(flags, message, load, monkeypatch,
                                                                                 capsys):
    module = load("reconstruction_budget")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)  # parse for real: the lists come after

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded and calibrated before the flags were checked")

    monkeypatch.setattr(module, "shipped_setup", loaded)
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_flow_without_cuda_is_a_usage_error_not_a_traceback(load, monkeypatch, capsys):
    module = load("gpu_flow")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, "--quick")
    assert exit_info.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_flow_refuses_an_artefact_folder_tadq_did_not_write_instead_of_deleting_it(load, monkeypatch, capsys,
                                                                                      tmp_path):
    module = load("gpu_flow")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    monkeypatch.setattr(module, "resolve_device", lambda device: torch.device("cuda"))  # past the CUDA check
    monkeypatch.setattr(module.shutil, "which", lambda name: f"/usr/bin/{name}")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(tadq.models, "load_pipeline_parts", loaded)
    notes = tmp_path / "out" / "artefact" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("mine")
    recipe = BENCHMARKS.parent / "recipes" / "qdiffusion+tac-W4A8.json"
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, "--quick", "--recipe", str(recipe), "--out", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    assert "artefact folder" in capsys.readouterr().err
    assert notes.read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    for folder in ("digits", "dit"):
        (tmp_path / "gpu-artefacts" / folder).mkdir(parents=True)
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
    assert "== CUDA tests" not in done.stderr  # no step ran


LATE_CHECKS = [  # (script, what loads the model, flags, message): each used to fail only after its FP samples
    ("tac_select", "load_workload", ("--models", "{tmp}/missing", "--out", "{tmp}/o.json"), "no Q-Diffusion base"),
    ("tac_select", "load_workload", ("--models", "{tmp}", "--out", "{tmp}/o.json", "--variants", "tac,nope"),
     "unknown variants"),
    ("svdquant_ablation", "shipped_setup", ("--rows", "naive per-token,nope"), "unknown rows"),
    ("photos_attention_diagnose", "load_workload", ("--rows", "naive,attn-nope"), "unknown row"),
    ("photos_attention_diagnose", "load_workload", ("--rows", "attn:per_nothing",), "softmax_granularity"),
    ("w8a8_diagnose", "load_workload", ("--rows", "naive,fp=everything"), "unknown fp_layers"),
    ("w8a8_diagnose", "load_workload", ("--rows", "act_range=mse:x",), "could not convert"),
    ("w8a8_diagnose", "load_workload", ("--rows", "nope",), "unknown row part"),
    ("guidance_ranges", "load_workload", ("--methods", "naive,qdifusion"), "unknown ['qdifusion']"),  # ran naive
    ("dit_fp_quality", "load_workload", ("--samplers", "ddim@50,nope@20"), "--samplers"),
    ("dit_fp_quality", "load_workload", ("--guidance", "1,x"), "not a number"),
    ("t2i_fp_quality", "load_t2i_pipeline", ("--guidance", "1,x"), "not a number"),  # a ValueError traceback
    ("photos_fp_quality", "load_pipeline_parts", ("--guidance", "1,x", "--out", "{tmp}/o.json"), "not a number"),
    ("recon_diagnose", "load_pipeline_parts", ("--configs", "a:weight_itres=5"), "weight_itres"),
    ("svdquant_mixed_precision", "main_run_setup", ("--sensitivities", "{tmp}/missing.json"), "no such file"),
    ("svdquant_mixed_precision", "main_run_setup", ("--budgets", "0,0.x"), "not a number"),
    ("mixed_precision", "shipped_setup", ("--gammas", "0.99,0.99x"), "not a number"),
    ("selection_check", "main_run_setup", ("--seeds", "1000,1e5"), "not a whole number"),
    # the W4A8 job (no row: SmoothQuant is W8A8 only) was refused only after the whole W8A8 job had run
    ("peers", "run_main_job", ("--methods", "modelopt-smoothquant", "--presets", "W8A8,W4A8", "--out", "{tmp}/o"),
     "has a row at W4A8"),
    # an unknown preset in a row was refused only after the calibration and the FP samples; the others were tracebacks
    ("gptq_target_damp", "load_workload", ("--rows", "W8A8:1e-4,W9A9:1e-4"), "unknown preset"),
    ("gptq_target_damp", "load_workload", ("--rows", "W8A8:abc"), "neither a number nor gptq"),
    ("gptq_target_damp", "load_workload", ("--rows", "W8A8:-1"), "gptq_target_damp must be > 0"),
    ("gptq_target_damp", "load_workload", ("--model", "{tmp}/missing"), "neither a shipped model"),
    ("gptq_target_prior", "load_workload", ("--rows", "z:gptq_target_priorr=zero", "--out", "{tmp}/o.json"),
     "not a ReconstructionConfig field"),
    ("gptq_target_prior", "load_workload", ("--rows", "z:gptq_target_damp=x", "--out", "{tmp}/o.json"),
     "gptq_target_damp='x'"),
    ("gptq_target_prior", "load_workload", ("--rows", "z:gptq_target_prior=nowhere", "--out", "{tmp}/o.json"),
     "gptq_target_prior"),
    ("gptq_target_prior", "load_workload", ("--model", "dti", "--out", "{tmp}/o.json"), "neither a shipped model"),
    ("gptq_target_prior", "load_workload", ("--calibration-seed", "1000", "--out", "{tmp}/o.json"),
     "is the evaluation seed"),
    ("gptq_target_prior", "load_workload", ("--calibration-seed", "-3", "--out", "{tmp}/o.json"), "must be in"),
    ("gptq_target_prior", "load_workload", ("--paired-with", "zer", "--out", "{tmp}/o.json"), "names no row"),
]


@pytest.mark.parametrize("name, loader, flags, message", LATE_CHECKS)
def test_row_and_folder_flags_are_checked_before_the_model_is_loaded(name, loader, flags, message, load, monkeypatch,
                                                                     capsys, tmp_path):
    module = load(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(module, loader, loaded)
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, *(flag.format(tmp=tmp_path) for flag in flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


FOREIGN_OUT = [  # (script, its loader (on the script, or on common for the shared setups), flags, folder written)
    ("svdquant_ablation", "common.load_pipeline_parts", (), "."),  # shipped_setup
    ("selection_check", "common.load_pipeline_parts", (), "."),  # main_run_setup
    ("peers", "run_main_job", ("--reuse-models", ""), "."),
    ("recon_diagnose", "load_pipeline_parts", ("--model", "digits"), "digits"),
    ("speed", "load_workload", ("--presets", "W4A8", "--no-compile"), "."),
]


@pytest.mark.parametrize("name, loader, flags, folder", FOREIGN_OUT)
def test_an_out_folder_tadq_did_not_write_is_refused_before_any_work(name, loader, flags, folder, load, monkeypatch,
                                                                     capsys, tmp_path):
    """Benchmark scripts wrote results.json and their tables into any --out folder, a user's included; they now
    check it as the CLI does (tadq.fsguard), before the model is loaded."""
    module = load(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    owner, _, attribute = loader.rpartition(".")

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(sys.modules[owner] if owner else module, attribute, loaded)
    mine = tmp_path / "mine" / folder
    mine.mkdir(parents=True)
    (mine / "results.json").write_text("[1]")  # a user's file by the name a benchmark writes
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, "--out", str(tmp_path / "mine"), *flags)
    assert exit_info.value.code == 2
    assert "tadq did not write" in capsys.readouterr().err
    assert [path.name for path in mine.iterdir()] == ["results.json"] and (mine / "results.json").read_text() == "[1]"


def test_a_benchmark_fills_its_own_folder_again_and_writes_elsewhere_only_when_forced(load, monkeypatch, tmp_path,
                                                                                      capsys):
    load("peers")  # puts benchmarks/ on sys.path
    from arguments import output_folder

    from tadq.fsguard import is_tadq_output, mark_output

    out = output_folder(tmp_path / "bench")
    assert is_tadq_output(out)
    (out / "results.json").write_text("[]")
    assert output_folder(out) == out  # a rerun replaces its results
    run = tmp_path / "run"
    run.mkdir()
    mark_output(run, "run")
    (run / "notes.txt").write_text("x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    for folder, message in ((run, "tadq 'run' folder"), (foreign, "tadq did not write")):
        with pytest.raises(SystemExit) as exit_info:
            output_folder(folder)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert output_folder(foreign, force_foreign=True) == foreign  # --force-foreign, as the CLI's
    assert (foreign / "notes.txt").read_text() == "x"


REPORT_FILES = [  # (script, what it loads first, flags): the scripts that write one JSON report at --out
    ("dit_fp_quality", "load_workload", ()),
    ("t2i_fp_quality", "load_t2i_pipeline", ()),
    ("tac_select", "load_workload", ("--models", "{tmp}")),
    ("guidance_ranges", "load_workload", ()),
    ("photos_fp_quality", "load_pipeline_parts", ()),
]


class _Loaded(Exception):
    """The model loader was reached: the --out check let the run go on."""


@pytest.mark.parametrize("name, loader, flags", REPORT_FILES)
def test_a_report_file_tadq_did_not_write_is_refused_before_any_work(name, loader, flags, load, monkeypatch, capsys,
                                                                     tmp_path):
    """The scripts wrote their report over whatever --out named (a user's notes, another tool's JSON), after the
    whole run; they now refuse it before loading the model, unless --force-foreign, and replace their own reports."""
    module = load(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    if name == "tac_select":
        monkeypatch.setattr(module, "base_folder", lambda models, preset: models)

    def loaded(*args, **kwargs):
        raise _Loaded

    monkeypatch.setattr(module, loader, loaded)
    out = tmp_path / "report.json"
    mine = '{"my": "numbers"}'
    out.write_text(mine)
    args = [flag.format(tmp=tmp_path) for flag in flags]
    with pytest.raises(SystemExit) as exit_info:
        _main(module, monkeypatch, *args, "--out", str(out))
    assert exit_info.value.code == 2
    assert "tadq did not write" in capsys.readouterr().err and out.read_text() == mine
    with pytest.raises(_Loaded):  # forced: the run goes on (and would replace it)
        _main(module, monkeypatch, *args, "--out", str(out), "--force-foreign")
    module.write_report({"rows": []}, out)  # what the script writes at its end: recognisable as tadq's
    with pytest.raises(_Loaded):
        _main(module, monkeypatch, *args, "--out", str(out))
    for earlier in ('{"command": "python benchmarks/x.py", "rows": []}',):  # written before versions were recorded
        out.write_text(earlier)
        with pytest.raises(_Loaded):
            _main(module, monkeypatch, *args, "--out", str(out))
    (tmp_path / "runs.json").mkdir()
    with pytest.raises(SystemExit) as exit_info:  # a folder where the file goes
        _main(module, monkeypatch, *args, "--out", str(tmp_path / "runs.json"))
    assert exit_info.value.code == 2 and "is a folder" in capsys.readouterr().err


def test_a_benchmark_report_is_replaced_whole_and_carries_tadqs_versions(load, tmp_path, monkeypatch):
    load("peers")  # puts benchmarks/ on sys.path
    from arguments import write_report

    import tadq.utils
    from tadq.fsguard import is_tadq_file

    out = tmp_path / "new" / "report.json"
    write_report({"rows": [1], "selection": [{"final_mse": math.nan}]}, out)
    first = out.read_text()
    assert is_tadq_file(out) and '"tadq"' in first
    # strict JSON: the held-out score of a correction with nothing to choose (NaN) was written as the bare NaN token
    assert json.loads(first, parse_constant=pytest.fail)["selection"] == [{"final_mse": None}]

    def interrupted(text, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(tadq.utils, "write_utf8", interrupted)  # the write into the temp file is cut short
    with pytest.raises(KeyboardInterrupt):
        write_report({"rows": [2]}, out)
    assert out.read_text() == first and [path.name for path in out.parent.iterdir()] == ["report.json"]


@pytest.fixture(scope="module")
def guided_dit_folder(tmp_path_factory):
    """A tiny random ``DiTPipeline`` (class-conditional, latents decoded by its VAE), as tests/experiments builds."""
    from tests.pipelines.builders import build_dit

    return build_dit(tmp_path_factory.mktemp("dit") / "pipe")


GPTQ_TARGET_SCRIPTS = [  # the two GPTQ-target studies, on a guided latent model, each as small as its flags allow
    ("gptq_target_damp", ("--rows", "W8A8:1e-4", "--num-samples", "2")),
    ("gptq_target_prior", ("--rows", "weight:", "--presets", "W8A8", "--trajectory-counts", "2", "--sampler", "ddim",
                           "--steps", "3", "--num-samples", "2", "--out", "{tmp}/o.json")),
]


@pytest.mark.parametrize("name, flags", GPTQ_TARGET_SCRIPTS)
def test_gptq_target_studies_calibrate_and_sample_with_guidance_and_compare_decoded_images(
        name, flags, guided_dit_folder, load, monkeypatch, tmp_path, capsys):
    """``gptq_target_damp.py --model dit`` calibrated without classifier-free guidance, sampled without it and took
    the PSNR of undecoded latents, where its sibling ``gptq_target_prior.py`` (and the docs of both) guide and decode;
    both now go through benchmarks/common.py's calibration, recipe and evaluation helpers."""
    import common

    import tadq.api
    from tadq.experiments.workload import load_workload

    module = load(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    monkeypatch.chdir(tmp_path)  # the calibration cache (.cache/tadq) is relative
    monkeypatch.setattr(module, "load_workload", lambda model: load_workload(model, guidance_scale=2.0))
    # the damp study's probe calibration (64 trajectories × DDIM 50) at the test's size, through the real helper
    monkeypatch.setattr(common, "SamplerConfig", lambda kind, num_steps: SamplerConfig(kind=kind, num_steps=3))
    monkeypatch.setattr(common, "CalibrationConfig", lambda **fields: CalibrationConfig(
        **{**fields, "num_trajectories": 2, "num_steps_kept": 2, "samples_per_step": 2}))
    calibrations, sampled, compared = [], [], []
    real_collect, real_sample, real_psnr = common.collect_calibration_set, tadq.api.sample, module.psnr_per_sample
    spy_collect = lambda *args, **kwargs: calibrations.append(kwargs) or real_collect(*args, **kwargs)  # noqa: E731
    spy_sample = lambda *args, **kwargs: sampled.append(kwargs) or real_sample(*args, **kwargs)  # noqa: E731
    spy_psnr = lambda a, b: compared.append((a.shape, b.shape)) or real_psnr(a, b)  # noqa: E731
    monkeypatch.setattr(common, "collect_calibration_set", spy_collect)
    monkeypatch.setattr(module, "collect_calibration_set", spy_collect, raising=False)
    monkeypatch.setattr(tadq.api, "sample", spy_sample)
    monkeypatch.setattr(module, "psnr_per_sample", spy_psnr)
    _main(module, monkeypatch, "--model", str(guided_dit_folder), *(flag.format(tmp=tmp_path) for flag in flags))
    assert calibrations and all(kwargs.get("guidance_scale") == 2.0 for kwargs in calibrations)
    assert sampled and all(kwargs.get("guidance_scale") == 2.0 for kwargs in sampled)
    assert all(kwargs["conditions"] is not None for kwargs in sampled)
    assert compared == [((2, 3, 8, 8), (2, 3, 8, 8))]  # the VAE's 3×8×8 images, not the 4×8×8 latents
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert math.isfinite(row["psnr"]) and row["units"] >= 1


def test_w8_weight_bias_scores_bias_correction_on_inputs_it_was_not_fitted_on(load):
    """The one-step probe (512 rows, seed 12345) and bias correction's fit (512 rows, seed 7) were two permutations
    of the same 800 calibration inputs and shared about 330 rows; the fit now draws from the probe's complement."""
    module = load("w8_weight_bias")
    held_out, fit_rows = module.probe_and_fit_rows(800)
    assert len(held_out) == 512 and len(set(held_out.tolist())) == 512
    assert held_out.tolist() == torch.randperm(800, generator=torch.Generator().manual_seed(12345))[:512].tolist()
    assert len(fit_rows) == 288 and not set(fit_rows.tolist()) & set(held_out.tolist())
    held_out, fit_rows = module.probe_and_fit_rows(2000)
    assert len(fit_rows) == 512 and not set(fit_rows.tolist()) & set(held_out.tolist())


class _Quantizing(Exception):
    """tadq.quantize was reached: everything before the first quantization ran."""


def test_guidance_ranges_reads_the_prompted_labels_of_its_evaluation_seed(load, monkeypatch, capsys, tmp_path):
    """``workload.expected_labels(num_samples)`` passed the count as the seed and no count: every run died with a
    TypeError after its calibration and FP samples. The shipped text-to-image model at the smallest sizes."""
    import tadq

    module = load("guidance_ranges")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)

    def quantize(*args, **kwargs):
        raise _Quantizing

    monkeypatch.setattr(tadq, "quantize", quantize)
    with pytest.raises(_Quantizing):
        _main(module, monkeypatch, "--presets", "W8A8", "--num-samples", "2", "--steps", "2", "--calib-trajectories",
              "2", "--out", str(tmp_path / "o.json"))
    assert re.search(r"FP: prompt accuracy \d\.\d{3}", capsys.readouterr().out)


def test_gptq_target_prior_calibrates_from_its_seed_and_pairs_rows_on_the_same_noise(
        guided_dit_folder, load, monkeypatch, tmp_path, capsys):
    """``--calibration-seed`` reaches the calibration (the study had one calibration seed, so a difference between
    two priors could not be told from the calibration draw), and each row's ``difference`` is the mean of its
    per-sample PSNR minus the ``zero`` row's on the same evaluation noise, with 1.96 standard errors of it."""
    module = load("gptq_target_prior")
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
    monkeypatch.chdir(tmp_path)
    calibrations = []
    real_collect = module.collect_calibration_set
    monkeypatch.setattr(module, "collect_calibration_set",
                        lambda *args, **kwargs: calibrations.append(args[3]) or real_collect(*args, **kwargs))
    _main(module, monkeypatch, "--model", str(guided_dit_folder), "--rows", "zero:gptq_target_prior=zero;weight:",
          "--presets", "W4A8", "--trajectory-counts", "2", "--sampler", "ddim", "--steps", "3", "--num-samples", "4",
          "--calibration-seed", "5", "--out", "o.json")
    assert [config.seed for config in calibrations] == [5]
    zero, weight = json.loads((tmp_path / "o.json").read_text())["rows"]
    assert zero["calibration_seed"] == weight["calibration_seed"] == 5
    assert "difference" not in zero and weight["paired_with"] == "zero"
    gap = torch.tensor(weight["psnr_per_sample"], dtype=torch.float64) - torch.tensor(zero["psnr_per_sample"],
                                                                                     dtype=torch.float64)
    assert len(gap) == 4 and gap.abs().max() > 0  # the two priors round differently on this model
    # the per-sample scores are written to 3 decimals (each gap off by ≤ 1e-3, so their mean too, and their standard
    # deviation by ≤ 1e-3·√4/√3) and the difference and interval to 3 decimals (5e-4 more)
    assert weight["difference"] == pytest.approx(float(gap.mean()), abs=1e-3 + 5e-4)
    assert weight["interval"] == pytest.approx(1.96 * float(gap.std()) / 2, abs=1.96 / 2 * 1e-3 * 2 / 3**0.5 + 5e-4)


def test_evaluation_seeds_equal_to_the_calibration_seed_are_refused(load, monkeypatch, capsys, tmp_path):
    """tadq run refuses --seed equal to --calib-seed; the benchmarks accepted it and scored the quantized model on
    the noise (and labels) it was calibrated on. Refused while parsing, before any model is loaded."""
    out = str(tmp_path / "o.json")
    cases = (("guidance_ranges", ("--seed", "3", "--calib-seed", "3", "--out", out)),
             ("w8a8_diagnose", ("--eval-seed", "0")), ("photos_attention_diagnose", ("--eval-seed", "0")),
             ("photos_attention_check", ("--eval-seed", "0")), ("tac_select", ("--seed", "0", "--models", out)),
             ("perf", ("--seed", "0")), ("recon_diagnose", ("--seed", "0")))
    for name, flags in cases:
        module = load(name)
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", PARSE_ARGS)
        with pytest.raises(SystemExit) as exit_info:
            _main(module, monkeypatch, *flags)
        assert exit_info.value.code == 2, name
        assert "calibration seed" in capsys.readouterr().err, name
