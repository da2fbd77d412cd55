"""Which components a diffusers text-to-image pipeline folder needs, checked before anything heavy is loaded.

A Stable Diffusion folder is a ``model_index.json`` naming one sub-folder per component (text encoders, tokenizers,
VAE, UNet, scheduler). ``from_pretrained`` on a folder with a component missing or truncated fails late, deep in
transformers or safetensors, after the other gigabytes have been read; ``check_pipeline_folder`` names the folder
first (a missing config, no safetensors weights, a weights file shorter than its header says).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tadq.io.manifest import check_saved_file
from tadq.safefiles import (
    DIFFUSERS_WEIGHTS,
    TRANSFORMERS_WEIGHTS,
    DamagedFileError,
    diffusers_loading_options,
    find_weight_files,
    finite_float,
    read_json_file,
    require_finite,
    require_stored_parameters,
)

__all__ = ["PIPELINE_COMPONENTS", "PipelineFolderError", "PipelineLayout", "check_pipeline_folder",
           "denoiser_component", "is_pipeline_folder", "load_fp_pipeline", "pipeline_denoiser", "read_model_index"]

logger = logging.getLogger(__name__)

# transformers' own note when a pipeline module names an image processor and torchvision is absent
TORCHVISION_FALLBACK_NOTE = "requires torchvision (not installed); falling back to"


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' note that an image processor falls back to its PIL class without torchvision.

    Resolving a Stable Diffusion pipeline class imports its image processors (safety checker, IP-adapter inputs),
    which tadq never runs; tadq's install leaves torchvision out on purpose, so the note asked every text-to-image
    command's user to install a package that changes nothing here. Only that note is dropped: the logger's other
    records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK_NOTE not in record.getMessage()


def _quiet_torchvision_fallback_note() -> None:
    target = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(existing, _TorchvisionFallbackFilter) for existing in target.filters):
        target.addFilter(_TorchvisionFallbackFilter())


_quiet_torchvision_fallback_note()

# pipeline class → components that must be present (non-null in model_index.json) for tadq to run it. SD3's T5
# (text_encoder_3) may be null: its encode_prompt then gives zeros for that part, as diffusers documents.
PIPELINE_COMPONENTS: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("vae", "text_encoder", "tokenizer", "unet", "scheduler"),
    "StableDiffusionXLPipeline": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "unet",
                                  "scheduler"),
    "PixArtAlphaPipeline": ("vae", "text_encoder", "tokenizer", "transformer", "scheduler"),
    "PixArtSigmaPipeline": ("vae", "text_encoder", "tokenizer", "transformer", "scheduler"),
    "StableDiffusion3Pipeline": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer",
                                 "scheduler"),
    "FluxPipeline": ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer", "scheduler"),
}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# pipeline class → its tokenizers that feed a T5 encoder: they read the call's max_sequence_length tokens, so their
# model_max_length is not used (transformers may even write its "no limit" placeholder there)
T5_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "PixArtAlphaPipeline": ("tokenizer",),
    "PixArtSigmaPipeline": ("tokenizer",),
    "StableDiffusion3Pipeline": ("tokenizer_3",),
    "FluxPipeline": ("tokenizer_2",),
}
# components a pipeline accepts but tadq never uses: loaded as None (a safety checker blacking out images would
# corrupt every comparison; its feature extractor only feeds it), so a folder without them is complete
UNUSED_COMPONENTS = ("safety_checker", "feature_extractor")
# the pipelines whose guidance_scale is a scale the transformer embeds (classifier-free guidance: true_cfg_scale)
DISTILLED_GUIDANCE_PIPELINES = ("FluxPipeline",)


def denoiser_component(class_name: str) -> str:
    """The component that holds a supported pipeline's denoiser: ``unet`` (Stable Diffusion, SDXL) or
    ``transformer`` (PixArt, SD3, Flux)."""
    return "unet" if "unet" in PIPELINE_COMPONENTS.get(class_name, ("unet",)) else "transformer"


def pipeline_denoiser(pipe: Any) -> Any:
    """The FP denoiser module of a pipeline object (its UNet or its transformer)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


