"""``tadq bench``: the methods × presets × samplers matrix on one model, reported as HTML, Markdown and JSON."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import (
    CacheDir,
    CalibPrompts,
    CalibTrajectories,
    DistilledGuidance,
    EvalPrompts,
    ForceForeign,
    GuidanceScale,
    Labels,
    NegativePrompt,
    NullClass,
    check_sampling_flags,
    check_seed_flags,
    check_steps_fit,
    console,
    fail_cleanly,
    hold_output,
    read_prompt_file,
    setup,
    torch_setup,
)
from tadq.cli.sample import Device, Dtype, Threads, Verbose
from tadq.fp_layers import DEFAULT_FP_LAYERS

__all__ = ["bench_command"]


def _split(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _reconstruction(iters: int | None, activation_iters: int | None, batch_size: int | None,
                    rounding: str | None = None, gptq_target_damp: float | None = None,
                    gptq_target_prior: str | None = None):
    from tadq.config import ReconstructionConfig

    changes = {name: value for name, value in (("weight_iters", iters), ("activation_iters", activation_iters),
                                               ("batch_size", batch_size), ("rounding", rounding),
                                               ("gptq_target_damp", gptq_target_damp),
                                               ("gptq_target_prior", gptq_target_prior))
               if value is not None}
    return ReconstructionConfig(**changes)


def bench_command(
    model: Annotated[Path | None, typer.Option(help="Local diffusers model folder (default: the shipped DDPM).")
                     ] = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated rows (default: the matrix's).")
                       ] = None,
    presets: Annotated[str | None, typer.Option(
        help="Comma-separated presets: W8A8, W4A8, W4A4, W4A16 (or W8A16, W8A8-WSYM, W4A8-FP8, W8A8-FP8; any with "
        "-G<n>: weights in blocks of n).")] = None,
    samplers: Annotated[str | None, typer.Option(
        help="Comma-separated samplers: ddim-eta0, ddim-eta1, ddim-eta<η>, ddpm, euler, euler-ancestral, "
             "dpmsolver++ (2M), dpmsolver++1, flow-euler, flow-euler-shift<s>, flow-euler-uniform (FluxPipeline's "
             "σ grid); @N sets steps (ddim-eta0@20). Default: the matrix's DDIM samplers; flow-euler for a "
             "flow-matching model (SD3, Flux).")
                        ] = None,
    steps: Annotated[int, typer.Option(help="Sampler steps (for samplers without @N).")] = 50,
    num_samples: Annotated[int | None, typer.Option(help="Samples per row (default 1000; --quick 256).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="The quick matrix: naive, qdiffusion, ptqd, tac, tcec × "
                                                         "W8A8, W4A8 × ddim-eta0, 256 samples.")] = False,
    seed: Annotated[int, typer.Option(help="Evaluation noise seed (FP and every row).")] = 1000,
    calib_seed: Annotated[int, typer.Option(help="Calibration noise seed (must differ from --seed).")] = 0,
    calib_trajectories: CalibTrajectories = 256,
    recon_iters: Annotated[int | None, typer.Option(help="AdaRound iterations per unit (default: the config's).")
                           ] = None,
    recon_activation_iters: Annotated[int | None, typer.Option(help="Activation-step iterations per unit.")] = None,
    recon_batch_size: Annotated[int | None, typer.Option(help="Reconstruction batch size.")] = None,
    recon_rounding: Annotated[str | None, typer.Option(
        help="Weight rounding of block reconstruction: gptq (the default), adaround or gptq_adaround.")] = None,
    recon_gptq_target_damp: Annotated[float | None, typer.Option(
        help="Ridge damping of GPTQ's least-squares FP-output target (default: the config's; 0.01 reproduces "
             "tables measured before 2026-12-03).")] = None,
    recon_gptq_target_prior: Annotated[str | None, typer.Option(
        help="What the ridge of GPTQ's FP-output target shrinks toward: weight (the default) or zero (tadq before "
             "2026-12-07).")] = None,
    fp_layers: Annotated[str, typer.Option(
        help="Layers every row keeps in floating point: first_last (the default), none or first_last_time.")
    ] = DEFAULT_FP_LAYERS,
    batch_size: Annotated[int, typer.Option(help="Sampling batch size.")] = 250,
    out: Annotated[Path, typer.Option(help="Bench folder (report.html, report.md, report.json).")
                   ] = Path("runs/bench"),
    models_dir: Annotated[Path | None, typer.Option(
        help="Folder of saved base models to reuse and fill (default <out>/models; runs/main/models reuses tadq "
             "run's).")] = None,
    cache_dir: CacheDir = Path(".cache/tadq"),
    guidance_scale: GuidanceScale = None,
    calib_prompts: CalibPrompts = None,
    eval_prompts: EvalPrompts = None,
    negative_prompt: NegativePrompt = "",
    distilled_guidance: DistilledGuidance = None,
    labels: Labels = None,
    null_class: NullClass = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    verbose: Verbose = False,
) -> None:
    """Every (method, preset, sampler) from the same noise as FP; unsupported pairs become rows saying why."""
    from tadq.experiments.run_checks import BENCH_SAMPLES, RUN_FLAGS, check_method_names, check_run_numbers, known_rows
    from tadq.fsguard import check_output_dir, check_writable_dir, is_tadq_output
    from tadq.zoo.paths import resolve_model_path, shipped_model_path

    setup(verbose, threads)
    with fail_cleanly():  # first the checks that need no torch
        check_seed_flags(seed=seed, calib_seed=calib_seed)
        if models_dir is not None and models_dir.resolve() == out.resolve():  # BenchConfig's check names its field
            raise ValueError(f"--models-dir {models_dir} is the bench folder itself (--out {out}); leave it out "
                             f"(the default, {out / 'models'}) or give a folder of its own")
        evaluation_prompts = read_prompt_file(eval_prompts, "--eval-prompts")
        samples = num_samples if num_samples is not None else BENCH_SAMPLES["quick" if quick else "default"]
        # each sampler's RunConfig checks them again, named as its fields
        check_run_numbers(num_samples=samples, batch_size=batch_size, eval_seed=seed, calibration_seed=calib_seed,
                          evaluation_prompts=evaluation_prompts, names=RUN_FLAGS)
        check_sampling_flags(num_samples=samples)  # the upper bound
        if methods is not None:  # BenchConfig checks them again
            check_method_names(tuple(m.lower() for m in _split(methods)), known_rows())
        torch_setup(threads, device, dtype)
        from tadq.config import CalibrationConfig
        from tadq.experiments.bench import BenchConfig, matrix, parse_sampler, run_bench
        from tadq.models import load_scheduler
        from tadq.sampling import SamplerConfig, command_sampler_kind

        fields = matrix("quick" if quick else "default")
        fields["num_samples"] = samples
        source = model if model is not None else shipped_model_path()
        check_output_dir(out, kind="bench", resume=True, force_foreign=force_foreign, inputs=[source])
        hold_output(out)
        check_writable_dir(cache_dir, "--cache-dir", inputs=[source], force_foreign=force_foreign)
        if models_dir is not None:
            # base models are saved into it and reused from it: tadq's own (marked, or <run>/models of a folder tadq
            # marked, as runs/main/models), never the input model's folder or a foreign one
            check_output_dir(models_dir, kind="base-models", what="--models-dir", resume=True, inputs=[source],
                             force_foreign=force_foreign or is_tadq_output(models_dir.parent))
        if samplers is not None:
            fields["samplers"] = tuple(parse_sampler(name, steps) for name in _split(samplers))
        elif command_sampler_kind(scheduler := load_scheduler(resolve_model_path(model and str(model)))) == "ddim":
            fields["samplers"] = tuple(dataclasses.replace(s, num_steps=steps) for s in fields["samplers"])
        else:  # the matrix's DDIM samplers cannot drive a flow-matching model
            fields["samplers"] = (SamplerConfig(kind=command_sampler_kind(scheduler), num_steps=steps),)
        for sampler in fields["samplers"]:  # refused by the plan only after the base model was calibrated
            check_steps_fit(resolve_model_path(model and str(model)), sampler.num_steps,
                            "--steps" if samplers is None else f"--samplers {sampler.key} (or --steps)")
        if methods is not None:
            fields["methods"] = tuple(m.lower() for m in _split(methods))
        if presets is not None:
            fields["presets"] = tuple(p.upper() for p in _split(presets))
        calibration = CalibrationConfig(num_trajectories=calib_trajectories,
                                        samples_per_step=min(64, calib_trajectories), seed=calib_seed)
        config = BenchConfig(model=str(model) if model else None, eval_seed=seed, calibration=calibration,
                             reconstruction=_reconstruction(recon_iters, recon_activation_iters, recon_batch_size,
                                                            None if recon_rounding is None
                                                            else recon_rounding.strip().lower(),
                                                            recon_gptq_target_damp, recon_gptq_target_prior),
                             fp_layers=fp_layers.strip().lower(),
                             batch_size=batch_size, out_dir=str(out),
                             models_dir=str(models_dir) if models_dir else None, cache_dir=str(cache_dir),
                             threads=threads, device=device, dtype=dtype, guidance_scale=guidance_scale,
                             calibration_prompts=read_prompt_file(calib_prompts, "--calib-prompts"),
                             evaluation_prompts=evaluation_prompts,
                             negative_prompt=negative_prompt, distilled_guidance=distilled_guidance,
                             labels=labels, null_class=null_class, force_foreign=force_foreign,
                             prompt_files=tuple(None if f is None else str(f) for f in (calib_prompts, eval_prompts)),
                             **fields)
        report = run_bench(config)  # creates and marks --out once the model has loaded
    _print(report)
    # printed as it is (the console reads no markup or emoji codes: an --out of 'runs/[/x]' crashed here after the
    # whole bench had run, and ':rocket:' in a path printed a command that names another folder), unhighlighted
    _literal(f"report: {out}/report.html (self-contained), report.md, report.json; regenerate with:")
    _literal(report["command"])


def _literal(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _print(report: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    from tadq.experiments.bench.rows import TERMINAL_KEYS, format_value, headline_columns

    for key, part in report["samplers"].items():
        rows = [r for r in report["rows"] if r["sampler"] == key]
        # the FD column of the features these rows were measured on (FD-photos, not an empty FD-digits)
        columns = [(k, title) for k, title in headline_columns(rows) if k in TERMINAL_KEYS or k.startswith("fd_")]
        table = Table(title=Text(f"tadq bench: {part['title']}, {report['config']['num_samples']} samples"))
        for _, title in columns:
            table.add_column(title, justify="right")
        for row in rows:  # Text: a status quotes error messages
            table.add_row(*(Text(format_value(k, row.get(k))) for k, _ in columns))
        console.print(table)
        for verdict in part["peer_verdicts"]:
            _literal(verdict)
    console.print(f"bench wall time: {report['wall_s']:.0f} s")
