"""``tadq sample``: draw samples from a quantized artefact or from a plain diffusers model folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tadq.cli.common import (
    DistilledGuidance,
    ForceForeign,
    Labels,
    NullClass,
    check_count_flags,
    check_reference_model,
    check_sampling_flags,
    check_steps_fit,
    class_conditions_for,
    console,
    fail_cleanly,
    hold_output,
    note,
    read_prompt_file,
    sampler_kind_flag,
    setup,
    torch_setup,
)

if TYPE_CHECKING:  # imported by the commands that use them: --help and a refused flag need neither
    import torch
    from diffusers import SchedulerMixin
    from torch import nn

__all__ = ["sample_command", "load_denoiser", "sample_pipeline", "is_prompt_pipeline", "SamplerKind", "Steps", "Eta",
           "SampledModel", "SampleSeed", "Threads", "Device", "Dtype", "Verbose", "Backend", "check_backend_here",
           "announce_compile", "deployment_sampler", "class_conditioning", "check_reference_schedule"]

SamplerKind = Annotated[str | None, typer.Option(
    "--sampler", help="Sampler kind: ddim, ddpm, euler, euler-ancestral, dpmsolver++ (2M) or flow-euler "
                      "(flow-matching models) (default: the artefact's recipe; an FP text-to-image pipeline "
                      "folder: its scheduler's own, else ddim; another FP folder: ddim, or flow-euler for a "
                      "flow-matching model).", callback=sampler_kind_flag)]
Steps = Annotated[int | None, typer.Option(help="Sampler steps (default: the artefact's recipe, else 50).")]
Eta = Annotated[float | None, typer.Option(
    help="DDIM eta, 0 = deterministic, 0 for ddpm (default: the artefact's recipe, else 0).")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")]
# tadq sample and tadq sample-sharded: the same model argument and the same per-sample noise
SampledModel = Annotated[Path | None, typer.Argument(
    help="A tadq artefact (`tadq quantize --out`) or a diffusers folder (default: the shipped FP model).")]
SampleSeed = Annotated[int, typer.Option(help="Noise seed (sample i's noise depends only on the seed and i).")]
Device = Annotated[str, typer.Option(help="Device: cpu, cuda, cuda:N or mps (refused when torch lacks it).")]
Dtype = Annotated[str, typer.Option(help="Compute dtype of the FP model: float32, bfloat16 or float16.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Backend = Annotated[str, typer.Option(help="Execution backend of a quantized artefact: fake (float simulation), int8 "
                                           "(oneDNN integer kernels, x86 CPUs; without VNNI/AMX only weight codes "
                                           "within ±64, e.g. W4A8), int8-compiled (int8 + torch.compile; compiles on "
                                           "the first call) or int8-cuda.")]


def check_backend_here(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse an execution backend this machine, ``device`` or ``dtype`` cannot run, before anything is loaded:
    never replaced by the float simulation (``tadq.backends.check_backend``, ``check_placement``)."""
    if backend == "fake":
        return
    from tadq.backends import check_backend, check_placement

    check_backend(backend)
    check_placement(backend, device, dtype)


def deployment_sampler(path: Path | None, kind: str | None, steps: int | None, eta: float | None):
    """The sampler to use: the artefact recipe's deployment sampler (for an FP folder or an artefact without a
    recipe: 50 steps of ddim, η 0, or of flow-euler on a flow-matching schedule, as ``tadq quantize`` picks) with the
    given flags applied. Refused before any work when the artefact's fitted tables (corrections, TFMQ) are for
    another grid."""
    import dataclasses

    from tadq.io import is_quantized_artefact
    from tadq.io.load import read_recipe
    from tadq.models import load_scheduler
    from tadq.sampling import SamplerConfig, command_sampler_kind

    check_count_flags(steps=steps)
    recipe = read_recipe(path) if path is not None and is_quantized_artefact(path) else None
    if recipe is not None:
        base = recipe.sampler
    else:  # DDIM cannot drive a flow-matching model: tadq quantize calibrates it on flow-euler, and so samples it
        base = SamplerConfig(kind=command_sampler_kind(load_scheduler(path)), num_steps=50, eta=0.0)
    given = {k: v for k, v in (("kind", kind), ("num_steps", steps), ("eta", eta)) if v is not None}
    if given.get("kind", "ddim") != "ddim" and eta is None:
        given["eta"] = 0.0  # η is DDIM's alone
    if given.get("kind", base.kind) != base.kind:
        given.update(order=None, shift=None, flow_sigmas=None)  # dpmsolver++'s order, flow-euler's shift and
        # grid belong to their kind
    sampler = dataclasses.replace(base, **given)
    if steps is not None:  # the recipe's own steps fit its model
        check_steps_fit(path, sampler.num_steps)
    tables = []  # what the artefact fitted for its recipe's grid
    if recipe is not None and recipe.corrections:
        tables.append("corrections")
    if recipe is not None and type(recipe.method).__name__ == "TFMQMethod":
        tables.append("per-step activation ranges (TFMQ)")
    if tables and sampler.key != recipe.sampler.key:
        raise ValueError(f"{path}'s {' and '.join(tables)} were fitted for {recipe.sampler.key}, not {sampler.key} "
                         "(--sampler/--steps/--eta); drop those flags to use the recipe's sampler, or quantize again "
                         "for this one (tadq quantize --recipe ... --steps N --eta E)")
    return sampler