class PipelineFolderError(ValueError):
    """A pipeline folder lacks a component the pipeline needs, or one of its files is damaged."""


@dataclass(frozen=True)
class PipelineLayout:
    """What ``model_index.json`` says: the pipeline class and, per present component, (library, class name).

    Args:
        path: the pipeline folder.
        class_name: the diffusers pipeline class (``StableDiffusionPipeline``...).
        components: component name → (library, class name), null entries left out.
        index: the whole ``model_index.json`` (flags such as ``force_zeros_for_empty_prompt``).
        variant: the weights variant to load (``"fp16"``: some component holds ``*.fp16.safetensors`` only, as
            ``save_pretrained(variant="fp16")`` writes); ``None``: every component has plain weights.
    """

    path: Path
    class_name: str
    components: dict[str, tuple[str, str]]
    index: dict[str, Any]
    variant: str | None = None

    @property
    def text_conditioned(self) -> bool:
        """Whether the pipeline encodes prompts (it has a text encoder)."""
        return any(name.startswith("text_encoder") for name in self.components)


def read_model_index(path: str | Path) -> dict[str, Any]:
    """``model_index.json`` of ``path`` as a dict; ``PipelineFolderError`` if absent or not a JSON object."""
    file = Path(path) / "model_index.json"
    if not file.is_file():
        raise PipelineFolderError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    check_saved_file(path, "model_index.json")  # an artefact's: damage named as damage, before it is parsed
    index = read_json_file(file, "pipeline index")
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise PipelineFolderError(f"{file} is not a diffusers pipeline index (no _class_name)")
    return index


