"""What every benchmark script shares: flags, the shipped model at DDIM 50, its cached calibration data, and
writing results as JSON + a Markdown table."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from arguments import add_force_foreign_flag, count, count_or_zero, evaluation_seed, output_folder

from tadq.calibration import CalibrationSet, collect_calibration_set
from tadq.config import CalibrationConfig
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text


def add_common_flags(parser: argparse.ArgumentParser, samples: int, out: str) -> None:
    parser.add_argument("--samples", type=count, default=samples, help="samples per point (same noise for all)")
    parser.add_argument("--seed", type=evaluation_seed, default=1000,
                        help="evaluation noise seed (not the calibration seed, 0)")
    parser.add_argument("--threads", type=count_or_zero, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", default=out)
    add_force_foreign_flag(parser)


SETTINGS = ("main-table", "defaults")


def add_setting_flag(parser: argparse.ArgumentParser) -> None:
    """``--setting``: which ``tadq run`` setting a benchmark over the main job's models uses."""
    parser.add_argument("--setting", choices=SETTINGS, default="main-table",
                        help="main-table: the main table's setting (docs/results/digits.md) these benchmarks were "
                             "measured with (AdaRound 1000/400, every layer quantized); defaults: tadq run's "
                             "defaults now (GPTQ, first and last layers in float)")


def run_config_for(setting: str, **fields):
    """The ``RunConfig`` of ``setting`` (``SETTINGS``) with ``fields`` on top."""
    from tadq.experiments.rows.recipes import README_TABLES_RECONSTRUCTION
    from tadq.experiments.run import RunConfig

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
    if setting == "main-table":
        fields = {"reconstruction": README_TABLES_RECONSTRUCTION, "fp_layers": "none", **fields}
    return RunConfig(**fields)


@dataclass
class Setup:
    model: torch.nn.Module
    scheduler: object
    sampler: SamplerConfig
    calibration: CalibrationConfig
    calib: CalibrationSet
    out: Path


def shipped_setup(args: argparse.Namespace, model_path: str | None = None) -> Setup:
    """The model (shipped unless ``model_path``), DDIM 50 η = 0, and its calibration data (cached in .cache/tadq)."""
    out = output_folder(args.out, force_foreign=args.force_foreign)  # before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    model, scheduler = load_pipeline_parts(model_path)
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration, cache_dir=".cache/tadq",
                                    progress=False)
    return Setup(model, scheduler, sampler, calibration, calib, out)


def write_rows(rows: list[dict], out: Path, header: str, line) -> None:
    """``results.json`` (all fields) and ``results.md`` (``header`` + ``line(row)`` per row); printed too."""
    atomic_write_text(json.dumps(rows, indent=2), out / "results.json")
    columns = header.count("|") - 1
    lines = [header, "|" + "---|" * columns, *(line(r) for r in rows)]
    atomic_write_text("\n".join(lines) + "\n", out / "results.md")
    print("\n".join(lines))


def main_run_setup(args: argparse.Namespace):
    """(out, RunConfig of ``args.setting``, model, scheduler, BaseModels over ``args.models``): the shipped model with
    the main job's calibration data and base models, so a benchmark measures exactly the models ``tadq run``
    reports (``--setting main-table``, the default: the main table's, docs/results/digits.md)."""
    from tadq.calibration import model_fingerprint
    from tadq.experiments.rows import BaseModels

    out = output_folder(args.out, force_foreign=args.force_foreign)  # before any work
    if args.threads:
        torch.set_num_threads(args.threads)
    config = run_config_for(getattr(args, "setting", "main-table"))
    model, scheduler = load_pipeline_parts(None)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, config.calibration,
                                    cache_dir=config.cache_dir, progress=False)
    bases = BaseModels(model, scheduler, calib, model_fingerprint(model), Path(args.models))
    return out, config, model, scheduler, bases


