"""The main job (``tadq run``): FP and quantized variants of one model from the same noise, measured side by side.

Every variant ("cell") is sampled from the same evaluation seed as the FP reference, so PSNR/SSIM/agreement and
the per-step trajectory error compare the same initial noise. Calibration uses a different seed. Each finished
cell is written atomically to ``out_dir/cells`` and reused on a rerun with the same settings, so an interrupted
run loses at most the cell in progress.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tadq.api import sample
from tadq.calibration import collect_calibration_set, model_fingerprint
from tadq.config import DEFAULT_FP_LAYERS, CalibrationConfig, ReconstructionConfig, config_to_dict, fp_layer_roles
from tadq.corrections.plots import save_correction_tables_plot
from tadq.corrections.ptqd.plots import save_ptqd_tables_plot
from tadq.device import place_model, resolve_device, resolve_dtype
from tadq.evaluation import QualityMetrics, quality_metrics
from tadq.experiments.rows import BaseModels, Variant, method_names, resolve_row, row_for
from tadq.experiments.rows.peers import check_peer_row
from tadq.experiments.run_checks import RUN_FIELDS, RUN_FLAGS, check_method_names, check_run_numbers
from tadq.experiments.workload import Workload, load_workload, resolve_model_path
from tadq.fsguard import is_tadq_file, mark_output
from tadq.metrics import per_step_mse
from tadq.metrics.features import DigitsFeatureSpace, FeatureSpace, PhotosFeatureSpace
from tadq.metrics.frechet import rank_deficiency_note
from tadq.quant.qscheme import preset_key
from tadq.registry import adapter_for
from tadq.report import dumps_json, markdown_table, save_comparison_grid, save_error_curves
from tadq.safefiles import DamagedFileError, load_checked, nonfinite_count, save_checked
from tadq.sampling import SamplerConfig
from tadq.utils import atomic_write_text, library_versions

__all__ = ["RunConfig", "RUN_FIELDS", "RUN_FLAGS", "check_run_numbers", "CELL_SUFFIX", "REPORT_FILES",
           "HEADLINE_METHODS", "HEADLINE_SAMPLES", "PreparedJob",
           "cell_key", "load_cell", "save_cell", "default_variants", "job_rows", "prepare_job", "run_cell",
           "run_main_job", "write_report"]

logger = logging.getLogger(__name__)

# The headline job (``make run``): the default presets, each one's naive-PTQ baseline against its measured best row
# (``tadq.experiments.rows.best``), at 256 samples (PSNR/SSIM vs FP hold there; FD-digits needs about 1000 and
# reads high for every row, FP included). The complete matrix is ``make bench-full``.
HEADLINE_METHODS: tuple[str, ...] = ("naive", "best")
HEADLINE_SAMPLES = 256

@dataclass(frozen=True)
class RunConfig:
    """Settings of the main job.

    Args:
        model: a local diffusers folder, or a shipped model's name (``digits``, ``t2i``); ``None``: ``digits``.
        presets: quantization presets to compare.
        methods: quantization methods, one row per (method, preset): ``naive`` (calibrated ranges only) and
            ``qdiffusion`` (block reconstruction + split shortcuts + attention matmul quantization) and ``ptqd``
            (PTQD fitted on the very same Q-Diffusion model, for the deployment sampler), any other row of
            ``tadq.experiments.rows``, or ``best``: each preset's measured best row (``job_rows`` resolves it).
        reconstruction: reconstruction settings of the ``qdiffusion`` rows.
        num_samples: samples per variant (FD needs ≥ 1000 to mean something; PSNR far fewer).
        sampler: the deployment sampler (default DDIM 50, η = 0).
        eval_seed: noise seed of the evaluation samples (FP and every variant share it).
        calibration: calibration data settings; its seed must differ from ``eval_seed``.
        batch_size: sampling batch.
        out_dir: report folder.
        cache_dir: calibration-data cache.
        grid_samples: samples shown per grid panel.
        device: where every model runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``); checked before any work.
        dtype: compute dtype of the FP model (float32, bfloat16, float16).
        guidance_scale: classifier-free guidance of calibration, fits and evaluation (conditional models); ``None``:
            the model's default (the shipped text-to-image model's recorded scale, 1 otherwise).
        calibration_prompts: prompts of the calibration runs (text-to-image folders; the shipped ``t2i`` model
            brings its own).
        evaluation_prompts: prompts of the evaluation samples, disjoint from ``calibration_prompts``.
        negative_prompt: the unconditional branch's prompt.
        distilled_guidance: the scale a Flux transformer embeds (``None``: the pipeline's default, 3.5).
        labels: class-conditional models: ``"null"`` (every sample unconditional, with the null class) or
            ``"random"`` (labels drawn from (seed, i)); ``None``: the model's default (the shipped photos model:
            ``"null"``; a user's: ``"random"``).
        null_class: the class-conditional model's "no class" label (known for the shipped photos model).
        fp_layers: layers every row keeps in floating point, a key of ``FP_LAYER_PRESETS`` (``first_last``, the
            default: the input and output convs in FP, the later papers' convention, which W8A8 needs on the photos,
            docs/methods/qdiffusion.md#what-limits-w8a8; ``none``: every conv/linear quantized, Q-Diffusion's code).
            Peer rows leave the same layers to float (their tools' own exclusion options).
    """

    model: str | None = None
    presets: tuple[str, ...] = ("W8A8", "W4A8", "W4A4")
    methods: tuple[str, ...] = ("naive", "qdiffusion", "ptqd")
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    num_samples: int = 1000
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(kind="ddim", num_steps=50, eta=0.0))
    eval_seed: int = 1000
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    batch_size: int = 250
    out_dir: str = "runs/main"
    cache_dir: str = ".cache/tadq"
    grid_samples: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    guidance_scale: float | None = None
    calibration_prompts: tuple[str, ...] = ()
    evaluation_prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    labels: str | None = None
    null_class: int | None = None
    fp_layers: str = DEFAULT_FP_LAYERS
    distilled_guidance: float | None = None

    def __post_init__(self) -> None:
        resolve_device(self.device)  # a device torch lacks fails here, named
        resolve_dtype(self.dtype)
        if not self.presets or not self.methods:
            raise ValueError("a run needs at least one preset and one method (--presets, --methods); FP alone is "
                             "every run's first row")
        # each name as the preset table spells it (ValueError naming the presets): rows, files and the measured best
        # rows are keyed by it, and " w4a8" passed the check, stored as given
        object.__setattr__(self, "presets", tuple(preset_key(name) for name in self.presets))
        check_method_names(self.methods, method_names())
        fp_layer_roles(self.fp_layers)  # an unknown key fails here, named (the peer rows keep the same layers)
        job_rows(self)  # ``best`` at a preset without a measured best fails here, before any work
        check_run_numbers(num_samples=self.num_samples, batch_size=self.batch_size, eval_seed=self.eval_seed,
                          calibration_seed=self.calibration.seed, evaluation_prompts=self.evaluation_prompts)
        if self.calibration.sampler != self.sampler:
            raise ValueError("calibration.sampler must be the deployment sampler (set both to the same SamplerConfig)")
        self._check_rows_apart_from_eval_seed()

    def _check_rows_apart_from_eval_seed(self) -> None:
        """A row's held-out selection seed (calibration seed + 100000 for PTQD/TAC/TCEC choices) must not be the
        evaluation seed either: the row's settings were then chosen on the noise it is scored on."""
        from tadq.experiments.rows.recipes import RECIPE_ROWS, recipes_for_row

        for row, name in job_rows(self):
            if row not in RECIPE_ROWS:
                continue
            seeds = recipes_for_row(row, name, self).noise_seeds()
            used = [where for where, seed in seeds.items() if seed == self.eval_seed]
            if used:
                raise ValueError(f"eval_seed {self.eval_seed} is the {', '.join(used)} of row {row} at {name}: its "
                                 "fit or choice would be scored on its own noise; choose another eval seed")


def cell_key(fingerprint: str, config: RunConfig, variant: Variant, workload: Workload | None = None) -> str:
    """What a cell's samples are a function of (``fingerprint``: ``model_fingerprint`` of the placed FP model, so
    its weights, config and dtype); a finished cell is reused only under the same key."""
    payload = {
        "model": fingerprint, "variant": variant.settings, "num_samples": config.num_samples,
        "sampler": config_to_dict(config.sampler), "eval_seed": config.eval_seed,
        "calibration": config_to_dict(config.calibration),
        # the sampling batch moves quantized samples (float re-association flips fake-quant roundings; README); a
        # batch above the sample count runs as one batch of them all, so 250 and 256 at 64 samples share their cells
        "batch_size": min(config.batch_size, config.num_samples),
        # so do the device's kernels: a CUDA run's cells are not a CPU run's (its FP row would not be a reference)
        "device": resolve_device(config.device).type,
    }
    if workload is not None and workload.settings:  # prompts and guidance (absent for unconditional models)
        payload["workload"] = workload.settings
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


CELL_SUFFIX = ".safetensors"
REPORT_FILES = ("results.json", "results.md")  # written last by write_report: a folder with them is whole
_CELL_TENSORS = ("images", "states")


def save_cell(cell: dict[str, Any], path: Path) -> None:
    """Images and states as tensors, everything else as JSON metadata: loading executes nothing (no pickle)."""
    meta = {name: value for name, value in cell.items() if name not in _CELL_TENSORS}
    save_checked({name: cell[name] for name in _CELL_TENSORS}, {"kind": "tadq-run-cell", **meta}, path)


def load_cell(path: Path) -> dict[str, Any]:
    """A cell written by ``save_cell``; ``DamagedFileError`` naming the file for any damage or foreign file."""
    tensors, meta = load_checked(path, "run cell")
    if not isinstance(meta, dict) or meta.get("kind") != "tadq-run-cell" or set(tensors) != set(_CELL_TENSORS):
        raise DamagedFileError(f"run cell {path} is not a tadq run cell; delete it to recompute the cell")
    meta = {name: value for name, value in meta.items() if name != "kind"}
    return {**meta, **tensors}


def run_cell(workload: Workload, config: RunConfig, variant: Variant, path: Path, key: str,
             components: dict[str, str] | None = None) -> dict[str, Any]:
    """Sample one variant from the evaluation seed (and prompts), or reuse its finished cell; a latent model's
    cell keeps the decoded images and the latent trajectory.

    ``components`` (``Workload.components``) are recorded in the cell; a cell recording others (the folder's
    scheduler or VAE was replaced since) is recomputed. Cells written before they were recorded are reused on
    their key alone."""
    components = workload.components() if components is None else components
    if path.exists():
        cell = load_cell(path)
        recorded = cell.get("components")
        if cell.get("key") == key and recorded in (None, components):
            logger.info("reusing finished cell %s", path.name)
            return cell
        logger.info("cell %s was written for other settings (key %s%s); recomputing it", path.name, cell.get("key"),
                    "" if recorded in (None, components) else f", components {recorded}")
    t0 = time.perf_counter()
    denoiser = variant.build() if variant.build is not None else workload.model
    setup_s = time.perf_counter() - t0 + getattr(denoiser, "recorded_quantize_s", 0.0)
    t1 = time.perf_counter()
    result = sample(denoiser, workload.scheduler, config.sampler, num_samples=config.num_samples,
                    seed=config.eval_seed, batch_size=config.batch_size, record_trajectory=True,
                    conditions=workload.evaluation_conditions, guidance_scale=workload.guidance_scale)
    cell = {
        "key": key, "name": variant.name, "bits": variant.bits, "settings": variant.settings,
        "images": workload.images(result.images), "states": result.trajectory.states, "setup_s": setup_s,
        "sampling_s": time.perf_counter() - t1,
        "extras": variant.describe(denoiser) if variant.describe is not None else {},
        "components": components,
    }
    save_cell(cell, path)
    return cell


def _diverged_metrics(features: FeatureSpace | None, expected_labels) -> QualityMetrics:
    """A variant whose samples hold NaN or Inf: every quality number it would have is NaN (shown as "NaN"), so one
    diverged row does not cost the rest of the table; ``diverged`` in its row says how many samples."""
    nan = float("nan")
    labelled = nan if features is not None else None
    return QualityMetrics(fd=labelled, agreement=labelled, psnr=nan, ssim=nan, final_mse=nan,
                          fd_key=features.metric_key if features is not None else "fd",
                          prompt_accuracy=nan if expected_labels is not None else None)


def _metrics(cell: dict, fp: dict, features: FeatureSpace | None, expected_labels=None) -> dict[str, Any]:
    if bad := nonfinite_count(cell["images"]):
        if cell is fp:
            raise ValueError(f"the FP model produced {bad} non-finite samples of {len(cell['images'])}: nothing can "
                             "be measured against it (check the model's weights, dtype and sampler)")
        logger.warning("%s %s diverged: %d of %d samples hold NaN or Inf", cell["name"], cell["bits"], bad,
                       len(cell["images"]))
        quality = _diverged_metrics(features, expected_labels)
        diverged = {"diverged": f"{bad} of {len(cell['images'])} samples hold NaN or Inf"}
    else:
        quality = quality_metrics(cell["images"], cell["states"], fp["images"], fp["states"], features,
                                  expected_labels)
        diverged = {}
    metrics = quality.to_dict()
    fd = metrics.pop(quality.fd_key)
    metrics["fd_digits" if features is None else quality.fd_key] = fd  # its column; "–" when not computed
    return {
        "method": cell["name"], "bits": cell["bits"], **metrics,
        "wall_s": cell["setup_s"] + cell["sampling_s"], "setup_s": cell["setup_s"], "sampling_s": cell["sampling_s"],
        **diverged,
    }


def job_rows(config: RunConfig) -> list[tuple[str, str]]:
    """The (row, preset) pairs the job builds after FP, in table order (method-major), with ``best`` resolved to
    the row it stands for at each preset, each pair once (``--methods tac,best`` at W8A8, or a name given twice,
    put the very same cell in the table, the figures and the per-preset plots once per copy); ``ValueError`` where
    ``best`` has no measured row."""
    pairs = [(resolve_row(method, name), name) for method in config.methods for name in config.presets]
    return list(dict.fromkeys(pairs))


def default_variants(config: RunConfig, bases: BaseModels) -> list[Variant]:
    """FP plus one row per (method, preset), built by the method registry (``tadq.experiments.rows``)."""
    variants = [Variant("FP", "W32A32", None, {"method": "fp"})]
    for row, name in job_rows(config):
        variants.append(row_for(row, bases, config, name))
    return variants


@dataclass(frozen=True)
class PreparedJob:
    """What every row of a job shares: the run config (guidance resolved), the workload, the model's fingerprint
    and the quantized base networks (built on the job's calibration data)."""

    config: RunConfig
    workload: Workload
    fingerprint: str
    bases: BaseModels
    components: dict[str, str]


def base_pipeline_source(folder: Path, workload: Workload) -> Path | None:
    """The pipeline folder whose other components the saved base models keep: one with a ``model_index.json``
    whose samples need more than the denoiser (a decoder, or prompts / labels), as ``tadq quantize`` keeps them;
    ``None`` for a pixel-space unconditional model (a denoiser-only artefact samples as it is). Checked before any
    calibration: a folder whose components cannot be copied (a broken link) or whose denoiser config differs from
    the model's keeps the bases denoiser-only, with a warning (the run itself needs neither)."""
    from tadq.io.save import check_copyable_components, source_mismatch

    if not (folder / "model_index.json").is_file():
        return None
    if workload.decoder is None and workload.calibration_conditions is None:
        return None
    try:
        check_copyable_components(folder)
        reason = source_mismatch(workload.model, folder)
    except OSError as error:
        reason = str(error).splitlines()[0]
    if reason is not None:
        logger.warning("the base models are saved without %s's other components (%s): sample them with the "
                       "pipeline's VAE and encoders yourself", folder, reason)
        return None
    return folder


def prepare_job(config: RunConfig, models_folder: Path) -> PreparedJob:
    """Load the workload (checked before anything is written), place the model, record calibration data with the
    calibration seed (and prompts, at the job's guidance scale)."""
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    workload = load_workload(config.model, guidance_scale=config.guidance_scale,
                             calibration_prompts=config.calibration_prompts,
                             evaluation_prompts=config.evaluation_prompts, negative_prompt=config.negative_prompt,
                             distilled_guidance=config.distilled_guidance,
                             labels=config.labels, null_class=config.null_class, device=device, dtype=dtype)
    model = place_model(workload.model, device, dtype)
    workload = dataclasses.replace(workload, model=model)
    if workload.sampler_for is not None and (sampler := workload.sampler_for(config.sampler)) != config.sampler:
        logger.info("sampler %s: the pipeline's own flow grid and shift", sampler.key)
        config = dataclasses.replace(config, sampler=sampler,
                                     calibration=dataclasses.replace(config.calibration, sampler=sampler))
    if workload.features is not None:
        workload.features.check_fits(workload.image_shape(), "the model's images")
    config = dataclasses.replace(config, guidance_scale=workload.guidance_scale)
    fingerprint = model_fingerprint(model)
    logger.info("collecting timestep-aware calibration data (seed %d)", config.calibration.seed)
    calibration = collect_calibration_set(model, adapter_for(model), workload.scheduler.config, config.calibration,
                                          cache_dir=config.cache_dir, conditions=workload.calibration_conditions,
                                          guidance_scale=workload.guidance_scale)
    bases = BaseModels(model, workload.scheduler, calibration, fingerprint, models_folder,
                       conditions=workload.calibration_conditions,
                       pipeline_source=base_pipeline_source(resolve_model_path(config.model), workload))
    return PreparedJob(config, workload, fingerprint, bases, workload.components())


def run_main_job(config: RunConfig) -> dict[str, Any]:
    """Sample, measure and report every variant; returns the results dictionary (also written as JSON)."""
    out = Path(config.out_dir)
    for row, name in job_rows(config):  # a peer row its tool cannot do fails before the model is calibrated
        check_peer_row(row, name)
    job = prepare_job(config, out / "models")
    config, workload = job.config, job.workload
    (out / "cells").mkdir(parents=True, exist_ok=True)
    mark_output(out, "run")  # a later run may refill it (the CLI refuses folders without the marker)
    variants = default_variants(config, job.bases)
    cells = []
    for index, variant in enumerate(variants):
        key = cell_key(job.fingerprint, config, variant, workload)
        logger.info("[%d/%d] %s %s", index + 1, len(variants), variant.name, variant.bits)
        # a finished cell is found by its key alone, so reordering or adding methods reuses it
        done = sorted((out / "cells").glob(f"*-{key}{CELL_SUFFIX}"))
        path = done[0] if done else out / "cells" / f"{index:02d}-{key}{CELL_SUFFIX}"
        cells.append(run_cell(workload, config, variant, path, key, job.components))
    return write_report(config, cells, workload)


def _reconstruction_note(reconstruction) -> str:
    """How this run's Q-Diffusion-based rows rounded their weights (the row labels do not say it)."""
    if reconstruction.rounding == "adaround":
        return (f"Block reconstruction (Q-Diffusion-based rows): AdaRound, {reconstruction.weight_iters} rounding / "
                f"{reconstruction.activation_iters} activation-step iterations per unit.")
    target = (f"the FP layer outputs, target ridge damping {reconstruction.fp_output_damp:g} toward "
              f"{'W' if reconstruction.gptq_target_prior == 'weight' else 'zero'}"
              if reconstruction.gptq_target == "fp_output" else "each layer's own outputs")
    return (f"Block reconstruction (Q-Diffusion-based rows): {reconstruction.rounding} rounding "
            f"(GPTQ onto {target}, {reconstruction.gptq_inputs or 'all'} Hessian inputs"
            + (f", then {reconstruction.weight_iters} AdaRound iterations"
               if reconstruction.rounding == "gptq_adaround" else "")
            + f"), {reconstruction.activation_iters} activation-step iterations per unit.")


def _fp_layers_note(fp_layers: str) -> str:
    """Which layers this run's tadq rows kept in floating point (naive rows included, so rows compare alike)."""
    roles = fp_layer_roles(fp_layers)
    if not roles:
        return "Layers in floating point: none (every conv/linear quantized, fp_layers='none')."
    return (f"Layers in floating point (fp_layers={fp_layers!r}, every row, naive and peers included): the "
            f"{', '.join(roles)} layers, counted at 32 × 32 bits in the bit-operations.")


def _peer_coverage_note(labels: list[str], cells: list[dict]) -> str:
    """What each peer row quantized, measured (its ``PeerReport.summary``): a tool's setting name can promise more
    than it does (quanto's "W8A8" leaves every conv input in floating point), so the table never stands alone."""
    lines = [f"- {label}: {cell['extras']['peer']['summary']}" for label, cell in zip(labels, cells, strict=True)
             if "peer" in cell.get("extras", {})]
    return "Peer coverage (measured):\n" + "\n".join(lines) if lines else ""


def _diverged_note(rows: list[dict[str, Any]]) -> str:
    """Which rows diverged (their quality numbers are NaN), or "" when none did."""
    diverged = [f"{row['method']} {row['bits']} ({row['diverged']})" for row in rows if row.get("diverged")]
    return f"Diverged, their quality numbers NaN: {'; '.join(diverged)}." if diverged else ""


def _fd_note(fd: FeatureSpace | None, num_samples: int) -> str:
    if fd is None:
        return ("FD and class agreement are not computed: the shipped classifiers only read the shipped models' "
                "samples (PSNR, SSIM and trajectory error are).")
    if isinstance(fd, PhotosFeatureSpace):
        note = (f"FD-{fd.name}: Fréchet distance on the shipped {fd.name} classifier's penultimate features, "
                f"{num_samples} samples vs {len(fd.real)} real held-out images. Real-vs-real floor "
                f"({fd.floor_samples} real training images vs the same held-out ones): {fd.floor:.2f}.")
    elif not isinstance(fd, DigitsFeatureSpace):
        floor = f" Real-vs-real floor: {fd.floor:.2f}." if fd.floor is not None else ""
        note = f"FD-{fd.name}: {num_samples} samples vs {len(fd.real)} real images.{floor}"
    else:
        note = (f"FD-digits: Fréchet distance on the shipped digit classifier's penultimate features, {num_samples} "
                f"samples vs the {len(fd.real)} real training digits. Real-vs-real floor (all {fd.heldout_count} "
                f"held-out digits vs the same {len(fd.real)} training digits): {fd.floor:.2f}.")
    rank = rank_deficiency_note(f"FD-{fd.name}", num_samples, fd.feature_width())
    return f"{note} {rank}" if rank else note


def _remove_stale_figures(out: Path, keep: list[Path]) -> None:
    """Delete the optional figures an earlier report in ``out`` drew and this one does not (a rerun with fewer
    presets left ``per_step_error_W4A8.png`` beside a table without W4A8); only PNGs tadq marked as its own."""
    names = {path.name for path in keep}
    for pattern in ("per_step_error_*.png", "ptqd_tables.png", "correction_tables.png"):
        for path in out.glob(pattern):
            if path.name not in names and is_tadq_file(path):
                path.unlink()


def write_report(config: RunConfig, cells: list[dict], workload: Workload) -> dict[str, Any]:
    """Metrics table, JSON, grids and the per-step error plot (image metrics on decoded images, the per-step error
    in the space the sampler walks in)."""
    out = Path(config.out_dir)
    for name in REPORT_FILES:  # an earlier run's table would otherwise sit beside this run's figures until the end:
        (out / name).unlink(missing_ok=True)  # an interrupt while drawing them mixed two runs' results, unsaid
    # FD-digits and agreement only for the shipped digits models: a user's model gets PSNR/SSIM/trajectory error
    # (digit features on another model's samples would be a number without a meaning)
    fd = workload.features
    fp = cells[0]
    expected = (workload.expected_labels(config.eval_seed, config.num_samples)
                if workload.expected_labels is not None else None)
    rows = [_metrics(cell, fp, fd, expected) for cell in cells]
    labels = [f"{c['name']} {c['bits']}" for c in cells]
    shown = config.grid_samples
    save_comparison_grid({label: c["images"][:shown] for label, c in zip(labels, cells, strict=True)},
                         out / "samples.png")
    curves = {
        label: per_step_mse(fp["states"], c["states"]) for label, c in zip(labels, cells, strict=True) if c is not fp
    }
    save_error_curves(curves, out / "per_step_error.png", title=f"{config.sampler.key}: MSE(x_t FP, x_t quantized)")
    presets = sorted({c["bits"] for c in cells if c is not fp})
    optional: list[Path] = []  # the figures only some reports draw, written by this one
    if len(presets) > 1:  # one readable figure per bit-width as well: how each method bends the curve
        for bits in presets:
            subset = {label: curve for label, curve in curves.items() if label.endswith(f" {bits}")}
            optional.append(out / f"per_step_error_{bits}.png")
            save_error_curves(subset, optional[-1], title=f"{bits}, {config.sampler.key}: MSE(x_t FP, x_t quantized)",
                              reference=f"Q-Diffusion {bits}")
    ptqd = {label: c["extras"]["ptqd_tables"] for label, c in zip(labels, cells, strict=True)
            if "ptqd_tables" in c.get("extras", {})}
    if ptqd:
        optional.append(out / "ptqd_tables.png")
        save_ptqd_tables_plot(ptqd, optional[-1])
    corrections = {label: c["extras"]["correction_tables"] for label, c in zip(labels, cells, strict=True)
                   if c.get("extras", {}).get("correction_tables")}
    if corrections:
        optional.append(out / "correction_tables.png")
        save_correction_tables_plot(corrections, optional[-1])
    _remove_stale_figures(out, keep=optional)
    results = {
        "rows": rows,
        "per_step_mse": {label: curve.tolist() for label, curve in curves.items()},
        "extras": {label: c.get("extras", {}) for label, c in zip(labels, cells, strict=True) if c.get("extras")},
        "fd_digits_real_vs_real": fd.floor if isinstance(fd, DigitsFeatureSpace) else None,
        "fd_real_vs_real": fd.floor if fd is not None else None,
        "notes": {
            "fd": _fd_note(fd, config.num_samples),
            "fake_quant": "Quantized variants are fake-quantized (simulated on FP hardware): wall time measures "
                          "simulation cost, not deployment speed.",
            "reconstruction": _reconstruction_note(config.reconstruction),
            "fp_layers": _fp_layers_note(config.fp_layers),
            "peers": _peer_coverage_note(labels, cells),
            "diverged": _diverged_note(rows),
        },
        # which cells of ``cells/`` are this report's: a rerun with other settings keeps the earlier run's cells
        # beside them (reused when the settings come back), and readers of the folder must not mix the two
        "cell_keys": keys if None not in (keys := [cell.get("key") for cell in cells]) else None,
        "config": {"sampler": config_to_dict(config.sampler), "calibration": config_to_dict(config.calibration),
                   "num_samples": config.num_samples, "eval_seed": config.eval_seed, "fp_layers": config.fp_layers,
                   "model": workload.name, "workload": workload.settings},
        "versions": library_versions(),
    }
    atomic_write_text(dumps_json(results), out / "results.json")  # strict JSON: a diverged row's NaN is null
    table = markdown_table(rows)
    notes = results["notes"]
    atomic_write_text(f"{table}\n\n{notes['fd']}\n{notes['fake_quant']}\n{notes['reconstruction']}\n"
                      f"{notes['fp_layers']}\n" + "".join(f"{notes[key]}\n" for key in ("peers", "diverged")
                                                          if notes[key]),
                      out / "results.md")
    return results
