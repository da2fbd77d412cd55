"""``tadq analyze``: measured vs closed-form cumulative error per step for a quantized model (TCEC's propagation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import (
    ForceForeign,
    Labels,
    NegativePrompt,
    NullClass,
    check_count_flags,
    check_sampling_flags,
    console,
    err_console,
    fail_cleanly,
    hold_output,
    setup,
    torch_setup,
)
from tadq.cli.sample import (
    Backend,
    Device,
    Dtype,
    Eta,
    SamplerKind,
    Steps,
    Threads,
    Verbose,
    announce_compile,
    check_backend_here,
)

__all__ = ["analyze_command"]


def analyze_command(
    model_dir: Annotated[Path, typer.Argument(help="A tadq artefact (`tadq quantize --out`).")],
    fp_model: Annotated[Path | None, typer.Option(
        "--reference", "--fp-model",
        help="The FP diffusers folder the artefact was quantized from (default: the shipped digits DDPM; for a "
             "text-to-image artefact the shipped text-to-image pipeline). Named as in tadq evaluate; --fp-model is "
             "its older name.")] = None,
    num_samples: Annotated[int, typer.Option(help="Trajectories (PSNR-scale numbers need few).")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed.")] = 1000,
    sampler: SamplerKind = None,
    steps: Steps = None,
    eta: Eta = None,
    jacobian: Annotated[bool, typer.Option(
        help="Also predict with a measured Jacobian-vector term (one more FP call per step).")] = True,
    batch_size: Annotated[int, typer.Option(help="Samples per network call; also moves quantized samples "
                                                 "slightly (README: What tadq guarantees).")] = 128,
    out: Annotated[Path, typer.Option(help="Report folder: analysis.json and propagation.png.")] = Path(
        "runs/analyze"),
    labels: Labels = None,
    null_class: NullClass = None,
    eval_prompts: Annotated[Path | None, typer.Option(
        help="Text-to-image artefacts: text file, one prompt per line (trajectory i gets prompt i mod the count); "
             "default with the shipped text-to-image reference: its evaluation prompts.")] = None,
    negative_prompt: NegativePrompt = "",
    guidance_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance of both models (conditional artefacts; default: the artefact recipe's).")
                              ] = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    backend: Backend = "fake",
    verbose: Verbose = False,
) -> None:
    """Where does the error come from? Measured state error per step beside TCEC's closed-form prediction (the
    network run by --backend: the integer model's error is the one a deployment propagates)."""
    from tadq.fsguard import check_output_dir, mark_output
    from tadq.names import check_eta
    from tadq.utils import atomic_write_text
    from tadq.zoo.paths import shipped_model_path, shipped_t2i_path

    setup(verbose, threads)
    with fail_cleanly():
        # refused now, not after both models were loaded, and before torch is imported
        check_sampling_flags(num_samples=num_samples, batch_size=batch_size, seed=seed)
        check_count_flags(steps=steps)
        if eta is not None:  # SamplerConfig checks it again, with the artefact's kind when --sampler is not given
            check_eta(eta, sampler)
        torch_device, torch_dtype = torch_setup(threads, device, dtype)
        from tadq.analysis import analyze_propagation, save_propagation_plot
        from tadq.cli.sample import artefact_pair, evaluation_prompts, is_prompt_pipeline, prompt_pipeline_pair
        from tadq.corrections.attach import as_denoiser
        from tadq.io import is_quantized_artefact
        from tadq.report import dumps_json

        check_backend_here(backend, torch_device, torch_dtype)  # refused before anything is loaded
        if not is_quantized_artefact(model_dir):
            raise ValueError(f"{model_dir} is not a tadq artefact (no tadq_config.json); make one with tadq quantize")
        prompt_pipeline = is_prompt_pipeline(model_dir)
        prompts = evaluation_prompts(model_dir, prompt_pipeline, fp_model, eval_prompts, negative_prompt, labels,
                                     null_class, flag="--reference")
        default_reference = shipped_t2i_path() if prompt_pipeline else shipped_model_path()
        check_output_dir(out, kind="analysis", resume=True, force_foreign=force_foreign,
                         inputs=[model_dir, fp_model if fp_model is not None else default_reference])
        hold_output(out)
        if prompt_pipeline:  # the prompts' embeddings and the recipe's guidance and sampler, as tadq evaluate
            qmodel, fp, scheduler, sampler_config, conditions, scale, _ = prompt_pipeline_pair(
                model_dir, fp_model, prompts, negative_prompt, guidance_scale, sampler, steps, eta, seed, backend,
                torch_device, torch_dtype, "--reference")
        else:  # labels from --seed and the recipe's guidance, as tadq evaluate draws them
            qmodel, fp, scheduler, sampler_config, conditions, scale, _ = artefact_pair(
                model_dir, fp_model, num_samples, labels, null_class, guidance_scale, sampler, steps, eta, seed,
                backend, torch_device, torch_dtype, "--reference", "analyze", decode=False)  # latents only
        announce_compile(backend)
        # the network alone: the prediction explains the error the corrections then act on; a latent model's error
        # is analysed in the latents its sampler walks in
        report = analyze_propagation(qmodel, as_denoiser(fp), scheduler, sampler_config, num_samples=num_samples,
                                     seed=seed, measure_jacobian=jacobian, batch_size=batch_size,
                                     conditions=conditions, guidance_scale=scale)
    from tadq.sampling.walker import StepAware

    # a step-aware member (TFMQ's per-step ranges and feature cache) is part of the network: the sampling walker
    # sets its step on every call, so the analysed network runs with it; sampler-level hooks are not applied
    ignored = [type(member).__name__.removesuffix("Correction") for member in getattr(qmodel, "corrections", ())
               if not isinstance(member, StepAware)]
    if ignored:
        err_console.print(f"the network alone is analysed: the artefact's corrections ({', '.join(ignored)}) are not "
                          "applied here (tadq evaluate measures the deployed model with them)")
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "analysis")
    settings = {"model": str(model_dir), "reference": str(fp_model) if fp_model is not None else "shipped",
                "corrections_not_applied": ignored, "measure_jacobian": jacobian, "batch_size": batch_size,
                "backend": backend, "guidance_scale": scale,
                "conditions": None if conditions is None else conditions.key}
    if prompt_pipeline:  # what the conditions key hashes, readable (as tadq evaluate's report has it)
        settings.update(prompts=list(prompts), negative_prompt=negative_prompt,
                        distilled_guidance=getattr(conditions.encoder, "distilled_guidance", None))
    (out / "analysis.json").unlink(missing_ok=True)  # written last: an interrupt while drawing left an earlier
    # analysis's numbers beside this one's figure (as tadq evaluate's results files)
    save_propagation_plot(report, out / "propagation.png",
                          title=f"{qmodel.config.label} {qmodel.config.method}"
                          f"{'' if backend == 'fake' else f' [{backend}]'}: error propagation, {report.sampler}")
    atomic_write_text(dumps_json({**report.to_dict(), "settings": settings}), out / "analysis.json")
    share = report.final_share
    top = sorted(range(len(share)), key=lambda s: -share[s])[:3]
    with_jvp = f", with measured Jδ {report.predicted_jvp[-1]:.3e}" if report.predicted_jvp else ""
    console.print(f"final MSE vs FP: measured {report.measured[-1]:.3e}, "
                  f"closed form (J≈0) {report.predicted_j0[-1]:.3e}{with_jvp}")
    console.print(f"steps whose error weighs most on x_0 (J≈0): {top}")
    console.print(f"wrote {out / 'analysis.json'} and {out / 'propagation.png'}")