def is_pipeline_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a text-conditioned pipeline tadq can run (a supported class in model_index.json)."""
    try:
        return read_model_index(path)["_class_name"] in PIPELINE_COMPONENTS
    except (PipelineFolderError, DamagedFileError, OSError):
        return False


def unsupported_pipeline_note(path: str | Path | None) -> str:
    """For a refusal message: why a folder is not a pipeline tadq takes prompts for. A folder whose
    ``model_index.json`` names another pipeline class with a text encoder (img2img, inpainting...) is named by that
    class, since such a pipeline does take prompts (just not as text-to-image); otherwise it takes none."""
    try:
        index = read_model_index(path) if path is not None else {}
    except (PipelineFolderError, DamagedFileError, OSError):
        index = {}
    class_name = index.get("_class_name")
    encodes = any(name.startswith("text_encoder") for name in _components(index))
    if not encodes or class_name in PIPELINE_COMPONENTS:  # DDPM, DiT...: no text encoder
        return "it takes no prompts"
    return (f"its model_index.json names a {class_name}, which tadq does not drive (it samples text-to-image only, "
            f"{' or '.join(sorted(PIPELINE_COMPONENTS))})")


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    present = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is not None and class_name is not None:
            present[name] = (str(library), str(class_name))
    return present


def _check_json(file: Path, what: str) -> None:
    if not file.is_file():
        raise PipelineFolderError(f"{file.parent} is incomplete: {file.name} ({what}) is missing")
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise PipelineFolderError(f"{file} ({what}) is damaged: not JSON ({error})") from error
    if not isinstance(content, dict):  # diffusers would read a list as a path and try the hub
        raise PipelineFolderError(f"{file} ({what}) is damaged: a JSON {type(content).__name__}, not an object")


def _check_model(folder: Path, weights: bool, library: str) -> str | None:
    """Config readable and (``weights``) the safetensors files ``from_pretrained`` reads whole; returns their
    variant (``None``: plain files; ``"fp16"`` for a component saved with ``variant="fp16"`` only)."""
    _check_json(folder / "config.json", "model config")
    if not weights:
        return None
    stems = {"diffusers": (DIFFUSERS_WEIGHTS,), "transformers": (TRANSFORMERS_WEIGHTS,)}.get(
        library, (DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS))
    try:
        return find_weight_files(folder, stems).variant
    except ValueError as error:
        raise PipelineFolderError(str(error)) from error


def _check_t5_tokenizer(folder: Path) -> None:
    """A T5 tokenizer is ``tokenizer.json`` (read by the tokenizers library) or ``spiece.model`` (read with the
    sentencepiece package, which tadq does not depend on)."""
    if (folder / "tokenizer.json").is_file():
        _check_tokenizers_file(folder / "tokenizer.json")
        return
    model = folder / "spiece.model"
    if not model.is_file():
        raise PipelineFolderError(f"{folder} is incomplete: a T5 tokenizer needs tokenizer.json or spiece.model, "
                                  "and it has neither")
    if model.stat().st_size == 0:
        raise PipelineFolderError(f"{model} is damaged: an empty file")
    if importlib.util.find_spec("sentencepiece") is None:
        raise PipelineFolderError(f"{folder} holds its T5 tokenizer as spiece.model only, which transformers reads "
                                  "with the sentencepiece package (not installed): pip install sentencepiece, or "
                                  "save the tokenizer with tokenizer.json (save_pretrained of a fast tokenizer)")


def _check_tokenizers_file(file: Path) -> None:
    _check_json(file, "tokenizer")
    content = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(content.get("model"), dict) or not isinstance(content.get("added_tokens", []), list):
        raise PipelineFolderError(f"{file} is damaged: not a tokenizers file (no \"model\" object)")


def _check_tokenizer(folder: Path, t5: bool = False) -> None:
    for name, what in (("special_tokens_map.json", "special tokens"), ("added_tokens.json", "added tokens")):
        if (folder / name).is_file():
            _check_json(folder / name, what)
    _check_json(folder / "tokenizer_config.json", "tokenizer config")
    if t5:
        _check_t5_tokenizer(folder)
        return
    length = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    length = length.get("model_max_length") if isinstance(length, dict) else None
    if isinstance(length, bool) or not isinstance(length, int) or not 0 < length <= 1 << 20:
        raise PipelineFolderError(f"{folder / 'tokenizer_config.json'} sets no model_max_length (got {length!r}): "
                                  "prompts are padded to it (CLIP's is 77)")
    if (folder / "tokenizer.json").is_file():
        _check_tokenizers_file(folder / "tokenizer.json")
        return
    _check_json(folder / "vocab.json", "tokenizer vocabulary")
    if not (folder / "merges.txt").is_file():
        raise PipelineFolderError(f"{folder} is incomplete: merges.txt (tokenizer merges) is missing")


def check_pipeline_folder(path: str | Path, *, denoiser_weights: bool = True) -> PipelineLayout:
    """Check every component folder a supported pipeline needs; returns the layout.

    ``denoiser_weights=False`` accepts a ``unet`` / ``transformer`` folder with a config only (a tadq artefact,
    whose denoiser weights are tadq's integer codes). Reads configs and safetensors headers only, so it is cheap on
    a real model.

    Raises:
        PipelineFolderError: not a pipeline folder, an unsupported pipeline class, a component missing (named),
            a config that is not JSON, weights missing or truncated.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"pipeline folder {path} does not exist")
    index = read_model_index(path)
    class_name = index["_class_name"]
    if class_name not in PIPELINE_COMPONENTS:
        raise PipelineFolderError(f"{path} holds a {class_name}; tadq runs prompt pipelines of the classes "
                                  f"{sorted(PIPELINE_COMPONENTS)}")
    components = _components(index)
    absent = [name for name in PIPELINE_COMPONENTS[class_name] if name not in components]
    if absent:
        raise PipelineFolderError(f"{path}/model_index.json lists no {absent[0]!r}, which a {class_name} needs")
    variants: dict[str, str] = {}
    for name, (library, component_class) in sorted(components.items()):
        folder = path / name
        if name in UNUSED_COMPONENTS:  # loaded as None: not read, so neither needed nor checked
            continue
        if not folder.is_dir():
            raise PipelineFolderError(f"{path} is incomplete: the component folder {name}/ ({component_class}) named "
                                      "in model_index.json is missing")
        if name.startswith("tokenizer"):
            _check_tokenizer(folder, t5=name in T5_TOKENIZERS.get(class_name, ()))
        elif name == "scheduler":
            _check_json(folder / "scheduler_config.json", "scheduler config")
        else:
            variant = _check_model(folder, denoiser_weights or name != denoiser_component(class_name), library)
            if variant is not None:
                variants[name] = variant
    _check_consistency(path, index, components)
    if len(set(variants.values())) > 1:  # from_pretrained takes one variant for the whole pipeline
        given = ", ".join(f"{name} {variant}" for name, variant in sorted(variants.items()))
        raise PipelineFolderError(f"{path}: components hold weights of different variants only ({given}); diffusers "
                                  "loads one variant per pipeline: re-save the components with one variant")
    variant = next(iter(variants.values()), None)
    if variant is not None:  # components with plain weights as well load the variant too (one argument for all)
        logger.info("%s: %s hold %r weights only; loading the pipeline's %r variant", path, sorted(variants),
                    variant, variant)
    return PipelineLayout(path, class_name, components, index, variant)