def probe_calibration(workload) -> tuple[SamplerConfig, CalibrationConfig, CalibrationSet]:
    """The diagnosis benchmarks' smaller calibration of a ``load_workload`` workload: DDIM 50 η = 0, 64 FP
    trajectories, 25 of the 50 steps × 32 inputs, seed 0, the workload's calibration conditions and guidance (cached
    in .cache/tadq); (sampler, config, set). Quantize from it with ``deployed`` (a guided set is refused against a
    bare ``QuantConfig``, which has no guidance scale)."""
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=64, num_steps_kept=25, samples_per_step=32,
                                    seed=0)
    data = collect_calibration_set(workload.model, adapter_for(workload.model), workload.scheduler.config,
                                   calibration, cache_dir=".cache/tadq", conditions=workload.calibration_conditions,
                                   guidance_scale=workload.guidance_scale)
    return sampler, calibration, data


def deployed(config, workload, sampler: SamplerConfig | None = None):
    """``config`` (a ``QuantConfig``) as the ``Recipe`` that deploys it with ``sampler`` (default: its calibration
    sampler) at the workload's guidance scale: what ``tadq run`` calibrates and fits a guided model with. For an
    unguided workload it is the recipe ``tadq.quantize`` derives from the bare config itself."""
    from tadq.recipe import Deployment, Recipe

    sampler = config.calibration.sampler if sampler is None else sampler
    return Recipe.from_quant_config(config, deployments=(Deployment(sampler, workload.guidance_scale),))


def evaluation_images(workload, model, sampler: SamplerConfig, num_samples: int, seed: int = 1000,
                      batch_size: int = 128) -> torch.Tensor:
    """``model``'s evaluation samples as images in [-1, 1]: from ``seed`` with the workload's evaluation conditions
    (labels, prompts; disjoint from the calibration ones) and guidance scale, decoded by its VAE for a latent model
    (an image metric on latents measures the wrong space). The FP reference and every quantized model go through
    this same call, so a PSNR between them compares like with like."""
    from tadq import api

    samples = api.sample(model, workload.scheduler, sampler, num_samples=num_samples, seed=seed,
                         batch_size=batch_size, conditions=workload.evaluation_conditions,
                         guidance_scale=workload.guidance_scale, progress=False).images
    return workload.images(samples).clamp(-1, 1)


def unit_summary(qmodel) -> dict:
    """The GPTQ / reconstruction units' verdicts of ``qmodel``: how many kept nearest rounding (the guard rejected
    their own rounding) and their summed unit loss against nearest; empty when nothing was reconstructed."""
    reports = getattr(qmodel, "reconstruction_report", None) or []
    if not reports:
        return {}
    return {"units": len(reports), "kept_nearest": sum(r.guard_rejected for r in reports),
            "loss_vs_nearest": round(sum(r.loss_after for r in reports) / sum(r.loss_before for r in reports), 4)}


def save_naive_ptq(workload, presets: list[str], folder: Path, cache_dir: str, announce=None,
                   overwrite: bool = False) -> dict[str, int]:
    """Each preset quantized by naive PTQ from one calibration set (the W8A8 preset's calibration config, which every
    preset shares today) and saved as ``folder/PRESET``: the speed benchmarks' models. Returns the weight bytes of
    each artefact; ``announce(preset)`` is called before each quantization (progress lines); ``overwrite`` replaces
    an earlier artefact there (never a folder tadq did not write: ``save_pretrained`` refuses it)."""
    import tadq

    fp32, scheduler = workload.model, workload.scheduler
    calibration = collect_calibration_set(fp32, adapter_for(fp32), scheduler.config,
                                          tadq.QuantConfig.from_preset("W8A8").calibration, cache_dir=cache_dir,
                                          progress=False, conditions=workload.calibration_conditions,
                                          guidance_scale=workload.guidance_scale)
    sizes = {}
    for preset in presets:
        if announce is not None:
            announce(preset)
        # no conditions=: the set carries the workload's conditions and guidance, and naive PTQ fits nothing else
        # (a QuantConfig has no guidance scale, so passing the conditions would compare a guided set against 1.0)
        qmodel = tadq.quantize(fp32, scheduler, tadq.QuantConfig.from_preset(preset), calibration=calibration,
                               progress=False)
        sizes[preset] = qmodel.save_pretrained(folder / preset, scheduler, overwrite=overwrite).weights_bytes
    return sizes
