"""``tadq sample-sharded``: sample (and measure) N images with one or many ``torchrun`` processes, resumably.

Launch with ``torchrun --standalone --nproc-per-node 2 -m tadq.cli.app sample-sharded MODEL_DIR ...`` (gloo on CPU,
nccl on GPUs, one GPU per process); run without ``torchrun`` it is a single process. Rerunning the same command
after a crash or a preemption samples only the chunks that are missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from tadq.cli.common import (
    ForceForeign,
    Labels,
    NullClass,
    check_count_flags,
    check_sampling_flags,
    console,
    fail_cleanly,
    hold_output,
    setup,
    torch_setup,
)
from tadq.cli.sample import (
    Eta,
    SampledModel,
    SamplerKind,
    SampleSeed,
    Steps,
    Threads,
    Verbose,
    deployment_sampler,
    is_prompt_pipeline,
    load_denoiser,
)

__all__ = ["sample_sharded_command"]

METRICS_NAME = "metrics.json"  # tadq.distributed.store.METRICS_NAME, without importing torch


def _print_metrics(metrics, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    row = metrics.to_dict()
    shown = [(k, v) for k, v in row.items() if k != "per_step_mse" and v is not None]
    for name, _ in shown:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for _, v in shown))
    console.print(table)


def sample_sharded_command(
    model_dir: SampledModel = None,
    num_samples: Annotated[int, typer.Option(help="Number of samples (indices 0..N-1).")] = 1000,
    seed: SampleSeed = 1000,
    sampler: SamplerKind = None,
    steps: Steps = None,
    eta: Eta = None,
    batch_size: Annotated[int, typer.Option(help="Samples per denoiser call inside a chunk.")] = 128,
    chunk_size: Annotated[int, typer.Option(
        help="Samples per chunk file, the unit of work and resume (0: the batch size).")] = 0,
    out_dir: Annotated[Path, typer.Option(help="Run folder shared by all ranks: manifest.json, chunks/, "
                                               "samples.safetensors, metrics.json.")] = Path("runs/sharded"),
    reference_dir: Annotated[Path | None, typer.Option(
        help="A finished sample-sharded run of the FP model with the same seed and sampler: adds agreement, "
             "PSNR, SSIM and MSE against it.")] = None,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics",
                                          help="Compute FD-digits (and paired metrics) after sampling.")] = True,
    record_trajectory: Annotated[bool, typer.Option(
        "--record-trajectory/--no-record-trajectory",
        help="Store every state in the chunks (per-step MSE against a reference that did the same).")] = False,
    assemble: Annotated[bool, typer.Option("--assemble/--no-assemble",
                                           help="Write samples.safetensors with all images (rank 0).")] = True,
    labels: Labels = None,
    null_class: NullClass = None,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Class-conditional models: classifier-free guidance against the null class (default: the artefact "
             "recipe's, the scale its corrections were fitted at; for an FP folder 1, the shipped DiT's own).")
    ] = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Annotated[str, typer.Option(help="auto (cuda:LOCAL_RANK when CUDA is available), cpu or cuda.")
                      ] = "auto",
    verbose: Verbose = False,
) -> None:
    """Sample N images split over the torchrun processes (chunks written atomically, resumable), then metrics.
    A class-conditional model samples labels from (seed, index) (--labels), guided as --guidance-scale says; a
    latent one (a DiT folder) stores latents in the chunks and is measured on the images its VAE decodes."""
    from tadq.names import check_eta

    setup(verbose, threads)
    with fail_cleanly():  # before the model is loaded (sample_sharded checked them after it, by its parameters'
        # names), and before torch is imported
        check_sampling_flags(num_samples=num_samples, batch_size=batch_size, seed=seed)
        check_count_flags(steps=steps)
        if eta is not None:  # SamplerConfig checks it again, with the model's kind when --sampler is not given
            check_eta(eta, sampler)
        if chunk_size < 0:
            raise ValueError(f"--chunk-size must be >= 0 (0: the batch size), got {chunk_size}")
        if metrics and num_samples < 2:
            raise ValueError(f"--num-samples {num_samples}: FD-digits needs at least 2 samples; pass --no-metrics")
    torch_setup(threads)  # threads; the device is resolved per rank below
    from tadq.cli.sample import class_conditioning
    from tadq.distributed import ShardedRun, distributed_world, sample_sharded, sharded_metrics
    from tadq.distributed.metrics import check_metrics_fit, check_reference_noise
    from tadq.evaluation import check_evaluation_seed, decoded_shape
    from tadq.fsguard import check_output_dir
    from tadq.registry import adapter_for
    from tadq.utils import atomic_write_json
    from tadq.zoo.paths import shipped_model_path

    if not verbose:
        logging.getLogger("tadq.sampling.loop").setLevel(logging.WARNING)  # one line per chunk would bury the bar
    with fail_cleanly(), distributed_world(device) as world:
        if not world.is_main:
            logging.getLogger("tadq").setLevel(logging.WARNING)
        if model_dir is not None and is_prompt_pipeline(model_dir):  # before anything is written or sampled
            raise ValueError(f"{model_dir} is a text-to-image pipeline: sample-sharded takes no prompts; use tadq "
                             "sample --prompt (or tadq run --model with --calib-prompts/--eval-prompts)")
        # an artefact's own deployment sampler unless flags change it; fitted tables for another grid refused here
        sampler_config = deployment_sampler(model_dir, sampler, steps, eta)
        check_output_dir(out_dir, kind="sample-sharded", what="--out-dir", resume=True, force_foreign=force_foreign,
                         inputs=[model_dir if model_dir is not None else shipped_model_path()])
        if world.is_main:  # the ranks of one job write the folder together: one lock, the job's
            hold_output(out_dir, "--out-dir")
        if reference_dir is not None:  # its own words for a wrong path, not "has no manifest.json"
            if not reference_dir.exists():
                raise FileNotFoundError(f"--reference-dir {reference_dir} does not exist")
            if not reference_dir.is_dir():
                raise NotADirectoryError(f"--reference-dir {reference_dir} is a file; give a sample-sharded run "
                                         "folder")
            if reference_dir.resolve() == out_dir.resolve():  # compared with itself: PSNR 100, agreement 1
                raise ValueError(f"--reference-dir {reference_dir} is the --out-dir itself; the run would be compared "
                                 "with its own samples. Give the FP model's run folder")
        reference = ShardedRun.open(reference_dir) if reference_dir is not None else None
        denoiser, scheduler, label = load_denoiser(model_dir)
        shape = getattr(denoiser, "sample_shape", None) or adapter_for(denoiser).sample_shape(denoiser)
        # labels from (seed, index) and the guidance of a class-conditional model (none for an unconditional one),
        # the VAE of a latent one; every rank draws the same labels for an index
        conditions, scale, decoder = class_conditioning(
            denoiser, model_dir if model_dir is not None else shipped_model_path(), num_samples, class_label=None,
            labels=labels, null_class=null_class, guidance_scale=guidance_scale, device=world.device, dtype=None,
            command="sample-sharded")
        if metrics:  # colour, or a size without real digits: refused before any chunk, as sharded_metrics would after
            check_metrics_fit(decoded_shape(shape, decoder))
            check_evaluation_seed(denoiser, seed, "--seed")  # measured on its calibration noise (--no-metrics: taken)
        if metrics and reference is not None:  # another noise is refused now, not after the whole run
            check_reference_noise(reference, seed=seed, sampler=sampler_config, sample_shape=shape,
                                  num_samples=num_samples, conditions=conditions, guidance_scale=scale)
            world.on_main(lambda: reference.check_chunks(num_samples))  # a damaged chunk: now, not after sampling
        report = sample_sharded(denoiser, scheduler, sampler_config, num_samples=num_samples, seed=seed,
                                out_dir=out_dir, batch_size=batch_size, chunk_size=chunk_size or batch_size,
                                record_trajectory=record_trajectory, world=world, label=label, assemble=assemble,
                                conditions=conditions, guidance_scale=scale)
        if world.is_main:  # an earlier run's metrics.json was deleted by sample_sharded, once its checks passed
            console.print(f"{out_dir}: {num_samples} samples of {label} ({len(report.reused)} chunks reused, "
                          f"{world.world_size} process{'es' if world.world_size > 1 else ''})")
        if metrics:
            result = sharded_metrics(report.run, reference=reference, world=world, decoder=decoder)
            if world.is_main:
                payload = {"metrics": result.to_dict(), "model": label, "sampler_key": sampler_config.key,
                           "seed": seed, "reference": str(reference_dir) if reference_dir else None,
                           "labels": None if conditions is None else conditions.key, "guidance_scale": scale}
                atomic_write_json(payload, out_dir / METRICS_NAME)
                _print_metrics(result, f"tadq sample-sharded: {label}, {sampler_config.key}, seed {seed}")
                console.print(f"wrote {out_dir / METRICS_NAME}")