def _config_value(path: Path, component: str, key: str) -> Any:
    config = read_json_file(path / component / "config.json", f"{component} config")
    return config.get(key) if isinstance(config, dict) else None


def _all_ints(*values: Any) -> bool:
    """Every value a JSON integer (not a bool): the cross-component checks compare only configs that give them."""
    return all(isinstance(v, int) and not isinstance(v, bool) for v in values)


def _check_consistency(path: Path, index: dict[str, Any], components: dict[str, tuple[str, str]]) -> None:
    """What ``from_pretrained`` would only find deep in transformers or at the first UNet call, or never (a wrong
    flag type read as true, a zero VAE scale decoding to NaN), from the configs alone."""
    flag = index.get("force_zeros_for_empty_prompt")
    if flag is not None and not isinstance(flag, bool):
        raise PipelineFolderError(f"{path}/model_index.json: force_zeros_for_empty_prompt must be true or false "
                                  f"(JSON), got {flag!r}")
    scale = _config_value(path, "vae", "scaling_factor")
    if scale is not None and (not finite_float(scale) or scale <= 0):
        raise PipelineFolderError(f"{path}/vae/config.json: scaling_factor must be a positive number (latents are "
                                  f"divided by it before decoding), got {scale!r}")
    shift = _config_value(path, "vae", "shift_factor")
    if shift is not None and not finite_float(shift):
        raise PipelineFolderError(f"{path}/vae/config.json: shift_factor must be a finite number (added to the "
                                  f"latents before decoding, SD3 and Flux), got {shift!r}")
    _check_latent_channels(path, index["_class_name"], components)
    _check_token_positions(path, index["_class_name"], components)
    if "unet" not in components:  # a transformer pipeline: its encode_prompt pads and projects the text itself
        return
    encoders = [name for name in ("text_encoder", "text_encoder_2") if name in components]
    widths = [_config_value(path, name, "hidden_size") for name in encoders]
    expected = _config_value(path, "unet", "cross_attention_dim")
    if encoders and isinstance(expected, int) and all(isinstance(w, int) and not isinstance(w, bool) for w in widths) \
            and sum(widths) != expected:
        given = " + ".join(f"{name} {width}" for name, width in zip(encoders, widths, strict=True))
        raise PipelineFolderError(f"{path}: the text encoders' hidden_size ({given}) does not match the UNet's "
                                  f"cross_attention_dim {expected} (unet/config.json); the components are not from "
                                  "one model")
    projection = _config_value(path, "text_encoder_2", "projection_dim") if "text_encoder_2" in components else None
    time_dim = _config_value(path, "unet", "addition_time_embed_dim")
    added = _config_value(path, "unet", "projection_class_embeddings_input_dim")
    if _config_value(path, "unet", "addition_embed_type") == "text_time" and _all_ints(projection, time_dim, added) \
            and added != projection + 6 * time_dim:
        raise PipelineFolderError(
            f"{path}/unet/config.json: projection_class_embeddings_input_dim {added} is not text_encoder_2's "
            f"projection_dim {projection} + 6 time ids x addition_time_embed_dim {time_dim} = "
            f"{projection + 6 * time_dim}; a refiner UNet (5 time ids with an aesthetic score) belongs to a "
            "StableDiffusionXLImg2ImgPipeline, which tadq does not drive")