def load_denoiser(path: Path | None, backend: str = "fake") -> tuple[nn.Module, SchedulerMixin, str]:
    """(denoiser, training scheduler, label): a tadq artefact when ``path`` has ``tadq_config.json``, else FP.

    One loader for both kinds, so every command that samples accepts either folder. ``backend`` (artefacts only):
    ``fake`` simulates the integer arithmetic in float, ``int8`` runs integer kernels (``tadq.backends``).
    """
    from tadq.io import is_quantized_artefact, load_quantized
    from tadq.models import load_pipeline_parts

    if path is not None and is_quantized_artefact(path):
        qmodel, scheduler = load_quantized(path, backend=backend)
        if scheduler is None:
            raise ValueError(f"{path} was saved without a scheduler; save it again with the model's training "
                             "scheduler (QuantizedDenoiser.save_pretrained(dir, scheduler))")
        recipe = getattr(qmodel, "recipe", None)
        if recipe is not None and recipe.name:
            name = recipe.name
        elif recipe is not None:  # as `tadq quantize` reports it (a TFMQ artefact's config says its base)
            name = recipe.describe()
        else:
            name = f"{qmodel.config.label} {qmodel.config.method}"
        return qmodel, scheduler, name
    if backend != "fake":
        raise ValueError(f"--backend {backend} runs a quantized artefact; {path or 'the shipped model'} is FP")
    model, scheduler = load_pipeline_parts(path)
    return model, scheduler, "FP"


def is_prompt_pipeline(path: Path) -> bool:
    """Whether ``path`` is a text-to-image pipeline folder (FP or a tadq artefact): prompts, decoded images."""
    from tadq.pipelines import is_pipeline_folder

    return is_pipeline_folder(path)


def _grid(images: list, columns: int):
    """One PIL image with ``images`` (equal sizes) in rows of ``columns``."""
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def announce_compile(backend: str) -> None:
    """Say why the first step of an ``int8-compiled`` run takes long (Inductor compiles there, minutes on 2 cores)."""
    if backend == "int8-compiled":
        note("int8-compiled: the first sampling step compiles the network (Inductor; about a minute on a "
                          "2-core CPU, again for a second batch size), later steps run the compiled graph")


