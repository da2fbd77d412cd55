"""``tadq analyze``: measured vs closed-form cumulative error per step for a quantized model (TCEC's propagation)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import (
    ForceForeign,
    check_reference_model,
    check_sampling_flags,
    console,
    err_console,
    fail_cleanly,
    hold_output,
    setup,
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
    deployment_sampler,
)

__all__ = ["analyze_command"]


def analyze_command(
    model_dir: Annotated[Path, typer.Argument(help="A tadq artefact (`tadq quantize --out`).")],
    fp_model: Annotated[Path | None, typer.Option(
        help="The FP diffusers folder the artefact was quantized from (default: the shipped model).")] = None,
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
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    backend: Backend = "fake",
    verbose: Verbose = False,
) -> None:
    """Where does the error come from? Measured state error per step beside TCEC's closed-form prediction (the
    network run by --backend: the integer model's error is the one a deployment propagates)."""
    from tadq.analysis import analyze_propagation, save_propagation_plot
    from tadq.corrections.attach import as_denoiser
    from tadq.device import place_model
    from tadq.evaluation import check_evaluation_seed
    from tadq.fsguard import check_output_dir, mark_output
    from tadq.io import is_quantized_artefact, load_quantized
    from tadq.models import load_pipeline_parts, shipped_model_path
    from tadq.report import dumps_json
    from tadq.utils import atomic_write_text

    torch_device, torch_dtype = setup(verbose, threads, device, dtype)
    with fail_cleanly():
        # refused now, not after both models were loaded
        check_sampling_flags(num_samples=num_samples, batch_size=batch_size, seed=seed)
        check_backend_here(backend, torch_device, torch_dtype)  # refused before anything is loaded
        if not is_quantized_artefact(model_dir):
            raise ValueError(f"{model_dir} is not a tadq artefact (no tadq_config.json); make one with tadq quantize")
        sampler_config = deployment_sampler(model_dir, sampler, steps, eta)
        check_output_dir(out, kind="analysis", resume=True, force_foreign=force_foreign,
                         inputs=[model_dir, fp_model if fp_model is not None else shipped_model_path()])
        hold_output(out)
        qmodel, artefact_scheduler = load_quantized(model_dir, backend=backend)
        check_evaluation_seed(qmodel, seed, "--seed")  # the measured error would be on its calibration noise
        wanted = qmodel.adapter.conditioning_inputs(qmodel.model)
        if wanted:  # refused here, not by the first network call after the FP model is loaded and sampling began
            from tadq.pipelines import is_pipeline_folder

            other = ("tadq run --model FP_PIPELINE_FOLDER (prompts, guidance and VAE decoding)"
                     if is_pipeline_folder(model_dir) else "tadq evaluate")
            raise ValueError(f"{model_dir} holds a conditional {type(qmodel.model).__name__} (it takes "
                             f"{list(wanted)}); tadq analyze measures unconditional models only and has no "
                             f"conditioning flags: use {other} for it")
        qmodel = place_model(qmodel, torch_device, torch_dtype)
        fp, fp_scheduler = load_pipeline_parts(fp_model)
        # the schedule the artefact was calibrated under (saved with it); the FP folder's only when it has none
        scheduler = artefact_scheduler or fp_scheduler
        # the default reference is the shipped model: another model's artefact is measured against it only if alike
        check_reference_model(qmodel, fp, fp_model, "--fp-model")
        fp = place_model(fp, torch_device, torch_dtype)
        announce_compile(backend)
        # the network alone: the prediction explains the error the corrections then act on
        report = analyze_propagation(qmodel, as_denoiser(fp), scheduler, sampler_config, num_samples=num_samples,
                                     seed=seed, measure_jacobian=jacobian, batch_size=batch_size)
    ignored = [type(member).__name__.removesuffix("Correction") for member in getattr(qmodel, "corrections", ())]
    if ignored:
        err_console.print(f"the network alone is analysed: the artefact's corrections ({', '.join(ignored)}) are not "
                          "applied here (tadq evaluate measures the deployed model with them)")
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "analysis")
    settings = {"model": str(model_dir), "fp_model": str(fp_model) if fp_model is not None else "shipped",
                "corrections_not_applied": ignored, "measure_jacobian": jacobian, "batch_size": batch_size,
                "backend": backend}
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
