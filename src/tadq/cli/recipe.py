"""``tadq recipe``: find the best base × preset × correction stack × floating-point layers under a budget
(docs/recipe_search.md)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import (
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
    default_or_count,
    fail_cleanly,
    hold_output,
    note,
    read_prompt_file,
    sampler_kind_flag,
    setup,
    torch_setup,
)
from tadq.cli.sample import Threads, Verbose
from tadq.fp_layers import DEFAULT_FP_LAYERS

__all__ = ["recipe_command", "resolve_budget_flags"]


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def resolve_budget_flags(gbitops: float | None, bits: str | None, nbytes: int | None) -> tuple[str, object]:
    """(kind, value) of the one budget flag given; ``ValueError`` for none, several, or an unknown preset. A preset is
    read as ``--presets`` reads it (``preset_key``: case and blanks ignored, a ``-G<n>`` block suffix allowed): its
    bit-operations are its widths', so ``W4A8-G128`` costs what ``W4A8`` does (``gbitops_per_sample``)."""
    from tadq.names import finite_float, preset_key

    given = [(kind, value) for kind, value in (("gbitops", gbitops), ("bits", bits), ("bytes", nbytes))
             if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one budget: --budget-gbitops X (Gbit-ops per sample), --budget-bits PRESET "
                         "(the bit-operations of that preset, e.g. W4A8) or --budget-bytes N (artefact bytes)")
    kind, value = given[0]
    if kind == "bits":
        try:
            value = preset_key(str(value))
        except ValueError as error:
            raise ValueError(f"--budget-bits: {error}") from error
    elif isinstance(value, (int, float)) and not (finite_float(value) and value > 0):
        # nan and inf passed `value <= 0` and were refused only after the model was loaded
        raise ValueError(f"--budget-{kind} must be a finite number > 0, got {value}")
    return kind, value