def sample_pipeline(path: Path, *, prompts: list[str], negative_prompt: str | None, guidance_scale: float | None,
                    num_samples: int, seed: int, kind: str | None, steps: int | None, eta: float | None,
                    batch_size: int, out: Path, tensor_out: Path | None, device, dtype,
                    text_encoder_bits: int | None = None, force_foreign: bool = False,
                    backend: str = "fake", distilled_guidance: float | None = None) -> list[Path]:
    """Decoded images of a pipeline folder or artefact (``tadq.load_pipeline``) written to the folder ``out``:
    ``sample_NNNN.png``, ``grid.png``, ``prompts.json`` (sample → prompt, and the settings). Every input and path
    is checked before the pipeline is loaded; returns the files written."""
    import math
    import os
    import shutil

    import torch
    from PIL.PngImagePlugin import PngInfo

    from tadq.config import config_to_dict
    from tadq.fsguard import PNG_MARK, check_output_dir, check_output_file, is_tadq_file, mark_output
    from tadq.pipelines import PromptConditions, load_pipeline
    from tadq.pipelines.prompts import check_prompt_lengths
    from tadq.safefiles import require_finite, save_checked
    from tadq.sampling import check_seed
    from tadq.utils import atomic_write_json, make_staging_dir, write_error

    if not prompts:
        raise ValueError(f"{path} is a text-to-image pipeline: give at least one --prompt (or a --prompts file)")
    if out.suffix.lower() == ".png":
        raise ValueError(f"--out {out}: for a text-to-image pipeline --out names a folder (one PNG per sample, "
                         "grid.png and prompts.json go there), e.g. --out samples")
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"--num-samples and --batch-size must be >= 1, got {num_samples}, {batch_size}")
    # the sampling inputs are checked here, before the pipeline (encoders, VAE, denoiser) is loaded
    check_seed("--seed", seed)
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"--eta must lie in [0, 1], got {eta}")
    _check_pipeline_sampling_flags(path, kind, steps, eta, guidance_scale)
    _check_flux_negative_prompt(path, guidance_scale, negative_prompt)
    if num_samples < len(prompts):
        raise ValueError(f"--num-samples {num_samples} for {len(prompts)} prompts: sample i gets prompt i mod the "
                         f"count, so {prompts[num_samples]!r} and any after it would not be sampled; give "
                         f"--num-samples {len(prompts)} or more")
    check_output_dir(out, kind="samples", what="--out", resume=True, inputs=[path], force_foreign=force_foreign)
    hold_output(out)
    if not force_foreign:
        _refuse_foreign_sample_files(out, num_samples)
    if tensor_out is not None:
        check_output_file(tensor_out, what="--tensor-out", suffixes=(".safetensors",), inputs=[path],
                          force_foreign=force_foreign)
        hold_output(tensor_out, "--tensor-out")
    check_prompt_lengths(path, prompts, negative_prompt=negative_prompt)  # tokenizers only
    pipe = load_pipeline(path, device=device, dtype=dtype, text_encoder_bits=text_encoder_bits, backend=backend)
    announce_compile(backend)
    sampler, scale = pipe.tadq_deployment(steps, guidance_scale, eta, kind)
    warn_unused_negative_prompt(pipe, negative_prompt, guidance_scale, scale)  # prompts.json still lists it
    encoder = pipe.tadq_prompt_encoder(distilled_guidance=distilled_guidance)  # refused off Flux, and against
    # tables fitted at another scale
    conditions = PromptConditions(encoder, prompts, negative_prompt)
    latents = pipe.tadq_latents(conditions, num_samples, sampler, scale, seed, batch_size, progress=True)
    require_finite(latents, f"the latents of {path}")
    decoded = pipe.tadq_decode(latents, "pt", batch_size)  # checked before PNG conversion casts NaN to noise
    require_finite(decoded, f"the images the VAE of {path} decoded from finite latents")
    images = pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(decoded))  # postprocess's "pil"
    mark = PngInfo()  # tadq's mark: a rerun may replace or remove these files, and nothing else
    for key, value in PNG_MARK.items():
        mark.add_text(key, value)
    settings = {"model": str(path), "seed": seed, "sampler": config_to_dict(sampler), "guidance_scale": scale,
                "distilled_guidance": getattr(encoder, "distilled_guidance", None),
                "negative_prompt": negative_prompt, "text_encoder_bits": text_encoder_bits, "backend": backend}
    # every file is written into a hidden sibling folder first and moved in only when all exist: a failed write
    # (a full disk) left the folder half new, half the previous run's, its prompts.json describing neither
    staging = make_staging_dir(out)  # and removes the staging folders a killed run into out left
    try:
        names = [f"sample_{i:04d}.png" for i in range(len(images))]
        for name, image in zip(names, images, strict=True):
            image.save(staging / name, format="PNG", pnginfo=mark)
        _grid(images, math.ceil(math.sqrt(len(images)))).save(staging / "grid.png", format="PNG", pnginfo=mark)
        atomic_write_json({**settings, "samples": {name: conditions.prompt_of(i) for i, name in enumerate(names)}},
                          staging / "prompts.json")
        out.mkdir(parents=True, exist_ok=True)
        mark_output(out, "samples")
        # prompts.json says what the folder holds: the earlier run's goes first and this run's comes last, so a
        # kill or an interrupt between the renames leaves a folder without one, never one whose prompts.json
        # describes samples of which only some are still there (the others this run's, unsaid)
        (out / "prompts.json").unlink(missing_ok=True)
        for name in [*names, "grid.png"]:
            os.replace(staging / name, out / name)
        for stale in sorted(set(out.glob("sample_*.png")) - {out / name for name in names}):  # an earlier run's
            if is_tadq_file(stale):  # extra samples
                stale.unlink()
        os.replace(staging / "prompts.json", out / "prompts.json")
    except Exception as error:  # a full disk: PIL's OSError named no file, only "No space left on device"
        if (converted := write_error(error, out)) is not None:
            raise converted from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = [out / name for name in names] + [out / "grid.png", out / "prompts.json"]
    if tensor_out is not None:
        save_checked({"latents": latents, "indices": torch.arange(num_samples)}, settings, tensor_out)
    return written


def warn_unused_negative_prompt(pipe: Any, negative_prompt: str | None, given: float | None, scale: float) -> None:
    """Say, as the pipeline call does, that ``--negative-prompt`` is not used at the guidance scale 1 (``given`` by
    the user, else the recipe's or the pipeline's default): it only enters the unconditional branch."""
    if negative_prompt is None or scale != 1:
        return
    origin = "given" if given is not None else \
        "the artefact recipe's" if pipe.tadq_recipe is not None else "the pipeline's default"
    logging.getLogger(__name__).warning(
        "--negative-prompt is not used: the classifier-free guidance scale is 1 (%s), which samples the prompt "
        "alone, as %s does; give --guidance-scale above 1 to guide against it", origin, pipe.tadq_base.__name__)


