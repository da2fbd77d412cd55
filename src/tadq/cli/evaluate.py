"""``tadq evaluate``: a quantized artefact against its FP model, sampled from the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

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

__all__ = ["evaluate_command"]

METRIC_COLUMNS = ("method", "bits", "fd_digits", "agreement", "psnr", "ssim", "final_mse")
SHIPPED_FEATURE_NAMES = ("digits", "photos")  # FD-<name> of the shipped classifiers
FEATURE_SPACES = ("auto", "digits", "photos", "none")  # --features names; anything else is a file


def _check_feature_flags(features: str, reference_images: Path | None) -> None:
    """Refuse --features and --reference-images that cannot work before either model is loaded: a name that is
    neither a feature space nor a file ("--features digit") was reported as "a feature extractor file needs
    --reference-images" once both models had been read, and a missing file only when it was opened."""
    if features in FEATURE_SPACES:
        if reference_images is not None:  # it was silently not read
            raise ValueError(f"--reference-images is read by a feature extractor file (--features FILE.pt); with "
                             f"--features {features} it would be ignored")
        return
    if not Path(features).is_file():
        raise FileNotFoundError(f"--features {features} is neither one of {', '.join(FEATURE_SPACES)} nor an existing "
                                "file (a TorchScript feature extractor)")
    if reference_images is None:
        raise ValueError(f"--features {features} (a feature extractor file) needs --reference-images (real images, "
                         "safetensors)")
    if not reference_images.is_file():
        raise FileNotFoundError(f"--reference-images {reference_images} does not exist or is not a file")


def _shipped_features(reference: Path | None) -> str:
    """The feature space ``tadq run`` measures a shipped model in: digits for the default references (the shipped
    digits DDPM or text-to-image model) and the shipped DiT, photos for the shipped photos model; none otherwise."""
    from tadq.experiments.workload import SHIPPED_MODELS

    if reference is None or _same_folder(reference, SHIPPED_MODELS["dit"]()):
        return "digits"
    return "photos" if _same_folder(reference, SHIPPED_MODELS["photos"]()) else "none"


def _feature_space(features: str, reference: Path | None, reference_images: Path | None, resolution: int):
    """The feature space the user chose; ``auto`` is the shipped classifier of a shipped reference (as ``tadq run``
    measures it) and none for any other."""
    from tadq.metrics.features import DigitsFeatureSpace, PhotosFeatureSpace, TorchScriptFeatureSpace

    if reference_images is not None and features in FEATURE_SPACES:  # it was silently not read
        raise typer.BadParameter(f"--reference-images is read by a feature extractor file (--features FILE.pt); "
                                 f"with --features {features} it would be ignored")
    if features == "auto":
        features = _shipped_features(reference)
        if features == "none":
            err_console.print("FD and label agreement not computed: the shipped classifiers read only the shipped "
                              "models' digits and photos (pass --features digits or photos, or --features FILE.pt "
                              "--reference-images FILE)")
    if features == "none":
        return None
    if features == "digits":
        return DigitsFeatureSpace(resolution)
    if features == "photos":
        return PhotosFeatureSpace()
    if reference_images is None:
        raise typer.BadParameter("a feature extractor file needs --reference-images (real images, safetensors)")
    name = Path(features).stem.replace("-", "_")
    if name in SHIPPED_FEATURE_NAMES:  # "FD-digits" is the shipped classifier's; a user's file is not reported as it
        name = f"{name}_custom"
    return TorchScriptFeatureSpace(features, reference_images, name=name)


def _same_folder(path: Path | None, shipped: Path) -> bool:
    return path is not None and path.resolve() == shipped.resolve()


def _prompted_labels(space, conditions, prompts: tuple[str, ...], reference: Path | None, num_samples: int,
                     seed: int):
    """The label each evaluation sample asks for, where a shipped classifier reads it back (prompt agreement, as
    ``tadq run`` measures it): the shipped text-to-image model's digit prompts, the class labels (random or given) of
    the shipped DiT and photos model; ``None`` for every other model, whose prompts or classes mean nothing to the
    shipped classifiers, and for samples of the null class."""
    import torch

    from tadq.experiments.workload import SHIPPED_MODELS
    from tadq.sampling import ClassLabels, RandomClassLabels
    from tadq.zoo.t2i_prompts import digit_of

    if space is None or not space.reads_labels or conditions is None:
        return None
    if prompts:
        if reference is not None and not _same_folder(reference, SHIPPED_MODELS["t2i"]()):
            return None
        try:
            digits = [digit_of(prompt) for prompt in prompts]
        except ValueError as error:
            err_console.print(f"prompt agreement not measured: {error}")
            return None
        return torch.tensor([digits[i % len(digits)] for i in range(num_samples)], dtype=torch.long)
    shipped = any(_same_folder(reference, SHIPPED_MODELS[name]()) for name in ("dit", "photos"))
    if shipped and isinstance(conditions, (RandomClassLabels, ClassLabels)):  # not the null class of --labels null
        return conditions(seed, range(num_samples)).class_labels.cpu()
    return None


