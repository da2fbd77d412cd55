"""What the main job samples and how it reads the samples, per model kind: the workload.

An unconditional pixel model needs nothing but noise. A text-to-image latent model also needs per-sample prompts —
one set for calibration and a disjoint one for evaluation, so a fit is never scored on its own prompts — a guidance
scale, the VAE that turns the final latents into images before any image metric, and (for the shipped digits
text-to-image model) the digit each evaluation prompt asks for, which the digit classifier must read back.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadq.evaluation import decoded_shape
from tadq.metrics.features import DigitsFeatureSpace, FeatureSpace, PhotosFeatureSpace
from tadq.models import load_pipeline_parts, shipped_model_path
from tadq.registry import adapter_for
from tadq.safefiles import find_weight_files, read_json_file, require_stored_parameters
from tadq.sampling import Conditioning, ConditionSource, RandomClassLabels, SamplerConfig
from tadq.zoo.paths import SHIPPED_MODELS, resolve_model_path, shipped_dit_path, shipped_photos_path, shipped_t2i_path

__all__ = ["Workload", "SHIPPED_MODELS", "resolve_model_path", "load_workload", "is_text_to_image_folder",
           "ClassLabelSetting", "class_label_setting", "pipeline_default_guidance", "decoder_component",
           "folder_vae_decoder", "vae_decoder",
           "LATENT_DECODERS", "LABEL_MODES"]

logger = logging.getLogger(__name__)


# how the main job labels the samples of a class-conditional model
LABEL_MODES = ("null", "random")


def is_text_to_image_folder(path: Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder with a text encoder (Stable Diffusion / SDXL / PixArt / SD3 /
    Flux layout)."""
    index_file = path / "model_index.json"
    if not index_file.exists():
        return False
    index = read_json_file(index_file, "pipeline index")
    entry = index.get("text_encoder") if isinstance(index, dict) else None
    return entry is not None and entry != [None, None]