def _check_pipeline_sampling_flags(path: Path, kind: str | None, steps: int | None, eta: float | None,
                                   guidance_scale: float | None) -> None:
    """Refuse, before the pipeline is loaded, the sampling flags that were refused only after every component had
    been read (``tadq_deployment``, the sampler): a negative or non-finite guidance scale, an unknown --sampler,
    η with a kind other than DDIM, a kind of the other family than the folder's schedule (flow-euler on an ε
    model, DDIM on a flow-matching one), an artefact's fitted tables for another grid (its recipe is read)."""
    from tadq.pipelines.quantized import check_pipeline_guidance, check_sampler_family

    check_count_flags(steps=steps)
    from tadq.sampling import check_guidance_scale

    if guidance_scale is not None:
        check_pipeline_guidance(check_guidance_scale(guidance_scale))
    sampler = deployment_sampler(path, kind, steps, eta)
    if kind is not None:  # without --sampler: the recipe's, else ddim or flow-euler by the folder's schedule
        check_sampler_family(path, sampler)
    elif eta is not None:
        from tadq.io import is_quantized_artefact
        from tadq.models import load_scheduler
        from tadq.names import check_eta
        from tadq.sampling.config import DEFAULT_SAMPLER_KINDS

        if not is_quantized_artefact(path):  # an FP folder samples its scheduler's own kind
            check_eta(eta, DEFAULT_SAMPLER_KINDS.get(type(load_scheduler(path)).__name__))


def _check_flux_negative_prompt(path: Path, guidance_scale: float | None, negative_prompt: str | None) -> None:
    """Refuse, before loading, ``--guidance-scale`` > 1 without ``--negative-prompt`` on a Flux folder or artefact,
    as the pipeline call refuses ``true_cfg_scale`` without ``negative_prompt`` (``check_true_cfg_negative``):
    FluxPipeline would not guide at all, and the command guided against the empty prompt without a word."""
    from tadq.pipelines.components import DISTILLED_GUIDANCE_PIPELINES, read_model_index
    from tadq.pipelines.quantized import check_true_cfg_negative

    if read_model_index(path)["_class_name"] in DISTILLED_GUIDANCE_PIPELINES:
        check_true_cfg_negative(guidance_scale, negative_prompt, "--guidance-scale", "--negative-prompt")


def _refuse_foreign_sample_files(out: Path, num_samples: int) -> None:
    """Refuse, before loading, to replace a file in a tadq samples folder that tadq did not write under one of the
    names a run writes (``sample_NNNN.png``, ``grid.png``, ``prompts.json``): the folder's mark let a rerun replace
    a user's own ``grid.png`` or ``prompts.json`` put beside the samples."""
    import json

    from tadq.fsguard import FORCE_HINT, OutputRefused, is_tadq_file

    names = [f"sample_{i:04d}.png" for i in range(num_samples)] + ["grid.png"]
    foreign = [name for name in names if (out / name).exists() and not is_tadq_file(out / name)]
    listing = out / "prompts.json"
    if listing.exists() or listing.is_symlink():
        try:
            written = json.loads(listing.read_text(encoding="utf-8"))
            ours = isinstance(written, dict) and {"samples", "seed", "model"} <= set(written)
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            foreign.append(listing.name)
    if foreign:
        raise OutputRefused(f"--out {out} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which "
                            f"tadq did not write and this run would replace; move them, or {FORCE_HINT}")


def _check_class_label_flags(class_label: list[int] | None, num_samples: int) -> None:
    """Refuse, before any model is loaded, --class-label values no model takes (negative) and more labels than
    samples: sample i gets label i mod the count, so the labels after the first --num-samples were never sampled,
    without a word (as --prompt refuses it)."""
    if not class_label:
        return
    negative = [label for label in class_label if label < 0]
    if negative:
        raise ValueError(f"--class-label {negative[0]}: a class label is an index >= 0")
    if num_samples < len(class_label):
        raise ValueError(f"--num-samples {num_samples} for {len(class_label)} --class-label values: sample i gets "
                         f"label i mod the count, so label {class_label[num_samples]} and any after it would not be "
                         f"sampled; give --num-samples {len(class_label)} or more")