def _check_token_positions(path: Path, class_name: str, components: dict[str, tuple[str, str]]) -> None:
    """A CLIP tokenizer pads every prompt to its ``model_max_length``, which its text encoder must hold positions
    for (``max_position_embeddings``; CLIP's 77 and 77). A tokenizer from another model (or an edited config) with a
    longer length loaded every component and then failed at the first prompt with transformers' "Sequence length
    must be less than max_position_embeddings", naming neither folder (SDXL, SD3: which of two encoders?). T5
    tokenizers are not held to it: T5 reads the call's ``max_sequence_length`` and has relative positions."""
    t5 = T5_TOKENIZERS.get(class_name, ())
    for tokenizer in sorted(name for name in components if name.startswith("tokenizer") and name not in t5):
        encoder = "text_encoder" + tokenizer.removeprefix("tokenizer")
        if encoder not in components:
            continue
        config = read_json_file(path / tokenizer / "tokenizer_config.json", f"{tokenizer} config")
        length = config.get("model_max_length") if isinstance(config, dict) else None
        positions = _config_value(path, encoder, "max_position_embeddings")
        if _all_ints(length, positions) and length > positions:
            raise PipelineFolderError(
                f"{path}: {tokenizer}/tokenizer_config.json pads prompts to model_max_length {length} tokens, but "
                f"{encoder} holds {positions} positions (max_position_embeddings, {encoder}/config.json); the "
                "tokenizer and the text encoder are not from one model")


def _check_latent_channels(path: Path, class_name: str, components: dict[str, tuple[str, str]]) -> None:
    """The VAE must decode the latents the denoiser samples: its ``latent_channels`` equal to the denoiser's
    ``in_channels`` (Flux: ``in_channels`` / 4, its 2×2 patches packed). A VAE from another model (SD3's or
    Flux's 16-channel one in a 4-channel pipeline) was not noticed: ``tadq quantize`` calibrated and saved the
    artefact, and every ``tadq sample`` ended in a conv traceback after the whole sampling loop. Configs that do
    not give both numbers pass (diffusers' defaults apply, and the adapters check the denoiser's)."""
    if "vae" not in components:
        return
    denoiser = denoiser_component(class_name)
    latent = _config_value(path, "vae", "latent_channels")
    given = _config_value(path, denoiser, "in_channels")
    if not _all_ints(latent, given):
        return
    packed = class_name == "FluxPipeline"  # FluxTransformer2DModel takes 2×2 latent patches as 4C channels
    expected = 4 * latent if packed else latent
    if given != expected:
        read = f"{given} (2×2 patches of {given / 4:g} channels)" if packed else str(given)
        raise PipelineFolderError(
            f"{path}: vae/config.json has latent_channels {latent}, but the {denoiser} samples latents of "
            f"in_channels {read} ({denoiser}/config.json); the VAE could not decode them: the components are not "
            "from one model")


def pipeline_class(class_name: str) -> type:
    """The diffusers class of a supported pipeline."""
    import diffusers

    if class_name not in PIPELINE_COMPONENTS:
        raise PipelineFolderError(f"{class_name} is not a pipeline tadq runs; supported: "
                                  f"{sorted(PIPELINE_COMPONENTS)}")
    return getattr(diffusers, class_name)