def _rows(evaluation, qmodel) -> list[dict[str, Any]]:
    """The FP row and the artefact's, named with its correction stack (a TAC artefact was "tadq qdiffusion") and,
    when it is not the float simulation, the backend that ran it."""
    config, recipe = qmodel.config, getattr(qmodel, "recipe", None)
    method = recipe.describe_method() if recipe is not None else config.method
    backend = getattr(qmodel, "backend", "fake")
    method += "" if backend == "fake" else f" [{backend}]"
    return [
        {"method": "FP", "bits": "W32A32", **evaluation.reference_metrics.to_dict()},
        {"method": f"tadq {method}", "bits": config.label, **evaluation.candidate_metrics.to_dict()},
    ]


def _columns(rows: list[dict[str, Any]], fd_key: str) -> tuple[tuple[str, str], ...]:
    """(key, title) of the metrics evaluate measures, its Fréchet distance under ``fd_key``, and the optional ones
    (Inception FID) the rows have: the printed table and results.md show the same columns (results.md showed an
    empty "FD-digits" with no feature space, and timings evaluate does not take)."""
    from tadq.report.tables import COLUMNS, OPTIONAL_COLUMNS

    titles = {**dict(COLUMNS), fd_key: f"FD-{fd_key.removeprefix('fd_')} ↓" if fd_key != "fd" else "FD ↓"}
    keys = [fd_key if key == "fd_digits" else key for key in METRIC_COLUMNS]
    extra = [column for column in OPTIONAL_COLUMNS if any(row.get(column[0]) is not None for row in rows)]
    at = keys.index("agreement") + 1
    return (*((key, titles[key]) for key in keys[:at]), *extra, *((key, titles[key]) for key in keys[at:]))


def _print_table(rows: list[dict[str, Any]], title: str, fd_key: str) -> None:
    from rich.table import Table

    from tadq.report.tables import format_cell

    columns = _columns(rows, fd_key)
    table = Table(title=title)
    for _, heading in columns:
        table.add_column(heading, justify="right")
    for row in rows:  # as written: the console reads no markup ("tadq Naive [int8]" was printed "tadq Naive")
        table.add_row(*(format_cell(key, row.get(key)) for key, _ in columns))
    console.print(table)


def _write_report(out: Path, rows: list[dict[str, Any]], evaluation, settings: dict[str, Any], fd_key: str) -> None:
    """results.json, results.md, samples.png and per_step_error.png, written only after every metric exists."""
    from tadq.fsguard import mark_output
    from tadq.report import dumps_json, markdown_table, save_comparison_grid, save_error_curves
    from tadq.utils import atomic_write_text, library_versions

    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluate-report")
    for name in ("results.json", "results.md"):  # written last: an interrupt while drawing the figures left an
        (out / name).unlink(missing_ok=True)  # earlier evaluation's numbers beside this one's figures
    labels = [f"{row['method']} {row['bits']}" for row in rows]
    save_comparison_grid({labels[0]: evaluation.reference.images[:64], labels[1]: evaluation.candidate.images[:64]},
                         out / "samples.png")
    save_error_curves({labels[1]: evaluation.per_step_mse}, out / "per_step_error.png",
                      title=f"{settings['sampler_key']}: MSE(x_t FP, x_t quantized)")
    results = {"rows": rows, "per_step_mse": evaluation.per_step_mse.tolist(),
               "fd_real_vs_real": evaluation.fd_floor, "settings": settings, "versions": library_versions()}
    atomic_write_text(dumps_json(results), out / "results.json")  # strict JSON: a NaN is written as null
    note = f"\n{settings['fd_note']}\n" if settings.get("fd_note") else ""
    atomic_write_text(markdown_table(rows, _columns(rows, fd_key)) + "\n" + note, out / "results.md")