def class_conditioning(denoiser: nn.Module, source: Path, num_samples: int, *, class_label: list[int] | None,
                        labels: str | None, null_class: int | None, guidance_scale: float | None, device, dtype,
                        command: str = "sample", decode: bool = True):
    """(conditions, guidance scale, VAE decoder or ``None``) of ``tadq sample``, all checked before sampling.

    An unconditional model takes no labels and no guidance. A class-conditional one samples explicit labels
    (``--class-label``) or the ``--labels`` mode; its guidance and null class default to the artefact recipe's (the
    scale its corrections were fitted at, another one refused for a model carrying fitted tables; the null class
    it was calibrated with). A latent model's
    samples are decoded by the folder's VAE (not loaded with ``decode=False``: a command that reads latents only)."""
    from tadq.experiments.workload import folder_vae_decoder
    from tadq.pipelines.quantized import resolve_deployment
    from tadq.sampling import ClassLabels

    recipe = getattr(denoiser, "recipe", None)
    fitted = recipe.guidance_scale if recipe is not None and recipe.guidance_scale != 1.0 else None
    if null_class is None and recipe is not None:  # the null class the artefact was calibrated with, if recorded
        null_class = recipe.deployments[0].null_class
    network = getattr(denoiser, "model", denoiser)
    if class_label and labels is not None:
        raise ValueError("give --class-label or --labels, not both")
    mode = "random" if class_label else labels  # explicit labels are guided like random ones
    setting = class_conditions_for(network, source, command, labels=mode, null_class=null_class,
                                   guidance_scale=guidance_scale if guidance_scale is not None else fitted)
    if setting is None:
        if class_label:
            raise ValueError(f"--class-label given, but {source} holds an unconditional {type(network).__name__}")
        if guidance_scale is not None and guidance_scale != 1.0:
            raise ValueError(f"--guidance-scale {guidance_scale:g} needs an unconditional branch (an empty or "
                             f"negative prompt, a null class), which {source} does not have; drop the flag")
        return None, 1.0, folder_vae_decoder(source, device, dtype) if decode else None
    scale = setting.guidance_scale
    if setting.guidance_origin is not None:  # a default the user did not give: said, with how to change it
        note(f"guidance {scale:g}: {setting.guidance_origin} (--guidance-scale to choose another, 1 for none)")
    resolve_deployment(denoiser, recipe, None, scale, None, 1.0)  # tables fitted at another scale: refused
    conditions = setting.source
    if class_label:
        wanted = tuple(class_label[i % len(class_label)] for i in range(num_samples))
        outside = [label for label in class_label if not 0 <= label < setting.num_classes]
        if outside:  # the first one outside, whichever end (a negative one was named by the largest label)
            raise ValueError(f"--class-label {outside[0]} is not a class of {source}: its classes are "
                             f"0..{setting.num_classes - 1}")
        conditions = ClassLabels(wanted, setting.null_class if scale != 1.0 else None)
    return conditions, scale, folder_vae_decoder(source, device, dtype) if decode else None


def evaluation_prompts(model_dir: Path, prompt_pipeline: bool, reference: Path | None, eval_prompts: Path | None,
                        negative_prompt: str, labels: str | None, null_class: int | None,
                        flag: str = "--reference") -> tuple[str, ...]:
    """The evaluation prompts of a text-to-image artefact (``--eval-prompts``, else the shipped text-to-image
    model's own when it is the reference, ``flag`` not given), checked against the artefact's tokenizers; ``()``
    for any other artefact, which takes no prompt flags. Everything refused here is refused before a model is
    loaded."""
    from tadq.pipelines.prompts import check_prompt_lengths

    if not prompt_pipeline:
        if eval_prompts is not None or negative_prompt:
            raise ValueError(f"--eval-prompts/--negative-prompt are for text-to-image artefacts; {model_dir} is "
                             "not one (class-conditional models take --labels)")
        return ()
    if labels is not None or null_class is not None:
        raise ValueError(f"{model_dir} is a text-to-image pipeline, conditioned by prompts: it takes no --labels or "
                         "--null-class (give --eval-prompts; its unconditional branch is --negative-prompt)")
    prompts = read_prompt_file(eval_prompts, "--eval-prompts")
    if not prompts:
        if reference is not None:
            raise ValueError(f"{model_dir} is a text-to-image artefact: give --eval-prompts FILE (one prompt per "
                             "line, apart from the prompts it was calibrated on)")
        from tadq.zoo.t2i_prompts import EVALUATION_PROMPTS

        prompts = tuple(EVALUATION_PROMPTS)
    if eval_prompts is not None:
        check_prompt_lengths(model_dir, prompts, "evaluation prompt", negative_prompt=negative_prompt or None)
        return prompts
    # the user wrote none of the shipped model's prompts: its folder and the user's negative prompt are checked
    # first, then a prompt the artefact's tokenizers refuse is one of another model's artefact, which says so
    check_prompt_lengths(model_dir, (), "evaluation prompt", negative_prompt=negative_prompt or None)
    try:
        check_prompt_lengths(model_dir, prompts, "evaluation prompt")
    except ValueError as error:
        raise ValueError(f"{error} [no {flag} or --eval-prompts given, so the reference is the shipped "
                         f"text-to-image pipeline and these are its evaluation prompts: for an artefact of another "
                         f"model pass {flag} FP_FOLDER (the pipeline it was quantized from) and --eval-prompts "
                         "FILE]") from error
    return prompts