def _folder_digest(folder: Path) -> str:
    """A digest of every file under ``folder`` (relative names and bytes): names a VAE in the search's cache keys."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")  # one key on every OS
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def recipe_command(
    out: Annotated[Path, typer.Option(help="Search folder: recipe.json, model/, report.md/.json, pareto.png, "
                                           "cache/ (a rerun resumes from it).")],
    model_dir: Annotated[str | None, typer.Argument(help="Diffusers model folder, or a shipped model: digits (the "
                                                         "default), photos, dit or t2i.")] = None,
    budget_gbitops: Annotated[float | None, typer.Option(help="Budget in Gbit-ops per sample (all steps).")] = None,
    budget_bits: Annotated[str | None, typer.Option(help="Budget: the bit-operations of this preset (W4A8...), with "
                                                        "the layers of the first --fp-layers key kept in float.")
                           ] = None,
    budget_bytes: Annotated[int | None, typer.Option(help="Budget: artefact bytes (weights + correction tables).")
                            ] = None,
    seed: Annotated[int, typer.Option(help="Calibration seed: calibration, fits (and, derived from it, the held-out "
                                           "scoring seed + 200000 and TCEC's selection seed + 100000).")] = 0,
    eval_seed: Annotated[int, typer.Option(help="Evaluation seed (the README's tables: 1000); the search never "
                                                "samples it, and refuses seeds that collide with it.")] = 1000,
    presets: Annotated[str, typer.Option(help="Presets searched (those over the budget are skipped).")
                       ] = "W8A8,W4A8,W4A4,W4A16,W8A16",
    bases: Annotated[str, typer.Option(help="Base methods searched: naive, qdiffusion, svdquant (rank-4 FP branch, "
                                            "smoothing, dynamic per-group activations of 8 channels), smoothquant "
                                            "(the same without the branch).")] = "naive,qdiffusion",
    stacks: Annotated[str, typer.Option(help="Correction stacks searched: none, ptqd, tac, tcec, tac+tcec.")
                      ] = "none,ptqd,tac,tcec,tac+tcec",
    fp_layers: Annotated[str, typer.Option(help="Layers kept in floating point, keys of FP_LAYER_PRESETS: none (every "
                                                "layer quantized), first_last (the input and output convs), "
                                                "first_last_time (also the timestep MLP); each key tried with every "
                                                "other choice, its FP layers costed at 32x32 bits. The default is "
                                                "tadq run's.")] = DEFAULT_FP_LAYERS,
    sampler_kind: Annotated[str | None, typer.Option(
        "--sampler", help="Deployment sampler: ddim, ddpm, euler, euler-ancestral, dpmsolver++ (2M) or flow-euler "
                          "(default: ddim; flow-euler for a flow-matching model: SD3, Flux).",
        callback=sampler_kind_flag)] = None,
    steps: Annotated[int, typer.Option(help="Steps of the deployment sampler.")] = 50,
    eta: Annotated[float, typer.Option(help="DDIM eta of the deployment sampler (ddim only).")] = 0.0,
    calib_trajectories: CalibTrajectories = 256,
    recon_iters: Annotated[int, typer.Option(help="AdaRound iterations per unit (-1: the default, 1000).")] = -1,
    recon_activation_iters: Annotated[int, typer.Option(
        help="Activation-step iterations per unit (-1: the ReconstructionConfig default, 0).")] = -1,
    recon_rounding: Annotated[str, typer.Option(help="Weight rounding of the Q-Diffusion bases' reconstruction: "
                                                     "gptq (inverse-Hessian compensation, no iterations; the "
                                                     "default), adaround (learned) or gptq_adaround.")
                              ] = "gptq",
    recon_gptq_target_damp: Annotated[float, typer.Option(
        help="Ridge damping of GPTQ's least-squares FP-output target W* (share of the Hessian's mean diagonal; -1: "
             "the ReconstructionConfig default, 1e-4; 0.01: GPTQ's own damping, tadq before 2026-12-03).")] = -1.0,
    recon_gptq_target_prior: Annotated[str | None, typer.Option(
        help="What the ridge of W* shrinks toward where the calibration inputs say little: weight (W; the "
             "ReconstructionConfig default) or zero (tadq before 2026-12-07; docs/methods/qdiffusion.md).")] = None,
    fit_trajectories: Annotated[int, typer.Option(help="Trajectories of each correction fit.")] = 256,
    selection_samples: Annotated[int, typer.Option(help="TCEC's own held-out selection trajectories.")] = 64,
    heldout: Annotated[int, typer.Option(help="Held-out trajectories each candidate is scored on.")] = 64,
    evaluate: Annotated[int, typer.Option(help="After the search, sample every in-budget candidate N times on "
                                               "--eval-seed and compare the winner with the README rows (0: no).")
                        ] = 0,
    batch_size: Annotated[int, typer.Option(help="Sampling batch size.")] = 128,
    guidance_scale: GuidanceScale = None,
    calib_prompts: CalibPrompts = None,
    eval_prompts: EvalPrompts = None,
    negative_prompt: NegativePrompt = "",
    distilled_guidance: DistilledGuidance = None,
    labels: Labels = None,
    null_class: NullClass = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    verbose: Verbose = False,
) -> None:
    """Search base method × preset × correction stack × floating-point layers under a budget, score on held-out
    calibration noise, write the winning recipe, its artefact and a report with the Pareto front."""
    from tadq.names import check_eta

    setup(verbose, threads)
    with fail_cleanly():
        # nan read "guidance_scale=nan needs a conditional model" once the model was loaded; these need no torch
        check_sampling_flags(guidance_scale=guidance_scale)
        check_seed_flags(seed=seed, eval_seed=eval_seed)
        for name, number in (("--heldout", heldout), ("--batch-size", batch_size)):
            if number < 1:
                raise ValueError(f"{name} must be >= 1, got {number}")
        if evaluate < 0:
            raise ValueError(f"--evaluate must be >= 0 (0: no evaluation), got {evaluate}")
        kind, value = resolve_budget_flags(budget_gbitops, budget_bits, budget_bytes)
        check_eta(eta, "ddim" if sampler_kind is None else sampler_kind)  # SamplerConfig checks it again
        torch_setup(threads)
        import dataclasses

        from tadq.config import CalibrationConfig, ReconstructionConfig
        from tadq.experiments.workload import decoder_component, load_workload, resolve_model_path
        from tadq.fsguard import check_output_dir, mark_output
        from tadq.sampling import SamplerConfig, SamplingPlan, command_sampler_kind
        from tadq.search import Budget, Candidate, SearchConditions, SearchSpace, check_seeds, heldout_seed
        from tadq.search.space import gbitops_per_sample

        sampler = SamplerConfig(kind="ddim" if sampler_kind is None else sampler_kind,
                                num_steps=steps, eta=eta)
        reconstruction = ReconstructionConfig(rounding=recon_rounding.strip().lower())
        if (iters := default_or_count("--recon-iters", recon_iters)) is not None:
            reconstruction = dataclasses.replace(reconstruction, weight_iters=iters)
        if (iters := default_or_count("--recon-activation-iters", recon_activation_iters)) is not None:
            reconstruction = dataclasses.replace(reconstruction, activation_iters=iters)
        if recon_gptq_target_damp != -1.0:  # ReconstructionConfig refuses values <= 0
            reconstruction = dataclasses.replace(reconstruction, gptq_target_damp=recon_gptq_target_damp)
        if recon_gptq_target_prior is not None:  # ReconstructionConfig refuses names other than zero / weight
            reconstruction = dataclasses.replace(reconstruction,
                                                 gptq_target_prior=recon_gptq_target_prior.strip().lower())
        calibration = CalibrationConfig(sampler=sampler, num_trajectories=calib_trajectories,
                                        num_steps_kept=min(25, steps),
                                        samples_per_step=min(64, calib_trajectories), seed=seed)
        space = SearchSpace(presets=_names(presets), bases=_names(bases), stacks=_names(stacks),
                            fp_layers=_names(fp_layers), sampler=sampler,
                            calibration=calibration, reconstruction=reconstruction,
                            fit_trajectories=fit_trajectories, selection_samples=selection_samples)
        fit_seeds = space.correction_seeds()
        check_seeds(calibration_seed=seed, heldout=heldout_seed(seed), eval_seed=eval_seed,
                    fit_seeds={"correction fit": fit_seeds["fit"], "TCEC selection": fit_seeds["tcec_selection"]})
        source = resolve_model_path(model_dir)  # load_workload refuses a folder that does not exist
        if source.exists():
            check_steps_fit(source, steps)  # the plan refused it only after the model was loaded
        check_output_dir(out, kind="recipe-search", resume=True, force_foreign=force_foreign, inputs=[source])
        hold_output(out)
        workload = load_workload(model_dir, guidance_scale=guidance_scale,
                                 calibration_prompts=read_prompt_file(calib_prompts, "--calib-prompts"),
                                 evaluation_prompts=read_prompt_file(eval_prompts, "--eval-prompts"),
                                 negative_prompt=negative_prompt, labels=labels, null_class=null_class,
                                 distilled_guidance=distilled_guidance)
        model, scheduler = workload.model, workload.scheduler
        space = dataclasses.replace(space, guidance_scale=workload.guidance_scale,
                                    distilled_guidance=workload.distilled_guidance)
        if sampler_kind is None and command_sampler_kind(scheduler) != sampler.kind:  # DDIM cannot drive it
            sampler = SamplerConfig(kind=command_sampler_kind(scheduler), num_steps=steps)
            space = dataclasses.replace(space, sampler=sampler,
                                        calibration=dataclasses.replace(space.calibration, sampler=sampler))
        if workload.sampler_for is not None and (walked := workload.sampler_for(sampler)) != sampler:
            note(f"sampler {walked.key}: the pipeline's own flow grid and shift")
            space = dataclasses.replace(space, sampler=walked,
                                        calibration=dataclasses.replace(space.calibration, sampler=walked))
        SamplingPlan.build(scheduler, space.sampler, space.guidance_scale)  # before --out is created
        decoder_key = None if workload.decoder is None else _folder_digest(source / decoder_component(source))
        searched, evaluated = (SearchConditions(conditions, workload.decoder, decoder_key) for conditions in
                               (workload.calibration_conditions, workload.evaluation_conditions))
        if kind == "bits":
            # the preset as the search's first floating-point layers key deploys it: `--budget-bits W4A8` admits the
            # headline's W4A8 model (first/last convs in float), not only an every-layer one
            first_fp = space.fp_layers[0]
            cost = gbitops_per_sample(model, space.recipe(Candidate("naive", value, fp_layers=first_fp)))
            budget = Budget("gbitops", cost, f"the {value} preset's bit-operations"
                                             + ("" if first_fp == "none" else f" with fp_layers={first_fp}"))
        else:
            budget = Budget(kind, float(value), "--budget-gbitops" if kind == "gbitops" else "--budget-bytes")
        from tadq.search import plan_search, run_search

        plan = plan_search(model, space, budget)  # refuses a budget no candidate fits, before any expensive work
        note(f"budget {budget.describe()}: {len(plan.feasible)} of {len(plan.candidates)} candidates "
                          f"within it; held-out seed {heldout_seed(seed)} ({heldout} trajectories), evaluation seed "
                          f"{eval_seed} never sampled by the search")
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "recipe-search")
        start = time.perf_counter()
        from tadq.search.report import write_report
        from tadq.search.search import export_winner

        result = run_search(model, scheduler, space, budget, out, heldout_trajectories=heldout, eval_seed=eval_seed,
                            batch_size=batch_size, plan=plan, conditioning=searched)
        result.settings["search_seconds"] = round(time.perf_counter() - start, 1)
        # a latent model's artefact keeps its pipeline (VAE, text encoders), as tadq quantize writes it
        export_winner(result, out, scheduler, pipeline_source=source if workload.decoder is not None else None)
        evaluation = None
        if evaluate:
            from tadq.search.evaluate import evaluate_candidates

            evaluation = evaluate_candidates(result, model, scheduler, out, num_samples=evaluate,
                                             batch_size=batch_size, conditioning=evaluated)
        write_report(result, out, evaluation)
    console.print(f"winner: {result.winner} — {result.reason}")
    if evaluation is not None:
        console.print(evaluation["summary"])
    console.print(f"wrote {out}/recipe.json, {out}/model/, {out}/report.md, report.json, pareto.png "
                  f"({result.settings['search_seconds']} s; {result.stats})")