def _dtype_keyword() -> str:
    """``dtype`` where diffusers resolves it (``torch_dtype`` deprecated there), ``torch_dtype`` before."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def pipeline_load_options(klass: type, dtype: torch.dtype | None, layout: PipelineLayout | None = None
                          ) -> dict[str, Any]:
    """``from_pretrained`` options: local files only, safetensors only, no safety checker nor its feature extractor
    (tadq measures images, a checker blacking some out would corrupt every comparison), ``None`` for every
    component the folder's ``model_index.json`` leaves null on purpose (SD3 without its T5: diffusers only takes
    that as an argument), the layout's weights variant (a folder saved with ``variant="fp16"`` only), and
    ``diffusers_loading_options`` (tadq's one rule for ``low_cpu_mem_usage``)."""
    options: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, **diffusers_loading_options()}
    if layout is not None:
        accepted = inspect.signature(klass.__init__).parameters
        options.update({name: None for name, value in layout.index.items()
                        if name in accepted and value in ([None, None], None) and name not in layout.components})
    if layout is not None and layout.variant is not None:
        options["variant"] = layout.variant
    if dtype is not None:
        options[_dtype_keyword()] = dtype
    parameters = inspect.signature(klass.__init__).parameters
    options.update({name: None for name in UNUSED_COMPONENTS if name in parameters})
    if "requires_safety_checker" in parameters:
        options["requires_safety_checker"] = False
    return options


def _failed_component(error: BaseException) -> str | None:
    """The component diffusers was loading when ``error`` was raised: the ``name`` of its ``load_sub_model`` frame
    (a wrong-typed config value fails deep in a diffusers block or in transformers' config validation, with a
    message that names no file). ``None`` when the error came from elsewhere."""
    component, trace = None, error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name == "load_sub_model":
            name = trace.tb_frame.f_locals.get("name")
            component = name if isinstance(name, str) else component
        trace = trace.tb_next
    return component


def _require_component_classes(layout: PipelineLayout, given: dict[str, Any]) -> None:
    """Refuse a model_index.json entry naming a class its library lacks (a typo, or a folder written by a newer
    diffusers or transformers): diffusers fails inside that component's loading, which read as a damaged component
    config, where the file to mend is model_index.json."""
    for name, (library, class_name) in sorted(layout.components.items()):
        if name in given or name in UNUSED_COMPONENTS or library not in ("diffusers", "transformers"):
            continue
        module = importlib.import_module(library)
        if not hasattr(module, class_name):
            written = layout.index.get("_diffusers_version")
            raise PipelineFolderError(
                f"{layout.path / 'model_index.json'}: its component {name!r} is a {library} {class_name}, a class "
                f"{library} {getattr(module, '__version__', '')} does not have (a typo, or a folder written by a "
                f"newer version{f'; diffusers {written} wrote it' if written else ''}): correct the class name or "
                f"upgrade {library}")


def load_components(klass: type, layout: PipelineLayout, **options: Any) -> Any:
    """``klass.from_pretrained`` on the checked folder; a component whose config does not describe its weights
    (an edited config, config and weights from two downloads) raises ``PipelineFolderError`` naming it, not
    diffusers' traceback; so does a diffusers model (UNet, transformer, VAE) whose files lack one of its parameters,
    which diffusers would have filled with random values and only logged."""
    _require_component_classes(layout, options)
    try:
        pipe = klass.from_pretrained(str(layout.path), **options)
    except Exception as error:  # re-raised below unless it came from loading one component
        component = _failed_component(error)
        if component is None and not isinstance(error, (RuntimeError, OSError)):
            raise
        first = " ".join(str(error).split())[:300] or type(error).__name__
        named = [component] if component is not None else [
            name for name, (_library, class_name) in sorted(layout.components.items()) if class_name in first]
        where = f"{layout.path / named[0]}" if named else str(layout.path)
        if named and not named[0].startswith(("scheduler", "tokenizer")) and isinstance(error, (RuntimeError,
                                                                                             OSError)):
            why = "its config.json does not describe its weights (an edited config, or files from two models)"
        elif named and named[0].startswith("tokenizer"):  # tokenizer.json / vocab files, not only a config
            why = "its files are damaged or edited (restore the folder from the model's download)"
        else:  # a scheduler holds no weights: its config is what diffusers could not build from
            why = "its config holds a value diffusers does not take (an edited config?)"
        raise PipelineFolderError(f"{where}: diffusers could not load it ({type(error).__name__}: {first}); "
                                  f"{why}") from error
    for name, (library, _class_name) in sorted(layout.components.items()):
        module = getattr(pipe, name, None)
        if name in options or name in UNUSED_COMPONENTS or not isinstance(module, torch.nn.Module):
            continue  # given by the caller (a quantized denoiser), or not a model
        try:
            if library == "transformers":  # transformers renames old checkpoint keys: it says itself what it read
                _require_loaded_transformers_weights(module, str(layout.path / name))
            elif library == "diffusers":
                files = find_weight_files(layout.path / name, (DIFFUSERS_WEIGHTS,), prefer=layout.variant).files
                require_stored_parameters(module, files, str(layout.path / name))
            require_finite(dict(module.named_parameters()), f"{layout.path / name}: weight")
        except (DamagedFileError, ValueError) as error:
            raise PipelineFolderError(str(error)) from error
    return pipe