def prompt_pipeline_pair(model_dir: Path, reference: Path | None, prompts: tuple[str, ...], negative_prompt: str,
                          guidance_scale: float | None, kind: str | None, steps: int | None, eta: float | None,
                          seed: int, backend: str, device, dtype, flag: str):
    """(quantized denoiser, FP denoiser, scheduler, sampler, prompt conditions, guidance scale, VAE decoder) of a
    text-to-image artefact and its FP reference: the artefact's own pipeline gives the sampler and guidance of its
    recipe, the prompt encoder both models are conditioned with (the same embeddings for both) and the VAE both
    are decoded with, as `tadq run` scores its rows; the reference gives only its denoiser."""
    from tadq.evaluation import check_evaluation_seed
    from tadq.experiments.workload import vae_decoder
    from tadq.io import is_quantized_artefact
    from tadq.methods import check_sampler
    from tadq.models import load_pipeline_parts
    from tadq.pipelines import PromptConditions, load_pipeline
    from tadq.zoo.t2i import shipped_t2i_path

    if not is_quantized_artefact(model_dir):
        raise ValueError(f"{model_dir} is an FP pipeline folder, not a tadq artefact: quantize it first (`tadq "
                         "quantize`), or compare FP and quantized rows with `tadq run --model FOLDER`")
    _check_pipeline_sampling_flags(model_dir, kind, steps, eta, guidance_scale)  # before any component is read
    pipe = load_pipeline(model_dir, device=device, dtype=dtype, backend=backend)
    qmodel = pipe.tadq_denoiser
    check_evaluation_seed(qmodel, seed, "--seed")  # before the FP model is loaded and both are sampled
    sampler, scale = pipe.tadq_deployment(steps, guidance_scale, eta, kind)
    warn_unused_negative_prompt(pipe, negative_prompt or None, guidance_scale, scale)  # was dropped without a word
    check_sampler(qmodel, sampler, str(model_dir))
    conditions = PromptConditions(pipe.tadq_prompt_encoder(), list(prompts), negative_prompt=negative_prompt)
    fp_model, fp_scheduler = load_pipeline_parts(reference if reference is not None else shipped_t2i_path())
    check_reference_model(qmodel, fp_model, reference, flag,
                          shipped="the shipped text-to-image pipeline")
    check_reference_schedule(pipe.scheduler, fp_scheduler, sampler, model_dir,
                             reference if reference is not None else shipped_t2i_path(), flag)
    fp_model = _matched_reference(fp_model, qmodel, device, dtype)
    decoder = vae_decoder(pipe.vae, pipeline_class=type(pipe).tadq_base.__name__)  # as tadq sample decodes
    return qmodel, fp_model, pipe.scheduler, sampler, conditions, scale, decoder


def artefact_pair(model_dir: Path, reference: Path | None, num_samples: int, labels: str | None,
                  null_class: int | None, guidance_scale: float | None, kind: str | None, steps: int | None,
                  eta: float | None, seed: int, backend: str, device, dtype, flag: str, command: str,
                  decode: bool = True):
    """``prompt_pipeline_pair``'s tuple for an unconditional or class-conditional artefact: its recipe's sampler
    (flags applied), labels drawn from the evaluation seed at the recipe's guidance, the folder's VAE for a latent
    model (``decode=False``: none, for a command that reads latents only), and the FP ``reference`` (default: the
    shipped digits DDPM) on the same placement and FreeU setting."""
    from tadq.device import place_model
    from tadq.evaluation import check_evaluation_seed
    from tadq.io import load_quantized
    from tadq.methods import check_sampler
    from tadq.models import load_pipeline_parts

    sampler = deployment_sampler(model_dir, kind, steps, eta)
    qmodel, scheduler = load_quantized(model_dir, backend=backend)
    check_evaluation_seed(qmodel, seed, "--seed")  # before the FP model is loaded and both are sampled
    check_sampler(qmodel, sampler, str(model_dir))
    qmodel = place_model(qmodel, device, dtype)  # float32: bit-identical to the saved model
    conditions, scale, decoder = class_conditioning(qmodel, model_dir, num_samples, class_label=None, labels=labels,
                                                    null_class=null_class, guidance_scale=guidance_scale,
                                                    device=device, dtype=dtype, command=command, decode=decode)
    fp_model, fp_scheduler = load_pipeline_parts(reference)
    # the default reference is the shipped model: another model's artefact is measured against it only if alike
    check_reference_model(qmodel, fp_model, reference, flag)
    if scheduler is not None:
        from tadq.zoo.paths import shipped_model_path

        check_reference_schedule(scheduler, fp_scheduler, sampler, model_dir,
                                 reference if reference is not None else shipped_model_path(), flag)
    fp_model = _matched_reference(fp_model, qmodel, device, dtype)
    # the schedule the artefact was calibrated under (saved with it); the FP folder's only when it has none
    return qmodel, fp_model, scheduler or fp_scheduler, sampler, conditions, scale, decoder