def _inception_digits(image_shape: tuple[int, ...]):
    """The ``DigitsConfig`` of the real digits Inception FID compares images of ``image_shape`` (C, H, W) with;
    raises unless they are grey, square and of a size the digits exist at (checked before sampling)."""
    from tadq.zoo.data import SUPPORTED_RESOLUTIONS, DigitsConfig

    channels, height, width = image_shape[-3:]
    if channels != 1:
        raise ValueError(f"--inception-weights scores the samples against the real grey digits, but this model's "
                         f"images are {tuple(image_shape)} (C, H, W); the distance would compare different data")
    if height != width or width not in SUPPORTED_RESOLUTIONS:  # a 12x12 model failed after sampling twice
        raise ValueError(f"--inception-weights scores the samples against the real digits, which exist as square "
                         f"images of {SUPPORTED_RESOLUTIONS} pixels, but this model's images are {height}×{width}")
    return DigitsConfig(resolution=width)


def _inception_fids(evaluation, weights: Path) -> list[float]:
    """Real Inception FID (a user-supplied TorchScript file) of the FP and the quantized samples vs real digits."""
    from tadq.metrics import inception_fid
    from tadq.zoo.data import load_digits_split

    digits = _inception_digits(tuple(evaluation.candidate.images.shape[1:]))  # refused before sampling too
    real = load_digits_split(digits).train_images
    return [inception_fid(real, evaluation.reference.images.clamp(-1, 1), weights),
            inception_fid(real, evaluation.candidate.images.clamp(-1, 1), weights)]


