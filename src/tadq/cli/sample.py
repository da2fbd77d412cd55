"""``tadq sample``: draw samples from a quantized artefact or from a plain diffusers model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from diffusers import SchedulerMixin
from torch import nn

from tadq.cli.common import console, fail_cleanly, setup

__all__ = ["sample_command", "load_denoiser", "SamplerKind", "Steps", "Eta", "Threads", "Device", "Verbose"]

SamplerKind = Annotated[str, typer.Option("--sampler", help="Sampler kind: ddim or ddpm.")]
Steps = Annotated[int, typer.Option(help="Sampler steps.")]
Eta = Annotated[float, typer.Option(help="DDIM eta (0 = deterministic; must be 0 for ddpm).")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")]
Device = Annotated[str, typer.Option(help="Device (only cpu is supported in this release).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


def load_denoiser(path: Path | None) -> tuple[nn.Module, SchedulerMixin, str]:
    """(denoiser, training scheduler, label): a tadq artefact when ``path`` has ``tadq_config.json``, else FP.

    One loader for both kinds, so every command that samples accepts either folder.
    """
    from tadq.io import is_quantized_artefact, load_quantized
    from tadq.models import load_pipeline_parts

    if path is not None and is_quantized_artefact(path):
        qmodel, scheduler = load_quantized(path)
        if scheduler is None:
            raise ValueError(f"{path} was saved without a scheduler; save it again with the model's training "
                             "scheduler (QuantizedDenoiser.save_pretrained(dir, scheduler))")
        return qmodel, scheduler, f"{qmodel.config.label} {qmodel.config.method}"
    model, scheduler = load_pipeline_parts(path)
    return model, scheduler, "FP"


def sample_command(
    model_dir: Annotated[Path | None, typer.Argument(
        help="A tadq artefact (`tadq quantize --out`) or a diffusers folder (default: the shipped FP model).")] = None,
    num_samples: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    seed: Annotated[int, typer.Option(help="Noise seed (sample i's noise depends only on the seed and i).")] = 1000,
    sampler: SamplerKind = "ddim",
    steps: Steps = 50,
    eta: Eta = 0.0,
    batch_size: Annotated[int, typer.Option(help="Samples per denoiser call (speed only).")] = 128,
    out: Annotated[Path, typer.Option(help="PNG grid of the samples.")] = Path("samples.png"),
    tensor_out: Annotated[Path | None, typer.Option(help="Also save the samples (N, C, H, W) as a .pt file.")] = None,
    threads: Threads = 0,
    device: Device = "cpu",
    verbose: Verbose = False,
) -> None:
    """Sample a quantized artefact (or an FP model folder) with tadq's loop; writes a PNG grid."""
    from tadq.api import sample
    from tadq.config import config_to_dict
    from tadq.report import save_comparison_grid
    from tadq.sampling import SamplerConfig
    from tadq.utils import atomic_torch_save

    setup(verbose, threads, device)
    with fail_cleanly():
        sampler_config = SamplerConfig(kind=sampler, num_steps=steps, eta=eta)
        denoiser, scheduler, label = load_denoiser(model_dir)
        result = sample(denoiser, scheduler, sampler_config, num_samples=num_samples, seed=seed,
                        batch_size=batch_size)
    save_comparison_grid({f"{label} · {sampler_config.key} · seed {seed}": result.images}, out)
    console.print(f"wrote {out} ({num_samples} samples, {label})")
    if tensor_out is not None:
        atomic_torch_save({"images": result.images, "indices": result.indices, "seed": seed,
                           "sampler": config_to_dict(sampler_config), "model": str(model_dir or "shipped")},
                          tensor_out)
        console.print(f"wrote {tensor_out}")