def check_reference_schedule(scheduler: SchedulerMixin, fp_scheduler: SchedulerMixin, sampler, model_dir: Path,
                             reference: Path, flag: str) -> None:
    """Refuse, before sampling, an FP reference whose training scheduler walks another grid or reads the network's
    output otherwise than the artefact's under ``sampler`` (``walk_differences``: prediction type, betas, training
    timesteps, spacing...). Both models are sampled with the artefact's scheduler from the same noise: a reference
    whose own schedule differs would be sampled under a schedule it was not trained on (a v-prediction output read
    as ε), and every paired number against it would be meaningless; sampling each with its own would compare two
    walks, not the quantization."""
    from tadq.sampling import walk_differences

    try:
        differing = walk_differences(scheduler, fp_scheduler, sampler)
    except NotImplementedError as error:
        raise ValueError(f"{flag} {reference}: its scheduler ({type(fp_scheduler).__name__}) cannot be walked as "
                         f"{model_dir}'s is ({sampler.key}): {error}") from error
    if not differing:
        return
    fields = "; ".join(f"{key}: {mine!r} in {model_dir}, {theirs!r} in {reference}"
                       for key, (mine, theirs) in differing.items())
    raise ValueError(f"the scheduler of {flag} {reference} differs from the quantized model's ({model_dir}) under "
                     f"{sampler.key} at {fields}. Both are sampled from the same noise with one scheduler, so the "
                     f"FP reference would be sampled under a schedule it does not have and every number against it "
                     f"would be meaningless; pass the FP folder {model_dir} was quantized from (or make "
                     f"{reference}/scheduler/scheduler_config.json agree)")


def _matched_reference(fp_model: nn.Module, qmodel: nn.Module, device, dtype) -> nn.Module:
    """The FP reference with the FreeU setting the artefact runs with (a folder cannot record it, and the
    difference would count as quantization error), placed as asked."""
    from tadq.adapters.freeu import match_freeu
    from tadq.device import place_model

    if match_freeu(fp_model, getattr(qmodel, "model", qmodel)) is not None:
        note("the artefact runs with FreeU: the FP reference runs with the same factors")
    return place_model(fp_model, device, dtype)