@dataclass(frozen=True)
class Workload:
    """The model, its scheduler and everything the main job does around the denoiser.

    Args:
        name: shown in the report (``digits``, ``t2i``, the folder).
        model: the FP denoiser (eval mode).
        scheduler: its training scheduler.
        calibration_conditions: per-sample conditions of the calibration runs and correction fits (``None``:
            unconditional).
        evaluation_conditions: per-sample conditions of the evaluation samples, disjoint from the calibration ones.
        guidance_scale: classifier-free guidance scale of calibration, fits and evaluation (1: none).
        decoder: latents (N, C, h, w) → images (N, C', H, W) in [-1, 1] (a VAE); ``None``: the samples are images.
        expected_labels: (evaluation seed, number of samples) → (N,) label each evaluation sample was prompted with
            (prompt agreement); ``None`` when there is no label to read back.
        features: the feature space of FD and agreement on the (decoded) images; ``None``: PSNR/SSIM/trajectory only.
        settings: what identifies the workload in cell keys (prompt sets, guidance).
        sampler_for: the run's sampler → the one the model's pipeline would walk (Flux: its σ grid and
            resolution-dependent shift); ``None``: the run's sampler as given.
        distilled_guidance: the guidance scale a guidance-distilled model (Flux) embeds in every run (its
            conditions carry it; recorded in recipes); ``None`` for every other model.
    """

    name: str
    model: nn.Module
    scheduler: Any
    calibration_conditions: ConditionSource | None = None
    evaluation_conditions: ConditionSource | None = None
    guidance_scale: float = 1.0
    decoder: Callable[[Tensor], Tensor] | None = None
    expected_labels: Callable[[int, int], Tensor] | None = None
    features: FeatureSpace | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    sampler_for: Callable[[SamplerConfig], SamplerConfig] | None = None
    distilled_guidance: float | None = None

    def components(self) -> dict[str, str]:
        """Fingerprints of what a cell depends on besides the denoiser and the run settings: the training
        scheduler's config, the VAE's weights (a latent model) and the evaluation conditions (their key covers a
        text encoder's weights). A finished cell is reused only when they match: a folder whose scheduler or VAE
        was replaced reused its old cells before."""
        from tadq.calibration import model_fingerprint
        from tadq.sampling import scheduler_config_key

        config = {k: v for k, v in scheduler_config_key(self.scheduler.config).items() if k != "_diffusers_version"}
        payload = json.dumps(config, sort_keys=True, default=str).encode()
        parts = {"scheduler": hashlib.sha256(payload).hexdigest()[:16]}
        vae = getattr(self.decoder, "module", None)
        if isinstance(vae, nn.Module):
            parts["vae"] = model_fingerprint(vae)[:16]
        if isinstance(scheme := getattr(self.decoder, "scheme", None), str):
            parts["vae_decode"] = scheme
        key = getattr(self.evaluation_conditions, "key", None)
        if isinstance(key, str):
            parts["evaluation_conditions"] = key
        return parts

    def images(self, samples: Tensor) -> Tensor:
        """The images of final samples: decoded by the VAE for a latent model, the samples themselves otherwise."""
        return samples if self.decoder is None else self.decoder(samples)

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one image (after decoding)."""
        return decoded_shape(adapter_for(self.model).sample_shape(self.model), self.decoder)


def vae_decoder(vae: nn.Module, batch_size: int = 64, pipeline_class: str | None = None
                ) -> Callable[[Tensor], Tensor]:
    """Latents → images in [-1, 1], as diffusers' pipelines decode them (``latents / scaling_factor``, then the
    VAE decoder), in batches, in the VAE's dtype and on its device; returned on the latents' device as float32.
    ``pipeline_class`` (a text-to-image pipeline's): decoded as that class decodes them, as ``tadq sample`` does
    (``tadq.pipelines.quantized.decode_latents``: SDXL's latents mean/std, SD3's and Flux's shift factor, an fp16
    VAE's float32 upcast); without one (DiT, LDM folders), ``latents / scaling_factor`` plus the VAE's
    ``shift_factor`` if it has one."""
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None)

    def decode(latents: Tensor) -> Tensor:
        if pipeline_class is not None:
            from tadq.pipelines.quantized import decode_latents

            with torch.no_grad():  # each chunk leaves the VAE's device at once: one batch of images there at a time
                parts = [decode_latents(pipeline_class, vae, latents[start:start + batch_size], batch_size)
                         .float().clamp(-1, 1).to(latents.device) for start in range(0, len(latents), batch_size)]
            return torch.cat(parts)
        parameter = next(vae.parameters())
        parts = []
        with torch.no_grad():
            for start in range(0, len(latents), batch_size):
                chunk = latents[start:start + batch_size].to(parameter.device, parameter.dtype) / scaling
                if shift is not None:
                    chunk = chunk + shift
                parts.append(vae.decode(chunk).sample.float().clamp(-1, 1).to(latents.device))
        return torch.cat(parts)

    decode.module = vae  # what the decoded images depend on (``Workload.components``)
    # and how they are decoded: a text-to-image folder's cells written before its pipeline class chose the VAE keys
    # (2026-12-07: every class applied latents mean/std and shift_factor) are recomputed, not reused
    decode.scheme = None if pipeline_class is None else f"decode_latents:{pipeline_class}"

    return decode


def _prompt_key(prompts: Sequence[str], negative: str) -> str:
    payload = json.dumps({"prompts": list(prompts), "negative": negative})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_prompts_apart(encoder: Any, calibration: Sequence[str], evaluation: Sequence[str]) -> None:
    """Refuse a calibration prompt the text encoders read as an evaluation prompt: they see token ids, not strings,
    and CLIP's tokenizer lower-cases and collapses spaces, so "A  Cat" passed the string check against "a cat"
    and the fits were scored on their own prompt."""
    evaluated = {encoder.token_digest([prompt]): prompt for prompt in evaluation}
    shared = [(prompt, evaluated[digest]) for prompt in calibration
              if (digest := encoder.token_digest([prompt])) in evaluated]
    if shared:
        pairs = ", ".join(f"{c!r} (calibration) = {e!r} (evaluation)" for c, e in shared[:3])
        raise ValueError(f"calibration and evaluation prompts must be disjoint (a fit scored on its own prompts "
                         f"proves nothing); the tokenizers read these as one prompt: {pairs}")


def load_workload(model: str | None, *, guidance_scale: float | None = None,
                  calibration_prompts: Sequence[str] = (), evaluation_prompts: Sequence[str] = (),
                  negative_prompt: str = "", labels: str | None = None, null_class: int | None = None,
                  device: torch.device | None = None, dtype: torch.dtype | None = None,
                  distilled_guidance: float | None = None) -> Workload:
    """The workload of ``model`` (a shipped name or a folder), checked before any sampling.

    Text-to-image folders take prompts for calibration and evaluation (the shipped ``t2i`` model brings its own
    disjoint sets); they must not share a prompt. ``guidance_scale=None`` takes the model's default (the shipped
    text-to-image model's recorded one; 1 for every other model). Class-conditional ``UNet2DModel`` folders take
    ``labels``: ``"null"`` samples every image unconditionally with the model's null class, ``"random"`` gives
    sample i a class drawn from (seed, i) — calibration and evaluation seeds differ, so do their labels — with
    guidance against the null class when ``guidance_scale`` > 1. ``null_class`` is the model's "no class" label
    (the shipped photos model's is known; a user's must be given for ``"null"`` or guidance).
    ``distilled_guidance``: the scale a Flux transformer embeds (``None``: the pipeline's default); refused for
    every other model.
    """
    path = resolve_model_path(model)
    name = model if model is not None else "digits"
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist (the shipped models are named "
                                f"{', '.join(SHIPPED_MODELS)})")
    if is_text_to_image_folder(path):
        if labels is not None or null_class is not None:  # they were ignored without a word
            raise ValueError(f"{path} is a text-to-image pipeline, conditioned by prompts: it takes no labels or "
                             "null class (--labels, --null-class); its unconditional branch is the negative prompt")
        return _text_to_image_workload(path, name, guidance_scale, calibration_prompts, evaluation_prompts,
                                       negative_prompt, device, dtype, distilled_guidance)
    if distilled_guidance is not None:
        raise ValueError(f"{path} is not a FluxPipeline folder: it embeds no distilled guidance scale "
                         "(--distilled-guidance); use --guidance-scale")
    if calibration_prompts or evaluation_prompts or negative_prompt:
        raise ValueError(f"{path} is not a text-to-image pipeline (no text_encoder in model_index.json): it takes no "
                         "prompts (--calib-prompts, --eval-prompts, --negative-prompt)")
    if labels is not None and labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    fp, scheduler = load_pipeline_parts(path)
    inputs = adapter_for(fp).conditioning_inputs(fp)
    if tuple(inputs) == ("class_labels",):
        workload = _class_conditional_workload(path, name, fp, scheduler, guidance_scale, labels, null_class)
        return _with_folder_vae(workload, path, device, dtype)
    if inputs:
        raise NotImplementedError(f"{path} holds a {type(fp).__name__} conditioned on {list(inputs)} without a "
                                  "text encoder; tadq run samples unconditional and class-conditional models and "
                                  "text-to-image pipelines")
    if labels is not None or null_class is not None:
        raise ValueError(f"{path} holds an unconditional {type(fp).__name__}: it takes no labels or null class")
    if guidance_scale not in (None, 1.0):
        raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model; {path} is sampled "
                         "unconditionally by tadq run")
    shipped = path.resolve() == shipped_model_path().resolve()
    # FD-digits only for the shipped digits model: digit features on another model's samples mean nothing
    features = DigitsFeatureSpace(adapter_for(fp).sample_shape(fp)[-1]) if shipped else None
    workload = Workload(name=name, model=fp, scheduler=scheduler, features=features)
    return _with_folder_vae(workload, path, device, dtype)


def _with_folder_vae(workload: Workload, path: Path, device: torch.device | None,
                     dtype: torch.dtype | None) -> Workload:
    decoder = folder_vae_decoder(path, device, dtype)
    return workload if decoder is None else dataclasses.replace(workload, decoder=decoder)


# the component that turns a latent model's samples into images, by the name its pipeline gives it: a KL VAE
# (``DiTPipeline``, tadq's latent folders) or the VQ-VAE of ``LDMPipeline`` (CompVis/ldm-celebahq-256); both decode
# ``latents / scaling_factor`` as those pipelines do
LATENT_DECODERS = {"vae": "AutoencoderKL", "vqvae": "VQModel"}


def decoder_component(path: Path) -> str | None:
    """The component of ``path``'s ``model_index.json`` that decodes its latents (``vae`` or ``vqvae``), ``None``
    when it names neither (the samples are images)."""
    index_file = path / "model_index.json"
    index = read_json_file(index_file, "pipeline index") if index_file.exists() else {}
    if not isinstance(index, dict):
        return None
    return next((name for name in LATENT_DECODERS if index.get(name) not in (None, [None, None])), None)


def folder_vae_decoder(path: Path, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> Callable[[Tensor], Tensor] | None:
    """Latents → images with the folder's own decoder (``decoder_component``: the ``vae/`` of a ``DiTPipeline``, the
    ``vqvae/`` of an ``LDMPipeline``, an artefact saved from one); ``None`` when ``model_index.json`` names none
    (the samples are images). A folder whose index names a decoder that is not there is refused, not sampled as
    pixels (an LDM folder's ``vqvae`` was not looked for, and its latents were written as images)."""
    name = decoder_component(path)
    if name is None:
        return None
    import diffusers

    klass = getattr(diffusers, LATENT_DECODERS[name])
    if not (path / name / "config.json").exists():
        raise ValueError(f"{path / 'model_index.json'} names a VAE ({name}) but {path / name} holds none: the "
                         "samples are latents and cannot be turned into images")
    from tadq.pipelines.components import pipeline_load_options

    options = pipeline_load_options(klass, dtype)  # the dtype at load time, as diffusers asks
    try:
        weights = find_weight_files(path / name)  # whole files, and the variant of a variant-only folder
        vae = klass.from_pretrained(path / name, variant=weights.variant, **options)
        require_stored_parameters(vae, weights.files, f"the VAE of {path}")
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"could not load the VAE of {path}: {str(error).splitlines()[0][:300]}") from error
    vae = vae.eval().requires_grad_(False)
    if device is not None:
        vae = vae.to(device)
    return vae_decoder(vae)


@dataclass(frozen=True)
class ClassLabelSetting:
    """How a class-conditional model is sampled: the per-sample labels, the guidance scale, the null class.

    Args:
        source: sample i's label (and the null class of its unconditional branch when guided).
        guidance_scale: classifier-free guidance scale (1: none).
        labels: ``"null"`` (every sample unconditional) or ``"random"`` (labels from (seed, i)).
        null_class: the model's "no class" label (``None``: unknown, and guidance is refused).
        num_classes: how many labels ``"random"`` draws from (the real classes below the null class).
    """

    source: ConditionSource
    guidance_scale: float
    labels: str
    null_class: int | None
    num_classes: int
    guidance_origin: str | None = None  # where a default scale came from: "DiTPipeline's default" (None: given)


def pipeline_default_guidance(path: Path) -> tuple[float, str] | None:
    """(scale, class name) of the ``guidance_scale`` default of the diffusers pipeline class an FP folder's
    ``model_index.json`` names (``DiTPipeline``: 4.0), ``None`` when the folder names none, names a class without
    that parameter (``DDPMPipeline``) or is a tadq artefact (its recipe records its scale)."""
    import inspect

    import diffusers

    from tadq.io import is_quantized_artefact

    index_file = path / "model_index.json"
    if not index_file.is_file() or is_quantized_artefact(path):
        return None
    index = read_json_file(index_file, "pipeline index")
    name = index.get("_class_name") if isinstance(index, dict) else None
    klass = getattr(diffusers, name, None) if isinstance(name, str) else None
    parameter = inspect.signature(klass.__call__).parameters.get("guidance_scale") if callable(klass) else None
    if parameter is None or not isinstance(parameter.default, (int, float)) or isinstance(parameter.default, bool):
        return None
    return float(parameter.default), name


def class_label_setting(path: Path, fp: nn.Module, *, guidance_scale: float | None = None, labels: str | None = None,
                        null_class: int | None = None) -> ClassLabelSetting:
    """The labels of a class-conditional model, checked before any sampling.

    The null class is the user's, else the shipped photos model's, else the one the architecture defines (a DiT's
    label K); the shipped DiT defaults to its recorded guidance scale, an FP folder whose pipeline class has a
    ``guidance_scale`` default (a user's ``DiTPipeline``: 4.0) to that one when it samples random labels and has a
    null class (``pipeline_default_guidance``), every other model to 1 (``guidance_origin`` says where a default
    came from). ``labels`` defaults to ``"null"`` for the shipped photos model and ``"random"`` otherwise."""
    if labels is not None and labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
    shipped = path.resolve() == shipped_photos_path().resolve()
    shipped_dit = path.resolve() == shipped_dit_path().resolve()
    adapter = adapter_for(fp)
    architecture_null = adapter.null_class(fp) if hasattr(adapter, "null_class") else None
    num_embeddings = (int(architecture_null) + 1 if architecture_null is not None
                      else int(getattr(fp.config, "num_class_embeds", None) or 0))
    embed_type = getattr(fp.config, "class_embed_type", None)
    if architecture_null is None and embed_type is not None:  # label vectors, or timestep-embedded label values
        raise ValueError(f"{path}: this {type(fp).__name__}'s class embedding (class_embed_type={embed_type!r}) is "
                         "not a table of classes to draw labels from; quantize and sample it from Python, giving "
                         "its class_labels as conditions= (tadq.quantize, tadq.sample)")
    if shipped and null_class is None:
        from tadq.zoo.photos_model import null_label

        null_class = null_label()
    null_class = architecture_null if null_class is None else null_class
    origin = None
    if shipped_dit and guidance_scale is None:
        from tadq.zoo.dit import DEFAULT_GUIDANCE_SCALE

        guidance_scale, origin = DEFAULT_GUIDANCE_SCALE, "the shipped DiT's default"
    labels = labels or ("null" if shipped else "random")
    pipeline_default = pipeline_default_guidance(path) if guidance_scale is None else None
    if pipeline_default is not None and labels == "random" and null_class is not None:
        # a user's DiTPipeline folder samples at its pipeline's default, as DiTPipeline(...)(class_labels) does
        # (it sampled at 1, without guidance); not with --labels null, nor without a null class to guide against
        guidance_scale, origin = pipeline_default[0], f"{pipeline_default[1]}'s default"
    if null_class is not None and not 0 <= null_class < max(num_embeddings, 1):
        raise ValueError(f"null_class={null_class} is not a label of this model (it has {num_embeddings} class "
                         "embeddings)")
    if null_class is not None and num_embeddings and null_class != num_embeddings - 1:
        # labels are drawn from [0, null_class): a null class inside the table made a real class the unconditional
        # branch and dropped every class above it from the labels, silently
        whose = (f"a {type(fp).__name__}'s null class is its label {architecture_null}, the row trained by label "
                 "dropout" if architecture_null is not None else "tadq draws labels from the classes below it")
        raise ValueError(f"null_class={null_class} is not the last of this model's {num_embeddings} class embeddings "
                         f"({num_embeddings - 1}): {whose}; class {null_class} would stand for 'no class' (the "
                         "unconditional branch) and the classes above it would never be sampled. Give "
                         f"null_class={num_embeddings - 1} (--null-class), or none where the architecture defines it")
    if labels == "null" and null_class is None:
        raise ValueError(f"labels='null' samples with the model's null class: give null_class (--null-class) for "
                         f"{path}")
    guidance_scale = 1.0 if guidance_scale is None else float(guidance_scale)
    if guidance_scale != 1.0 and (labels != "random" or null_class is None):
        raise ValueError(f"guidance (scale {guidance_scale:g}) needs a conditional branch and an unconditional one: "
                         "use labels='random' and give null_class (--labels random --null-class N), or sample "
                         "without guidance (guidance scale 1, where the command takes one)")
    num_classes = null_class if null_class is not None else num_embeddings
    if labels == "null":
        source: ConditionSource = _NullLabels(null_class)
    else:
        if num_classes < 1:
            raise ValueError(f"{path}: no real class below the null class {null_class}")
        source = RandomClassLabels(num_classes, null_class if guidance_scale != 1.0 else None)
    return ClassLabelSetting(source=source, guidance_scale=guidance_scale, labels=labels, null_class=null_class,
                             num_classes=num_classes, guidance_origin=origin)


def _class_conditional_workload(path: Path, name: str, fp: nn.Module, scheduler: Any, guidance_scale: float | None,
                                labels: str | None, null_class: int | None) -> Workload:
    """A class-conditional model: unconditional samples (its null class) or random labels, with guidance; the
    shipped models' classifiers read their classes back (nothing reads a user's classes)."""
    shipped = path.resolve() == shipped_photos_path().resolve()
    shipped_dit = path.resolve() == shipped_dit_path().resolve()
    setting = class_label_setting(path, fp, guidance_scale=guidance_scale, labels=labels, null_class=null_class)
    source = setting.source
    features: FeatureSpace | None = PhotosFeatureSpace() if shipped else None
    if shipped_dit:
        features = DigitsFeatureSpace(int(_shipped_dit_image_size()))
    expected_labels = None
    if (shipped or shipped_dit) and setting.labels == "random":
        def expected_labels(seed: int, count: int) -> Tensor:
            return source(seed, range(count)).class_labels

    return Workload(name=name, model=fp, scheduler=scheduler, calibration_conditions=source,
                    evaluation_conditions=source, guidance_scale=setting.guidance_scale,
                    expected_labels=expected_labels, features=features,
                    settings={"labels": source.key, "guidance_scale": setting.guidance_scale})


def _shipped_dit_image_size() -> int:
    """Side of the images the shipped DiT's VAE decodes (its ``sample_size``)."""
    config = read_json_file(shipped_dit_path() / "vae" / "config.json", "VAE config")
    return int(config["sample_size"])


@dataclass(frozen=True)
class _NullLabels:
    """Every sample gets the model's null class: a class-conditional model sampled unconditionally."""

    null_class: int

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning:
        return Conditioning(class_labels=torch.full((len(indices),), self.null_class, dtype=torch.long))

    @property
    def key(self) -> str:
        return f"null-label-{self.null_class}"


def _text_to_image_workload(path: Path, name: str, guidance_scale: float | None, calibration_prompts: Sequence[str],
                            evaluation_prompts: Sequence[str], negative_prompt: str, device, dtype,
                            distilled_guidance: float | None = None) -> Workload:
    from tadq.pipelines import PromptConditions, load_fp_pipeline
    from tadq.pipelines.components import DISTILLED_GUIDANCE_PIPELINES, pipeline_denoiser, read_model_index
    from tadq.pipelines.prompts import prompt_encoder_for
    from tadq.pipelines.quantized import pipeline_sampler

    shipped = path.resolve() == shipped_t2i_path().resolve()
    expected_labels = None
    features: FeatureSpace | None = None
    if shipped:
        from tadq.zoo.t2i import DEFAULT_GUIDANCE_SCALE
        from tadq.zoo.t2i_prompts import CALIBRATION_PROMPTS, EVALUATION_PROMPTS, digit_of

        calibration_prompts = calibration_prompts or CALIBRATION_PROMPTS
        evaluation_prompts = evaluation_prompts or EVALUATION_PROMPTS
        guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        try:
            labels = [digit_of(prompt) for prompt in evaluation_prompts]
        except ValueError as error:  # measured without prompt agreement, as tadq evaluate does (it was refused)
            logger.warning("prompt agreement not measured: %s", error)
        else:
            def expected_labels(seed: int, count: int) -> Tensor:  # prompts go to samples cyclically
                return torch.tensor([labels[i % len(labels)] for i in range(count)], dtype=torch.long)
    if not calibration_prompts or not evaluation_prompts:
        raise ValueError(f"{path} is a text-to-image pipeline: give calibration and evaluation prompts (two disjoint "
                         "sets, e.g. --calib-prompts FILE --eval-prompts FILE)")
    shared = sorted(set(calibration_prompts) & set(evaluation_prompts))
    if shared:
        raise ValueError(f"calibration and evaluation prompts must be disjoint (a fit scored on its own prompts "
                         f"proves nothing); both hold {shared[:3]}")
    if guidance_scale is None and read_model_index(path)["_class_name"] not in DISTILLED_GUIDANCE_PIPELINES:
        logger.warning("%s: no --guidance-scale, so calibration, fits and evaluation run without classifier-free "
                       "guidance (1.0); text-to-image pipelines are usually sampled at 3-8", path)
    guidance_scale = 1.0 if guidance_scale is None else float(guidance_scale)
    if distilled_guidance is not None and read_model_index(path)["_class_name"] not in DISTILLED_GUIDANCE_PIPELINES:
        raise ValueError(f"{path} is not a FluxPipeline folder: it embeds no distilled guidance scale "
                         "(--distilled-guidance); use --guidance-scale")
    pipeline = load_fp_pipeline(path, device=device, dtype=dtype)
    encoder = prompt_encoder_for(pipeline, distilled_guidance=distilled_guidance)
    calibration = PromptConditions(encoder, list(calibration_prompts), negative_prompt=negative_prompt)
    evaluation = PromptConditions(encoder, list(evaluation_prompts), negative_prompt=negative_prompt)
    _check_prompts_apart(encoder, calibration_prompts, evaluation_prompts)
    decoder = vae_decoder(pipeline.vae, pipeline_class=read_model_index(path)["_class_name"])
    denoiser = pipeline_denoiser(pipeline).eval().requires_grad_(False)  # the UNet, or PixArt/SD3/Flux's transformer
    scheduler = load_pipeline_parts(path)[1]
    workload = Workload(
        name=name, model=denoiser, scheduler=scheduler, calibration_conditions=calibration,
        evaluation_conditions=evaluation, guidance_scale=guidance_scale, decoder=decoder,
        expected_labels=expected_labels, sampler_for=functools.partial(pipeline_sampler, pipeline),
        distilled_guidance=getattr(calibration.encoder, "distilled_guidance", None),
        settings={"calibration_prompts": _prompt_key(calibration_prompts, negative_prompt),
                  "evaluation_prompts": _prompt_key(evaluation_prompts, negative_prompt),
                  "guidance_scale": guidance_scale},
    )
    if workload.distilled_guidance is not None:  # Flux: a model input, so cells at another scale are other cells
        workload = dataclasses.replace(
            workload, settings={**workload.settings, "distilled_guidance": workload.distilled_guidance})
    if shipped:
        features = DigitsFeatureSpace(workload.image_shape()[-1])
        workload = dataclasses.replace(workload, features=features)
    return workload