def _require_loaded_transformers_weights(module: torch.nn.Module, where: str) -> None:
    """Raise ``DamagedFileError`` naming a parameter of a transformers model (a text encoder) that its weight files
    did not hold: transformers fills it with random values and only prints a load report, so a text encoder file
    missing a tensor encoded every prompt with a partly random network. Transformers marks each tensor it loaded
    (``_is_hf_initialized``) after renaming old checkpoint keys; a version that marks none is not checked."""
    marks = {name: getattr(parameter, "_is_hf_initialized", False) for name, parameter in module.named_parameters()}
    if not any(marks.values()):
        return
    optional = [re.compile(pattern) for pattern in getattr(module, "_keys_to_ignore_on_load_missing", None) or ()]
    missing = [name for name, loaded in marks.items()
               if not loaded and not any(pattern.search(name) for pattern in optional)]
    if missing:
        raise DamagedFileError(f"{where}: its weights lack {len(missing)} of the {type(module).__name__}'s "
                               f"parameters (e.g. {', '.join(missing[:3])}), which transformers filled with random "
                               "values; the weight files are incomplete or belong to another config.json")


def quantize_text_encoders(pipe: Any, bits: int | None) -> None:
    """Weight-only ``bits``-bit quantization of every text encoder's Linear layers in place (``None``: none);
    recorded as ``pipe.tadq_text_encoder_bits`` (``tadq.pipelines.text_weights``)."""
    from tadq.pipelines.text_weights import quantize_linear_weights

    if bits is not None:
        for name in TEXT_ENCODERS:
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                layers = quantize_linear_weights(encoder, bits)
                logger.info("%s: %d Linear layers quantized to %d-bit weights", name, len(layers), bits)
    pipe.tadq_text_encoder_bits = bits


def load_fp_pipeline(path: str | Path, *, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None, text_encoder_bits: int | None = None) -> Any:
    """The diffusers pipeline object of a local folder (no hub access), safety checker disabled.

    The folder is checked first (``check_pipeline_folder``), so a missing or damaged component is named before
    any weights are read. ``text_encoder_bits`` (8 or 4; off by default) quantizes the text encoders' Linear
    weights per output channel (``tadq.pipelines.text_weights``): calibrate and deploy with the same value.
    """
    from tadq.pipelines.text_weights import TEXT_ENCODER_BITS

    if text_encoder_bits is not None and text_encoder_bits not in TEXT_ENCODER_BITS:
        raise ValueError(f"text_encoder_bits must be one of {TEXT_ENCODER_BITS} or None, got {text_encoder_bits!r}")
    from tadq.device import resolve_device, resolve_dtype

    target_device = resolve_device(device) if device is not None else None
    target_dtype = resolve_dtype(dtype) if dtype is not None else None
    layout = check_pipeline_folder(path)
    klass = pipeline_class(layout.class_name)
    pipe = load_components(klass, layout, **pipeline_load_options(klass, target_dtype, layout))
    quantize_text_encoders(pipe, text_encoder_bits)
    if target_device is not None:
        pipe = pipe.to(target_device)
    return pipe