def sample_command(
    model_dir: SampledModel = None,
    num_samples: Annotated[int, typer.Option(help="Number of samples.")] = 64,
    seed: SampleSeed = 1000,
    sampler: SamplerKind = None,
    steps: Steps = None,
    eta: Eta = None,
    batch_size: Annotated[int, typer.Option(help="Samples per denoiser call; also moves quantized samples "
                                                 "slightly (README: What tadq guarantees).")] = 128,
    out: Annotated[Path | None, typer.Option(
        help="PNG file of the sample grid (must end in .png; default samples.png); for a text-to-image pipeline a "
             "folder (default samples/) for one PNG per sample, grid.png and prompts.json.")] = None,
    prompt: Annotated[list[str] | None, typer.Option(
        "--prompt", help="Prompt of a text-to-image pipeline (repeat; sample i gets prompt i mod the count).")] = None,
    prompts_file: Annotated[Path | None, typer.Option(
        "--prompts", help="Text file, one prompt per line (UTF-8; blank lines skipped), after any --prompt.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(
        help="Negative prompt, the unconditional branch of guidance (default: the empty prompt, as diffusers; "
             "Flux guides only against one given, as FluxPipeline: --guidance-scale above 1 needs it).")
    ] = None,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance scale (default: the artefact recipe's, else the pipeline class's default: "
             "e.g. 7.5 for Stable Diffusion, 4 for a DiTPipeline folder with a null class, 1.5 for the shipped DiT; "
             "1 for a model without a pipeline class that guides).")
    ] = None,
    distilled_guidance: DistilledGuidance = None,
    text_encoder_bits: Annotated[int | None, typer.Option(
        help="Weight-only quantization of a pipeline's text encoders (8 or 4 bits, per output channel; default "
             "off).")] = None,
    class_label: Annotated[list[int] | None, typer.Option(
        "--class-label", help="Class of a class-conditional model (repeat; sample i gets label i mod the count; "
                              "default: --labels).")] = None,
    labels: Labels = None,
    null_class: NullClass = None,
    tensor_out: Annotated[Path | None, typer.Option(
        help="Also save the samples (N, C, H, W) as a .safetensors file (settings in its metadata; no pickle): "
             "'images' of a pixel model, 'latents' (before decoding) of a latent one.")
    ] = None,
    force_foreign: ForceForeign = False,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    backend: Backend = "fake",
    verbose: Verbose = False,
) -> None:
    """Sample a quantized artefact with its recipe's sampler and corrections (or an FP model folder) with tadq's
    loop; writes a PNG grid."""
    from tadq.names import check_eta
    from tadq.zoo.paths import shipped_model_path

    setup(verbose, threads)
    with fail_cleanly():
        # both branches, before any model is read (the FP/artefact one checked them only inside tadq.sample), and
        # before torch is imported (seconds)
        check_sampling_flags(num_samples=num_samples, batch_size=batch_size, seed=seed, guidance_scale=guidance_scale)
        check_count_flags(steps=steps)
        prompt = [*(prompt or []), *read_prompt_file(prompts_file, "--prompts")]
        source = model_dir if model_dir is not None else shipped_model_path()
        if model_dir is not None and not model_dir.exists():
            raise FileNotFoundError(f"model folder {model_dir} does not exist")
        _check_class_label_flags(class_label, num_samples)
        if eta is not None and (model_dir is None or not (model_dir / "model_index.json").is_file()):
            # not a text-to-image pipeline (sample_pipeline names --eta itself): SamplerConfig's check, with the
            # kind of --sampler when given (the artefact's or the model's decides otherwise, checked again then)
            check_eta(eta, sampler)
        torch_device, torch_dtype = torch_setup(threads, device, dtype)
        from tadq.api import sample
        from tadq.config import config_to_dict
        from tadq.device import place_model
        from tadq.fsguard import check_output_file
        from tadq.methods import check_sampler
        from tadq.report import save_comparison_grid
        from tadq.safefiles import require_finite, save_checked

        check_backend_here(backend, torch_device, torch_dtype)
        if model_dir is not None and is_prompt_pipeline(model_dir):
            if class_label or labels is not None or null_class is not None:  # ignored before, without a word
                raise ValueError(f"--class-label/--labels/--null-class are for class-conditional models; {model_dir} "
                                 "is a text-to-image pipeline, conditioned by --prompt (its unconditional branch is "
                                 "--negative-prompt)")
            written = sample_pipeline(
                model_dir, prompts=prompt, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                num_samples=num_samples, seed=seed, kind=sampler, steps=steps, eta=eta, batch_size=batch_size,
                out=Path("samples") if out is None else out, tensor_out=tensor_out, device=torch_device,
                dtype=torch_dtype, text_encoder_bits=text_encoder_bits, force_foreign=force_foreign,
                backend=backend, distilled_guidance=distilled_guidance)
            console.print(f"wrote {len(written) - 2} images, grid.png and prompts.json to {written[0].parent}")
            return
        if prompt:
            from tadq.pipelines.components import PIPELINE_COMPONENTS, unsupported_pipeline_note

            raise ValueError(f"--prompt/--prompts given, but {source} is not a text-to-image pipeline (a folder whose "
                             f"model_index.json names a {' or '.join(sorted(PIPELINE_COMPONENTS))}): "
                             f"{unsupported_pipeline_note(model_dir)}")
        if negative_prompt is not None or text_encoder_bits is not None or distilled_guidance is not None:
            raise ValueError(f"--negative-prompt/--text-encoder-bits/--distilled-guidance given, but {source} is not "
                             "a text-to-image pipeline")
        out = Path("samples.png") if out is None else out
        check_output_file(out, what="--out", suffixes=(".png",), inputs=[source],  # before sampling, not after
                          force_foreign=force_foreign)
        hold_output(out)
        if tensor_out is not None:
            check_output_file(tensor_out, what="--tensor-out", suffixes=(".safetensors",), inputs=[source],
                              force_foreign=force_foreign)
            hold_output(tensor_out, "--tensor-out")  # locked like --out: two runs would interleave their writes
        sampler_config = deployment_sampler(model_dir, sampler, steps, eta)
        denoiser, scheduler, label = load_denoiser(model_dir, backend)
        if backend != "fake":  # the grid and the 'wrote' line name what ran, as tadq evaluate's row does
            label = f"{label} [{backend}]"
        conditions, scale, decoder = class_conditioning(denoiser, source, num_samples, class_label=class_label,
                                                         labels=labels, null_class=null_class,
                                                         guidance_scale=guidance_scale, device=torch_device,
                                                         dtype=torch_dtype)
        check_sampler(denoiser, sampler_config, str(model_dir))
        denoiser = place_model(denoiser, torch_device, torch_dtype)
        announce_compile(backend)
        result = sample(denoiser, scheduler, sampler_config, num_samples=num_samples, seed=seed,
                        batch_size=batch_size, conditions=conditions, guidance_scale=scale)
        require_finite(result.images, f"the samples of {model_dir or 'the shipped model'}")
        images = result.images if decoder is None else decoder(result.images)
        title = f"{label} · {sampler_config.key} · seed {seed}" + (f" · guidance {scale:g}" if scale != 1.0 else "")
        written = save_comparison_grid({title: images}, out)
    if conditions is not None:
        shown = conditions(seed, range(min(num_samples, 16))).class_labels.tolist()
        console.print(f"class labels of the first samples: {shown}" + ("" if num_samples <= 16 else " ..."))
    console.print(f"wrote {written} ({num_samples} samples, {label})")
    if tensor_out is not None:
        # a latent model's samples before decoding are latents: the key a text-to-image pipeline's file uses too
        tensors = {"images" if decoder is None else "latents": result.images, "indices": result.indices}
        if conditions is not None:  # with the label each was drawn for
            tensors["class_labels"] = conditions(seed, range(num_samples)).class_labels
        save_checked(tensors, {"seed": seed, "sampler": config_to_dict(sampler_config), "guidance_scale": scale,
                               "model": str(model_dir or "shipped"), "backend": backend}, tensor_out)
        console.print(f"wrote {tensor_out}")
