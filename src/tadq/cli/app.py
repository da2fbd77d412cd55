"""The ``tadq`` command line: thin wrappers that parse flags into configs and call the library."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import typer

from tadq.cli.analyze import analyze_command
from tadq.cli.bench import bench_command
from tadq.cli.common import (
    CacheDir,
    CalibPrompts,
    CalibTrajectories,
    DistilledGuidance,
    EvalPrompts,
    GuidanceScale,
    Labels,
    NegativePrompt,
    NullClass,
    check_sampling_flags,
    check_seed_flags,
    check_steps_fit,
    console,
    default_or_count,
    err_console,
    fail_cleanly,
    hold_output,
    read_prompt_file,
    sampler_kind_flag,
    set_quiet,
    setup,
    torch_setup,
)
from tadq.cli.evaluate import evaluate_command
from tadq.cli.quantize import quantize_command
from tadq.cli.recipe import recipe_command
from tadq.cli.sample import Device, Dtype, Threads, Verbose, sample_command
from tadq.cli.sample_sharded import sample_sharded_command
from tadq.cli.verify import verify_command
from tadq.cli.zoo import zoo_app
from tadq.fp_layers import DEFAULT_FP_LAYERS

# plain help text: rich's boxed tables cut long flag names to "--calib-traject…" in an 80-column terminal
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="tadq: timestep-aware post-training quantization of diffusion models.")


@app.callback()
def _global_options(
    ctx: typer.Context,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, info logs or notes on stderr "
                               "(warnings and errors are still written); give it before the command: tadq -q "
                               "sample ..."),
) -> None:
    """tadq: timestep-aware post-training quantization of diffusion models."""
    before = set_quiet(quiet)
    ctx.call_on_close(lambda: set_quiet(before))  # the CLI called from Python: the caller's bars come back after


app.add_typer(zoo_app, name="zoo")
app.command("quantize")(quantize_command)
app.command("sample")(sample_command)
app.command("evaluate")(evaluate_command)
app.command("analyze")(analyze_command)
app.command("sample-sharded")(sample_sharded_command)
app.command("bench")(bench_command)
app.command("verify")(verify_command)
app.command("recipe")(recipe_command)

logger = logging.getLogger("tadq")


def _parse_presets(text: str) -> tuple[str, ...]:
    return tuple(p.strip().upper() for p in text.split(",") if p.strip())


def _parse_methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())


def _check_rows_dtype(config) -> None:
    """Refuse ``--dtype`` for a row whose method compares FP and quantized blocks in one dtype (Q-Diffusion's
    reconstruction and the rows on it, TFMQ-DM) before any work: ``--dtype bfloat16 --methods qdiffusion`` failed
    only after the FP reference had been sampled and the model calibrated, as ``tadq quantize`` refuses it at once."""
    import torch

    from tadq.api import check_method_dtype
    from tadq.device import resolve_dtype
    from tadq.experiments.rows.recipes import RECIPE_ROWS, recipes_for_row
    from tadq.experiments.run import job_rows

    dtype = resolve_dtype(config.dtype)
    if dtype == torch.float32:
        return
    for row, preset in job_rows(config):
        if row in RECIPE_ROWS:
            recipe = recipes_for_row(row, preset, config)
            try:
                check_method_dtype(recipe.quant_config(), dtype, recipe)
            except NotImplementedError as error:
                raise NotImplementedError(f"--methods {row} with --dtype {config.dtype}: {error}") from error


@app.command("run")
def run_command(
    model: str | None = typer.Option(None, help="Local diffusers folder, or a shipped model: digits (default), t2i "
                                     "(the text-to-image digits pipeline), photos (natural-image patches) or dit "
                                     "(the class-conditional digits DiT)."),
    presets: str = typer.Option("W8A8,W4A8,W4A4", help="Comma-separated presets: W8A8, W4A8, W4A4, W4A16, W8A16, "
                                  "W8A8-WSYM (symmetric 8-bit weights, faster on the integer backends), W4A8-FP8, "
                                  "W8A8-FP8 (FP8 E4M3 activations, simulated); any with -G<n> (W4A8-G128): weights "
                                  "in blocks of n per row, simulated."),
    methods: str = typer.Option("naive,qdiffusion,ptqd",
                                help="Comma-separated rows of tadq.experiments.rows (naive, qdiffusion, ptqd, …). "
                                "'best' is each preset's best row as measured on the shipped digits model (W8A8: "
                                "tfmq-model+tac; W4A8: tac; W4A4: svdquant+tac; other presets refused): make run's "
                                "headline is --methods naive,best --num-samples 256 --batch-size 256."),
    recon_iters: int = typer.Option(-1, help="AdaRound iterations per unit (-1: the ReconstructionConfig default)."),
    recon_activation_iters: int = typer.Option(-1, help="Activation-step iterations per unit (-1: the "
                                               "ReconstructionConfig default; 0 skips the phase)."),
    recon_rounding: str = typer.Option("gptq", help="Weight rounding of block reconstruction: gptq "
                                       "(inverse-Hessian compensation onto the FP outputs, no iterations; the "
                                       "default, docs/methods/qdiffusion.md#gptq-rounding), adaround (learned, "
                                       "--recon-iters iterations per unit; the README's older tables) or "
                                       "gptq_adaround."),
    recon_gptq_target_damp: float = typer.Option(-1.0, help="Ridge damping of GPTQ's least-squares FP-output target "
                                                 "W* (share of the Hessian's mean diagonal; -1: the "
                                                 "ReconstructionConfig default; 0.01 reproduces tables measured "
                                                 "before 2026-12-03)."),
    recon_gptq_target_prior: str = typer.Option("weight", help="What the ridge of W* shrinks toward where the "
                                                "calibration inputs say little: weight (W; the default) or zero "
                                                "(tadq before 2026-12-07: lost 7 dB on the shipped DiT with 16 "
                                                "calibration trajectories; docs/methods/qdiffusion.md)."),
    fp_layers: str = typer.Option(DEFAULT_FP_LAYERS, help="Layers every row (naive and the peers included) keeps in "
                                  "floating point: first_last (input and output convs, the default; naive W8A8 +9 "
                                  "to +12 dB on the shipped models, docs/methods/qdiffusion.md#what-limits-w8a8), "
                                  "none (every conv/linear quantized; the README's older tables) or "
                                  "first_last_time (+ the time-embedding MLP)."),
    num_samples: int = typer.Option(1000, help="Samples per variant (FD needs about 1000; PSNR/SSIM vs FP hold at "
                                    "256, make run's headline)."),
    sampler: str | None = typer.Option(None, help="Sampler kind: ddim, ddpm, euler, euler-ancestral, dpmsolver++ "
                                       "(2M) or flow-euler (default: ddim; flow-euler for a flow-matching model: "
                                       "SD3, Flux).", callback=sampler_kind_flag),
    steps: int = typer.Option(50, help="Sampler steps."),
    eta: float = typer.Option(0.0, help="DDIM eta (0 = deterministic)."),
    seed: int = typer.Option(1000, help="Evaluation noise seed (shared by FP and every variant)."),
    calib_seed: int = typer.Option(0, help="Calibration noise seed (must differ from --seed)."),
    calib_trajectories: CalibTrajectories = 256,
    batch_size: int = typer.Option(250, help="Sampling batch size."),
    out: Path = typer.Option(Path("runs/main"), help="Report folder."),
    cache_dir: CacheDir = Path(".cache/tadq"),
    force_foreign: bool = typer.Option(False, "--force-foreign", help="Also write into a non-empty --out folder "
                                       "tadq did not write (without it, such a folder is refused)."),
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    guidance_scale: GuidanceScale = None,
    calib_prompts: CalibPrompts = None,
    eval_prompts: EvalPrompts = None,
    negative_prompt: NegativePrompt = "",
    distilled_guidance: DistilledGuidance = None,
    labels: Labels = None,
    null_class: NullClass = None,
    verbose: Verbose = False,
) -> None:
    """The main job: FP vs quantized variants from the same noise; prints the table, writes a report folder."""
    from tadq.experiments.run_checks import RUN_FLAGS, check_method_names, check_run_numbers, known_rows
    from tadq.fp_layers import fp_layer_roles
    from tadq.fsguard import check_output_dir, check_writable_dir
    from tadq.names import check_eta, preset_key
    from tadq.zoo.paths import resolve_model_path

    setup(verbose, threads)
    with fail_cleanly():  # first the checks that need no torch (a typo is refused in a fraction of a second)
        check_seed_flags(seed=seed, calib_seed=calib_seed)
        evaluation_prompts = read_prompt_file(eval_prompts, "--eval-prompts")
        # RunConfig checks them again, named as its fields
        check_run_numbers(num_samples=num_samples, batch_size=batch_size, eval_seed=seed, calibration_seed=calib_seed,
                          evaluation_prompts=evaluation_prompts, names=RUN_FLAGS)
        check_sampling_flags(num_samples=num_samples)  # the upper bound
        for name in _parse_presets(presets):  # RunConfig checks them again
            preset_key(name)
        check_method_names(_parse_methods(methods), known_rows())  # RunConfig checks them again
        check_eta(eta, sampler)  # SamplerConfig checks it again, with the model's kind when --sampler is not given
        fp_layer_roles(fp_layers.strip().lower())
        check_output_dir(out, kind="run", resume=True, force_foreign=force_foreign,
                         inputs=[resolve_model_path(model)])
        hold_output(out)
        check_writable_dir(cache_dir, "--cache-dir", inputs=[resolve_model_path(model)], force_foreign=force_foreign)
        changes = {name: count for name, flag, value in (("weight_iters", "--recon-iters", recon_iters),
                                                         ("activation_iters", "--recon-activation-iters",
                                                          recon_activation_iters))
                   if (count := default_or_count(flag, value)) is not None}
        torch_setup(threads, device, dtype)
        from tadq.config import CalibrationConfig, ReconstructionConfig
        from tadq.experiments.run import RunConfig, run_main_job
        from tadq.models import load_scheduler
        from tadq.report.tables import columns_for, format_cell
        from tadq.sampling import SamplerConfig, command_sampler_kind

        if sampler is None:  # the model's scheduler decides: DDIM cannot drive a flow-matching model
            sampler = command_sampler_kind(load_scheduler(resolve_model_path(model)))
        sampler_config = SamplerConfig(kind=sampler, num_steps=steps, eta=eta)
        check_steps_fit(resolve_model_path(model), steps)  # before the FP model is loaded and calibrated
        calibration = CalibrationConfig(sampler=sampler_config, num_trajectories=calib_trajectories,
                                        num_steps_kept=min(25, steps), samples_per_step=min(64, calib_trajectories),
                                        seed=calib_seed)
        if recon_gptq_target_damp != -1.0:
            changes["gptq_target_damp"] = recon_gptq_target_damp  # ReconstructionConfig refuses values <= 0
        reconstruction = ReconstructionConfig(rounding=recon_rounding, gptq_target_prior=recon_gptq_target_prior,
                                              **changes)
        config = RunConfig(model=model or None, presets=_parse_presets(presets),
                           methods=_parse_methods(methods),
                           reconstruction=reconstruction,
                           num_samples=num_samples, sampler=sampler_config, eval_seed=seed, calibration=calibration,
                           batch_size=batch_size, out_dir=str(out), cache_dir=str(cache_dir), device=device,
                           dtype=dtype, guidance_scale=guidance_scale,
                           calibration_prompts=read_prompt_file(calib_prompts, "--calib-prompts"),
                           evaluation_prompts=evaluation_prompts,
                           negative_prompt=negative_prompt, labels=labels, null_class=null_class,
                           fp_layers=fp_layers.strip().lower(), distilled_guidance=distilled_guidance)
        from tadq.experiments.rows import missing_peer

        for method in config.methods:  # before calibrating: the row would fail only after the FP work
            if (reason := missing_peer(method)) is not None:
                raise ValueError(reason)
        _check_rows_dtype(config)
        results = run_main_job(config)
    from rich.table import Table

    from tadq.config import config_from_dict

    ran = results.get("config", {}).get("sampler")  # a pipeline may walk its own grid (Flux)
    key = sampler_config.key if ran is None else config_from_dict(ran).key
    table = Table(title=f"tadq run: {key}, {num_samples} samples, seed {seed}")
    columns = columns_for(results["rows"])
    for _, title in columns:
        table.add_column(title, justify="right")
    for row in results["rows"]:
        table.add_row(*(format_cell(key, row.get(key)) for key, _ in columns))
    console.print(table)
    console.print(results["notes"]["fd"])
    console.print(results["notes"]["fake_quant"])
    if results["notes"].get("diverged"):
        console.print(results["notes"]["diverged"], style="bold red")
    console.print(f"report: {out}/results.md, results.json, samples.png, per_step_error.png")


def _replace_unencodable_output() -> None:
    """Print a character the console or pipe cannot encode as ``?`` instead of raising: Windows writes a redirected
    stdout in its code page (cp1252 has no "↓", "≈" or "σ"), ``LC_ALL=C`` in ASCII, and rich's
    ``UnicodeEncodeError`` turned a one-line error, or the results table at the end of a whole run, into a
    traceback."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if getattr(stream, "errors", None) == "strict" and callable(reconfigure):
            with contextlib.suppress(ValueError, OSError):  # a stream already written to in another way
                reconfigure(errors="replace")


def main() -> None:
    from tadq.cli.interrupts import stopped_by, unwind_on_termination

    _replace_unencodable_output()
    # the commands import torch themselves (--help and a refused flag need none of it); a fresh import has gradients
    # on, so only a torch the caller already imported (and may have put under no_grad) needs them switched back on
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_grad_enabled(True)
    try:
        with unwind_on_termination():  # SIGTERM/SIGHUP clean up as Ctrl-C does (no staging folder left behind)
            app()
    except SystemExit as exit_:  # the command's cleanup has run; typer ends a Ctrl-C with 130 and no word
        if (signal_name := stopped_by(exit_.code)) is not None:
            from tadq.progress import close_bars

            close_bars()  # an interrupted loop's bar, closed now rather than redrawn below the line at exit
            err_console.print(f"tadq: stopped by {signal_name}", highlight=False)
        raise


if __name__ == "__main__":
    main()