def evaluate_command(
    model_dir: Annotated[Path, typer.Argument(help="A tadq artefact (`tadq quantize --out`) of an unconditional, "
                                                   "class-conditional or text-to-image model.")],
    reference: Annotated[Path | None, typer.Option(
        help="FP model folder it was quantized from (default: the shipped digits DDPM; for a text-to-image "
             "artefact the shipped text-to-image pipeline).")] = None,
    num_samples: Annotated[int, typer.Option(help="Samples per model (FD-digits needs about 1000).")] = 1000,
    seed: Annotated[int, typer.Option(help="Noise seed shared by the FP and quantized samples.")] = 1000,
    sampler: SamplerKind = None,
    steps: Steps = None,
    eta: Eta = None,
    batch_size: Annotated[int, typer.Option(help="Samples per denoiser call; also moves quantized samples "
                                                 "slightly (README: What tadq guarantees).")] = 250,
    out: Annotated[Path | None, typer.Option(help="Report folder (results.json/.md, figures); none: print only.")
                   ] = None,
    inception_weights: Annotated[Path | None, typer.Option(
        help="Local TorchScript Inception file (clean-fid / StyleGAN3 inception-2015-12-05.pt): also report real "
             "Inception FID of FP and quantized samples vs the real digits. Nothing is downloaded.")] = None,
    features: Annotated[str, typer.Option(
        help="Feature space of the Fréchet distance: 'digits' (the shipped digit classifier; 1×16×16 grey only), "
             "'photos' (the shipped photo classifier; 3×32×32), 'none' (PSNR, SSIM, trajectory error), or a "
             "TorchScript file (images in [-1, 1] → features) with --reference-images. 'auto': the shipped classifier "
             "of a shipped reference (digits, t2i, dit: digits; photos: photos), none otherwise.")] = "auto",
    reference_images: Annotated[Path | None, typer.Option(
        help="Real images for a custom feature space: a safetensors file with one tensor 'images' (M, C, H, W) in "
             "[-1, 1].")] = None,
    labels: Labels = None,
    null_class: NullClass = None,
    eval_prompts: Annotated[Path | None, typer.Option(
        help="Text-to-image artefacts: text file, one evaluation prompt per line (sample i gets prompt i mod the "
             "count); keep them apart from the calibration prompts, which the artefact does not record. Default "
             "with the shipped text-to-image reference: its evaluation prompts.")] = None,
    negative_prompt: NegativePrompt = "",
    guidance_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance of both models (conditional artefacts; default: the artefact recipe's, the "
             "scale its corrections were fitted at).")] = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    backend: Backend = "fake",
    verbose: Verbose = False,
) -> None:
    """Sample the artefact (its recipe's sampler and corrections, run by --backend) and its FP reference (in --dtype)
    from the same noise (and labels or prompts); print FD, agreement, PSNR/SSIM, MSE."""
    from tadq.names import check_eta
    from tadq.zoo.paths import shipped_model_path, shipped_t2i_path

    setup(verbose, threads)
    with fail_cleanly():
        # tadq.sample would refuse them only after both models were loaded; these before torch is imported
        check_sampling_flags(num_samples=num_samples, batch_size=batch_size, seed=seed)
        check_count_flags(steps=steps)
        if eta is not None:  # SamplerConfig checks it again, with the artefact's kind when --sampler is not given
            check_eta(eta, sampler)
        _check_feature_flags(features, reference_images)
        if reference is not None and not reference.is_dir():  # named now, not after the artefact is loaded
            raise FileNotFoundError(f"--reference {reference} is not a folder (the FP model the artefact was "
                                    "quantized from)")
        torch_device, torch_dtype = torch_setup(threads, device, dtype)
        from tadq.cli.sample import artefact_pair, evaluation_prompts, is_prompt_pipeline, prompt_pipeline_pair
        from tadq.config import config_to_dict
        from tadq.evaluation import decoded_shape, evaluate_against_reference
        from tadq.fsguard import check_output_dir
        from tadq.metrics.frechet import rank_deficiency_note
        from tadq.models import load_scheduler

        check_backend_here(backend, torch_device, torch_dtype)
        if inception_weights is not None:  # a missing or damaged file is named now, not after loading both models
            from tadq.metrics.inception import InceptionFeatures

            InceptionFeatures(inception_weights)
        if reference is not None:  # its layout and scheduler read now: a folder with no model was named only once
            load_scheduler(reference)  # the artefact had been loaded
        prompt_pipeline = is_prompt_pipeline(model_dir)
        prompts = evaluation_prompts(model_dir, prompt_pipeline, reference, eval_prompts, negative_prompt,
                                      labels, null_class)
        if out is not None:  # refused or unwritable report folders fail now, not after sampling twice
            default_reference = shipped_t2i_path() if prompt_pipeline else shipped_model_path()
            check_output_dir(out, kind="evaluate-report", resume=True, force_foreign=force_foreign,
                             inputs=[model_dir, reference if reference is not None else default_reference])
            hold_output(out)
        if prompt_pipeline:
            qmodel, fp_model, scheduler, sampler_config, conditions, scale, decoder = prompt_pipeline_pair(
                model_dir, reference, prompts, negative_prompt, guidance_scale, sampler, steps, eta, seed, backend,
                torch_device, torch_dtype, "--reference")
        else:
            qmodel, fp_model, scheduler, sampler_config, conditions, scale, decoder = artefact_pair(
                model_dir, reference, num_samples, labels, null_class, guidance_scale, sampler, steps, eta, seed,
                backend, torch_device, torch_dtype, "--reference", "evaluate")
        image_shape = decoded_shape(qmodel.sample_shape, decoder)
        resolution = image_shape[-1]
        space = _feature_space(features, reference, reference_images, resolution)
        if inception_weights is not None:  # checked before sampling twice, not after
            _inception_digits(image_shape)  # grey digits of this size exist
        expected = _prompted_labels(space, conditions, prompts, reference, num_samples, seed)
        announce_compile(backend)
        evaluation = evaluate_against_reference(qmodel, fp_model, scheduler, sampler_config,
                                                num_samples=num_samples, seed=seed, batch_size=batch_size,
                                                features=space, conditions=conditions, guidance_scale=scale,
                                                decoder=decoder, expected_labels=expected)
        inception = None
        if inception_weights is not None:
            inception = _inception_fids(evaluation, inception_weights)
    rows = _rows(evaluation, qmodel)
    if inception is not None:
        for row, value in zip(rows, inception, strict=True):
            row["inception_fid"] = value
            console.print(f"Inception FID ({row['method']} {row['bits']}) vs real digits: {value:.2f}")
    fd_key = space.metric_key if space is not None else "fd"
    _print_table(rows, f"tadq evaluate: {sampler_config.key}, {num_samples} samples, seed {seed}", fd_key)
    if evaluation.fd_floor is not None:
        console.print(f"FD-{space.name} real-vs-real floor: {evaluation.fd_floor:.2f} (a perfect generator's score)")
    fd_note = rank_deficiency_note(f"FD-{space.name}", num_samples, space.feature_width()) if space is not None else ""
    if fd_note:
        console.print(fd_note)
    if out is not None:
        settings = {"model": str(model_dir), "reference": str(reference) if reference else "shipped",
                    "sampler": config_to_dict(sampler_config), "sampler_key": sampler_config.key,
                    "num_samples": num_samples, "seed": seed, "guidance_scale": scale, "backend": backend,
                    "labels": None if conditions is None or prompt_pipeline else conditions.key,
                    "fd_note": fd_note or None}
        if prompt_pipeline:
            settings.update(prompts=list(prompts), negative_prompt=negative_prompt, conditions=conditions.key,
                            distilled_guidance=getattr(conditions.encoder, "distilled_guidance", None))
        _write_report(out, rows, evaluation, settings, fd_key)
        console.print(f"report: {out}/results.md, results.json, samples.png, per_step_error.png")
