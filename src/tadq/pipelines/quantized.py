"""``tadq.load_pipeline``: a diffusers pipeline object whose ``__call__`` runs tadq's sampling loop.

diffusers' own loop cannot apply tadq's corrections: they are per-step hooks of tadq's walker, keyed to the sampler
grid and the guidance scale they were fitted for (docs/sampling.md). So the loaded pipeline is an instance of a
subclass of its own class, made at load time, whose ``__call__`` encodes the prompts with the pipeline's encoders
(``PromptConditions``), samples latents with ``tadq.sample`` (the quantized denoiser and its correction hooks, the
noise of sample i a function of (seed, i) only), decodes them with the VAE and post-processes them with the
pipeline's image processor. Everything else (components, ``.to``, ``save_pretrained`` of the FP parts) is the
pipeline's own.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadq.pipelines.components import (
    DISTILLED_GUIDANCE_PIPELINES,
    PipelineFolderError,
    check_pipeline_folder,
    denoiser_component,
    load_components,
    pipeline_class,
    pipeline_denoiser,
    pipeline_load_options,
    quantize_text_encoders,
)
from tadq.pipelines.prompts import PromptConditions, build_prompt_encoder
from tadq.pipelines.text_weights import TEXT_ENCODER_BITS
from tadq.safefiles import read_json_file
from tadq.sampling import MAX_SEED, SamplerConfig, check_drivable, check_guidance_scale

__all__ = ["load_pipeline", "TadqPipelineMixin", "check_drivable_scheduler", "check_pipeline_guidance",
           "check_true_cfg_negative",
           "check_sampler_family", "decode_latents", "vae_input",
           "latent_shape", "pipeline_flow_shift", "pipeline_sampler", "resolve_deployment", "tadq_pipeline_class"]

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_SUBCLASSES: dict[type, type] = {}


def _fitted_keys(denoiser: nn.Module) -> list[tuple[str, str, float]]:
    """(correction, sampler key, guidance scale) of every fitted per-step table the denoiser carries."""
    keys = []
    for member in getattr(denoiser, "corrections", ()):
        table_key = getattr(member, "table_key", None)
        if table_key is not None:
            keys.append((type(member).__name__, table_key.sampler_key, float(table_key.guidance_scale)))
        elif getattr(member, "sampler_key", None) is not None:  # TFMQ's per-step state: no guidance in its key
            keys.append((type(member).__name__, member.sampler_key, float("nan")))
    return keys


def resolve_deployment(denoiser: nn.Module, recipe: Any, num_inference_steps: int | None, guidance_scale: float | None,
                       eta: float | None, default_guidance: float, kind: str | None = None,
                       default_sampler: SamplerConfig | None = None, order: int | None = None
                       ) -> tuple[SamplerConfig, float]:
    """(sampler, guidance scale) for a call: the recipe's deployment with the given values applied; without a
    recipe ``default_sampler`` (default DDIM 50, η 0). ``order``: dpmsolver++'s, with ``kind``.

    Raises ``ValueError`` before any work when the model carries per-step tables fitted for another grid or
    guidance scale (they are keyed; a model without corrections takes any).
    """
    fallback = default_sampler if default_sampler is not None else SamplerConfig("ddim", num_steps=50, eta=0.0)
    sampler = recipe.sampler if recipe is not None else fallback
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) \
                or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        sampler = dataclasses.replace(sampler, num_steps=num_inference_steps)
    if kind is not None and (kind != sampler.kind or order not in (None, sampler.order)):
        # dpmsolver++'s order, flow-euler's shift and grid are theirs
        sampler = dataclasses.replace(sampler, kind=kind, eta=0.0 if eta is None else sampler.eta, order=order,
                                      shift=None, flow_sigmas=None)
    if eta is not None:
        sampler = dataclasses.replace(sampler, eta=float(eta))
    default = recipe.guidance_scale if recipe is not None else default_guidance
    scale = check_guidance_scale(default if guidance_scale is None else guidance_scale)
    for name, key, fitted_scale in _fitted_keys(denoiser):
        if key != sampler.key:
            raise ValueError(f"this model's {name} was fitted for {key}, not {sampler.key} (num_inference_steps/eta); "
                             "call it with the steps it was quantized for, or quantize again for these")
        if fitted_scale == fitted_scale and fitted_scale != scale:  # NaN: a table not keyed by guidance
            raise ValueError(f"this model's {name} was fitted at guidance_scale={fitted_scale:g}, not {scale:g}; "
                             "the guided noise estimate (and its quantization error) changes with the scale: call "
                             "it at the fitted scale, or quantize again for this one")
    return sampler, scale


def _prompt_list(prompt: str | Sequence[str] | None, what: str = "prompt") -> list[str]:
    if prompt is None:
        raise ValueError(f"{what} is required: tadq's pipeline encodes prompts itself (prompt_embeds is not taken)")
    if not isinstance(prompt, (str, list, tuple)):
        raise TypeError(f"{what} must be a str or a list of str, got {type(prompt).__name__}: {prompt!r}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError(f"{what} is an empty list")
    for text in prompts:  # a None inside a negative list would silently become the empty prompt (SDXL: zeros)
        if not isinstance(text, str):
            raise TypeError(f"a {what.replace('_', ' ')} must be a str, got {type(text).__name__}: {text!r}")
    return prompts


def _integer(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``: Python and NumPy integers (``operator.index``, as diffusers takes them),
    not bools or floats."""
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return number


def _real(value: Any, name: str) -> float | None:
    """``value`` as a float (Python and NumPy reals, as diffusers takes them), ``None`` kept; anything else, a
    bool or a string included, is a ``TypeError`` naming the argument (a string was converted, silently)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    return float(value)


# diffusers' Stable Diffusion pipelines take these deprecated arguments through **kwargs (and pop them)
_DEPRECATED_KWARGS = ("callback", "callback_steps")


def _check_unsupported(pipe: Any, unsupported: dict[str, Any]) -> None:
    """``TypeError`` for every extra keyword: a name the diffusers class does not take at all (a typo: refused
    whatever its value, as Python refuses an unexpected keyword; diffusers' SD, SDXL and PixArt would swallow it
    into ``**kwargs``), and a diffusers argument tadq does not implement unless it is ``None``."""
    base = pipe.tadq_base
    known = {name for name, parameter in inspect.signature(base.__call__).parameters.items()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD} | set(_DEPRECATED_KWARGS)
    unknown = sorted(name for name in unsupported if name not in known)
    if unknown:
        raise TypeError(f"{type(pipe).__name__}.__call__() got unexpected keyword argument(s) {unknown}: neither "
                        f"tadq nor {base.__name__} takes them")
    given = sorted(name for name, value in unsupported.items() if value is not None)
    if given:
        raise TypeError(f"{type(pipe).__name__} runs tadq's sampling loop and does not take {given}; supported: "
                        "prompt, negative_prompt, num_inference_steps, guidance_scale, num_images_per_prompt, "
                        "eta, seed, generator, height, width, output_type, return_dict, batch_size, progress "
                        "(true_cfg_scale: Flux; max_sequence_length: PixArt, SD3, Flux)")


def _generator_seed(generator: torch.Generator) -> int:
    """The run seed of a call given ``generator``: its initial seed, which keys every sample's noise (tadq draws
    nothing from the generator itself). Refused when the generator is not in the state ``manual_seed`` left it in:
    diffusers draws from the generator's current state, so a generator used before (by an earlier call: each call
    consumes it, ``_consume``) would give the images of its first use again here, silently."""
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be one torch.Generator (tadq keys every sample's noise by (seed, index))")
    seed = generator.initial_seed()
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"generator: its initial seed {seed} is above 2**32 - 1 (an unseeded "
                         "torch.Generator has a 64-bit one); tadq keys every sample's noise by a 32-bit seed and "
                         "the sample index, so seed it with manual_seed(s), s < 2**32, or pass seed=s")
    fresh = torch.Generator(device=generator.device).manual_seed(seed)
    if not torch.equal(fresh.get_state(), generator.get_state()):
        raise ValueError(f"generator: it has been drawn from since manual_seed({seed}) (by torch, or by an earlier "
                         "call of this pipeline); tadq draws every sample's noise from the initial seed and the "
                         "sample index, so this call would repeat the images of its first use instead of new ones as "
                         "in diffusers. Seed it again (manual_seed) for each call, or pass seed=")
    return int(seed)


def _consume(generator: torch.Generator | None) -> None:
    """Advance ``generator`` once, so that passing it to another call is refused (``_generator_seed``) instead of
    repeating this call's images."""
    if generator is not None:
        torch.randint(0, 2, (1,), generator=generator, device=generator.device)


def _warn_latent_clipping(scheduler: Any, sampler: SamplerConfig) -> None:
    """Say so when a DDIM/DDPM sampler would clip x̂₀ to ±clip_sample_range on latents only because the folder's
    config (another scheduler class, e.g. PixArt's DPM-Solver) names no ``clip_sample`` and DDIM's default is on:
    latents are not bounded to [-1, 1], and diffusers' ``from_config`` would clip them the same way, silently."""
    if sampler.kind not in ("ddim", "ddpm") or sampler.clip_sample is not None or "clip_sample" in scheduler.config:
        return
    from tadq.sampling import make_scheduler

    built = make_scheduler(scheduler, sampler)
    if built.config.get("clip_sample"):
        logger.warning("%s on this latent pipeline clips x̂₀ to ±%g: the folder's %s config names no clip_sample, so "
                       "%s's default (on) applies, as diffusers' from_config does; latents are not bounded to "
                       "[-1, 1]. Pass SamplerConfig(..., clip_sample=False) (tadq quantize: --set "
                       "sampler.clip_sample=false) unless the clipping is meant", sampler.kind,
                       built.config.get("clip_sample_range", 1.0), type(scheduler).__name__, type(built).__name__)


def check_pipeline_guidance(scale: float) -> float:
    """``scale`` unless it lies in [0, 1): diffusers' pipelines read any scale <= 1 as "no guidance" (the prompt
    alone), tadq's mix ε_u + w(ε_c − ε_u) at w < 1 leans toward the unconditional branch (w = 0: the prompt is
    ignored), so such a scale would silently give other images than the diffusers call it imitates."""
    if 0 <= scale < 1:
        raise ValueError(f"guidance_scale={scale:g}: diffusers reads a scale <= 1 as no guidance (the prompt alone), "
                         f"tadq's guidance at {scale:g} < 1 leans toward the unconditional branch (0: the prompt is "
                         "ignored); give 1 for no guidance, or a scale > 1")
    return scale


def check_true_cfg_negative(scale: float | None, negative_prompt: Any, scale_name: str = "true_cfg_scale",
                            negative_name: str = "negative_prompt") -> None:
    """Refuse Flux's classifier-free guidance ``scale`` > 1 without a negative prompt: ``FluxPipeline`` guides only
    against a negative prompt it is given and samples without guidance otherwise, while tadq's loop would guide
    against the empty prompt. The pipeline call (``true_cfg_scale``) and ``tadq sample`` (``--guidance-scale``)
    refuse it alike, named by ``scale_name`` and ``negative_name``."""
    if scale is not None and scale > 1 and negative_prompt is None:
        flag = scale_name.startswith("--")  # a command's flags, else the call's keywords
        given = f"{scale_name} {scale:g}" if flag else f"{scale_name}={scale:g}"
        empty = f"{negative_name} ''" if flag else '""'
        raise ValueError(f"{given} without a {negative_name}: FluxPipeline then samples without guidance; give the "
                         f"negative prompt to guide against ({empty} for the empty prompt), or drop {scale_name}")


class TadqPipelineMixin:
    """Put before the pipeline class: ``__call__`` runs tadq's loop (module docstring).

    Attributes (set by ``load_pipeline``):
        tadq_denoiser: the ``QuantizedDenoiser`` (its ``model`` is ``self.unet`` / ``self.transformer``), or the FP
            denoiser itself.
        tadq_recipe: the artefact's ``Recipe`` (deployment sampler and guidance scale), ``None`` for FP.

    Guidance: ``guidance_scale`` is classifier-free guidance, except for Flux, whose ``guidance_scale`` is the
    distilled scale its transformer embeds (FluxPipeline's meaning) and whose classifier-free guidance is
    ``true_cfg_scale`` (default 1: none), as in diffusers.
    """

    tadq_base: type  # the diffusers pipeline class this one extends
    tadq_denoiser: nn.Module
    tadq_recipe: Any = None
    tadq_scheduler_class: type | None = None  # pipe.scheduler's class when loaded (tadq_swapped_sampler)

    def __call__(  # noqa: PLR0913 -- the diffusers call signature
        self, prompt: str | Sequence[str] | None = None, *, negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None, guidance_scale: float | None = None, num_images_per_prompt: int = 1,
        eta: float | None = None, seed: int | None = None, generator: torch.Generator | None = None,
        height: int | None = None, width: int | None = None, output_type: str = "pil", return_dict: bool = True,
        batch_size: int = 8, progress: bool | None = None, true_cfg_scale: float | None = None,
        max_sequence_length: int | None = None, **unsupported: Any,
    ) -> Any:
        """Images for ``prompt`` as the diffusers pipeline returns them (``.images``), sampled by tadq.

        ``seed`` (or ``generator``'s initial seed; default 0) fixes every sample's noise: sample i (prompts
        repeated ``num_images_per_prompt`` times, prompt-major) draws it from (seed, i), whatever the batch. A
        generator must be freshly seeded (``manual_seed``) and is consumed by the call: passing it again is refused,
        where diffusers would draw new noise from it and tadq would repeat the images.
        ``progress`` (default: on unless ``set_progress_bar_config(disable=True)``) shows tadq's sampling bar.
        ``num_inference_steps``, ``guidance_scale`` and ``eta`` default to the artefact recipe's deployment.
        ``max_sequence_length`` (T5 tokens; PixArt, SD3, Flux) defaults to the pipeline's own.
        Everything but ``prompt`` is keyword-only: diffusers' second positional parameter is ``height`` (SD) or
        ``prompt_2`` (SDXL), so a positional value would silently mean something else here.
        """
        if self.tadq_base.__name__.startswith("PixArt"):  # False asks for what tadq does: prompts as given, and
            for name in ("clean_caption", "use_resolution_binning"):  # the transformer's own size
                if unsupported.get(name) is False:
                    unsupported.pop(name)
        _check_unsupported(self, unsupported)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; accepted: {OUTPUT_TYPES}")
        if generator is not None and seed is not None:
            raise ValueError("give seed or generator, not both")
        if generator is not None:
            seed = _generator_seed(generator)
        else:
            seed = _integer(0 if seed is None else seed, "seed", 0)
        num_images_per_prompt = _integer(num_images_per_prompt, "num_images_per_prompt")
        batch_size = _integer(batch_size, "batch_size")
        if num_inference_steps is not None:
            num_inference_steps = _integer(num_inference_steps, "num_inference_steps")
        if progress is None:  # diffusers' pipe.set_progress_bar_config(disable=True) silences tadq's bar too
            progress = not getattr(self, "_progress_bar_config", {}).get("disable", False)
        self._check_size(height, width)
        given_prompts = _prompt_list(prompt)
        prompts = [p for p in given_prompts for _ in range(num_images_per_prompt)]
        negatives = negative_prompt
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            given_negatives = _prompt_list(negative_prompt, "negative_prompt")
            if len(given_negatives) != len(given_prompts):  # before the repetition, in the caller's counts
                raise ValueError(f"{len(given_negatives)} negative prompts for {len(given_prompts)} prompts; give "
                                 "one str for all, or a list with one per prompt (as diffusers)")
            negatives = [n for n in given_negatives for _ in range(num_images_per_prompt)]
        guidance_scale, eta = _real(guidance_scale, "guidance_scale"), _real(eta, "eta")
        true_cfg_scale = _real(true_cfg_scale, "true_cfg_scale")
        distilled = None
        if self.tadq_distilled_guidance:  # Flux: guidance_scale is embedded, true_cfg_scale is CFG
            distilled, guidance_scale = guidance_scale, true_cfg_scale
            if true_cfg_scale is not None and not 1 <= true_cfg_scale < math.inf:  # named as the caller gave it
                raise ValueError(f"true_cfg_scale={true_cfg_scale:g}: give 1 (the default: no classifier-free "
                                 "guidance; FluxPipeline reads any scale <= 1 so) or a finite scale > 1; tadq's "
                                 "guidance below 1 would lean toward the negative prompt")
            check_true_cfg_negative(true_cfg_scale, negative_prompt)
        elif true_cfg_scale is not None:
            raise TypeError(f"true_cfg_scale is Flux's classifier-free guidance; {type(self).__name__} takes "
                            "guidance_scale for it")
        swapped = self.tadq_swapped_sampler()
        sampler, scale = self.tadq_deployment(num_inference_steps, guidance_scale, eta,
                                              None if swapped is None else swapped.kind,
                                              None if swapped is None else swapped.order)
        if negative_prompt is not None and scale == 1:
            logger.warning("negative_prompt is not used: %s=1 samples the prompt alone (no classifier-free "
                           "guidance), as %s does", "true_cfg_scale" if self.tadq_distilled_guidance
                           else "guidance_scale", self.tadq_base.__name__)
        encoder = self.tadq_prompt_encoder(max_sequence_length, distilled)
        conditions = PromptConditions(encoder, prompts, negatives)  # checks the prompts' length before any work
        _consume(generator)
        latents = self.tadq_latents(conditions, len(prompts), sampler, scale, seed, batch_size, progress)
        images = self.tadq_latent_output(latents) if output_type == "latent" \
            else self.tadq_decode(latents, output_type, batch_size)
        return self._tadq_output(images, return_dict)

    def tadq_latent_output(self, latents: Tensor) -> Tensor:
        """``output_type="latent"`` as the diffusers class returns it: Flux's packed token sequence
        (N, (h/2)(w/2), 4C), which ``FluxPipeline._unpack_latents`` takes back; the (N, C, h, w) latents otherwise."""
        if self.tadq_base.__name__ != "FluxPipeline":
            return latents
        from tadq.adapters.mmdit import pack_latents

        return pack_latents(latents)

    @property
    def tadq_distilled_guidance(self) -> bool:
        """Whether ``guidance_scale`` is a distilled scale the model embeds (Flux) rather than CFG's."""
        return self.tadq_base.__name__ in DISTILLED_GUIDANCE_PIPELINES

    @property
    def tadq_recorded_distilled_guidance(self) -> float | None:
        """The distilled guidance scale the artefact was calibrated and fitted at (its recipe), ``None`` if none
        was recorded (an FP folder, a model without one)."""
        recipe = self.tadq_recipe
        return None if recipe is None else recipe.deployments[0].distilled_guidance

    def tadq_prompt_encoder(self, max_sequence_length: int | None = None, distilled_guidance: float | None = None
                            ) -> Any:
        """The prompt encoder of this pipeline (``build_prompt_encoder``): Flux's distilled guidance defaults to the
        artefact's recorded one, else the pipeline's, and another one than the recorded is refused when the model
        carries tables fitted at it (``tadq_check_distilled_guidance``)."""
        if distilled_guidance is None:
            distilled_guidance = self.tadq_recorded_distilled_guidance
        encoder = build_prompt_encoder(self, max_sequence_length, distilled_guidance)
        self.tadq_check_distilled_guidance(getattr(encoder, "distilled_guidance", None))
        return encoder

    def tadq_check_distilled_guidance(self, used: float | None) -> None:
        """Refuse another distilled guidance than the one a model's correction tables were fitted at (recorded in
        its recipe), as ``resolve_deployment`` refuses another classifier-free scale."""
        recorded = self.tadq_recorded_distilled_guidance
        if recorded is None or used is None or used == recorded or not _fitted_keys(self.tadq_denoiser):
            return
        raise ValueError(f"this model's per-step tables were fitted at the distilled guidance_scale={recorded:g}, "
                         f"not {used:g}: call it at the fitted scale, or quantize again for this one")

    def tadq_swapped_sampler(self) -> SamplerConfig | None:
        """The sampler of ``pipe.scheduler`` when the caller replaced it by another class after loading (diffusers'
        way to choose a sampler: ``pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(...)``), else
        ``None``. It was ignored: the call sampled the recipe's sampler without a word. A class without a tadq
        sampler of its own (PNDM, LMS, UniPC...) is refused by name."""
        loaded = getattr(self, "tadq_scheduler_class", None)
        if loaded is None or type(self.scheduler) is loaded:
            return None
        from tadq.sampling import default_sampler

        try:
            return default_sampler(self.scheduler)
        except NotImplementedError as error:
            raise NotImplementedError(f"pipe.scheduler was replaced by a {type(self.scheduler).__name__} (loaded: "
                                      f"{loaded.__name__}), which tadq's pipeline cannot sample as it is: {error} "
                                      "Restore the loaded scheduler, or call tadq.sample with a SamplerConfig"
                                      ) from error

    def tadq_deployment(self, num_inference_steps: int | None, guidance_scale: float | None, eta: float | None,
                        kind: str | None = None, order: int | None = None) -> tuple[SamplerConfig, float]:
        """(sampler, guidance scale) of a call; refused when the model's tables were fitted for others. Defaults:
        the recipe's deployment, else the diffusers pipeline's default guidance scale (Flux: ``true_cfg_scale``'s)
        and the folder scheduler's own sampler at the pipeline's default step count (flow matching, DPM-Solver++,
        Euler...; Flux on its uniform σ grid), DDIM for a UNet whose scheduler class has none (PNDM, LMS); a
        resolution-dependent flow shift (Flux) is the pipeline's. (A UNet folder was sampled with DDIM whatever
        its scheduler: an SDXL folder's Euler was replaced without a word.)"""
        from tadq.sampling import default_sampler
        from tadq.sampling.config import DEFAULT_SAMPLER_KINDS

        parameters = inspect.signature(self.tadq_base.__call__).parameters
        default = parameters["true_cfg_scale" if self.tadq_distilled_guidance else "guidance_scale"].default
        fallback = None
        steps = int(parameters["num_inference_steps"].default)
        if getattr(self, "unet", None) is None:
            fallback = pipeline_sampler(self, default_sampler(self.scheduler, steps))
        elif type(self.scheduler).__name__ in DEFAULT_SAMPLER_KINDS:  # else DDIM (resolve_deployment's)
            fallback = default_sampler(self.scheduler, steps)
        sampler, scale = resolve_deployment(self.tadq_denoiser, self.tadq_recipe, num_inference_steps,
                                            guidance_scale, eta, float(default), kind, fallback, order)
        _warn_latent_clipping(self.scheduler, sampler)
        return pipeline_flow_shift(self, sampler), check_pipeline_guidance(scale)

    def _check_size(self, height: int | None, width: int | None) -> None:
        _, latent_height, latent_width = latent_shape(self)
        native = (latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor)
        wanted = (native[0] if height is None else height, native[1] if width is None else width)
        if wanted != tuple(native):  # 0 is a size (refused), not "not given"
            raise ValueError(f"height/width {height}x{width}: tadq samples at the denoiser's own size "
                             f"{native[0]}x{native[1]} (the one it was calibrated and fitted at)")

    def tadq_latents(self, conditions: PromptConditions, num_samples: int, sampler: SamplerConfig, scale: float,
                     seed: int, batch_size: int = 8, progress: bool = True) -> Tensor:
        """Final latents (N, C, h, w) on the CPU from tadq's loop (the corrections of a quantized denoiser active)."""
        from tadq.api import sample

        result = sample(self.tadq_denoiser, self.scheduler, sampler, num_samples=num_samples, seed=seed,
                        batch_size=batch_size, conditions=conditions, guidance_scale=scale, progress=progress)
        return result.images

    @torch.no_grad()
    def tadq_decode(self, latents: Tensor, output_type: str = "pil", batch_size: int = 8) -> Any:
        """Latents → images as the pipeline decodes them (``decode_latents``: the VAE input its class computes, an
        fp16 VAE's float32 upcast), its watermark when installed, post-processed by its image processor. Flux's
        latents are unpacked here already (tadq samples (C, h, w))."""
        image = self._tadq_vae_decode(latents, batch_size)
        if getattr(self, "watermark", None) is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type)

    def _tadq_vae_decode(self, latents: Tensor, batch_size: int) -> Tensor:
        """Latents → the VAE's images in [-1, 1], ``batch_size`` at a time, as this pipeline's class decodes them."""
        return decode_latents(self.tadq_base.__name__, self.vae, latents, batch_size)

    def _tadq_output(self, images: Any, return_dict: bool) -> Any:
        if "safety_checker" in inspect.signature(self.tadq_base.__init__).parameters:  # SD's output type
            from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

            return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict \
                else (images, None)
        return _output_class(self.tadq_base.__name__)(images=images) if return_dict else (images,)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """The pipeline's ``to``; the quantized denoiser (quantizer state, correction tables) follows the FP one."""
        result = super().to(*args, **kwargs)  # type: ignore[misc]
        model = pipeline_denoiser(self)
        if self.tadq_denoiser is not model:
            parameter = next(model.parameters())
            recipe = getattr(self.tadq_denoiser, "recipe", None)
            self.tadq_denoiser.to(device=parameter.device, dtype=parameter.dtype)
            self.tadq_denoiser.recipe = recipe
        return result


# the pipeline classes whose __call__ decodes latents * latents_std / scaling_factor + latents_mean when the VAE's
# config holds both (else latents / scaling_factor), and those that decode latents / scaling_factor + shift_factor;
# every other class decodes latents / scaling_factor and reads neither
LATENT_MEAN_STD_PIPELINES = ("StableDiffusionXLPipeline",)
SHIFT_FACTOR_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def vae_input(class_name: str, config: Any, latents: Tensor) -> Tensor:
    """What the diffusers pipeline ``class_name`` passes its VAE's ``decode`` for final ``latents``: SDXL applies
    the VAE's ``latents_mean``/``latents_std`` when it has both, SD3 and Flux add its ``shift_factor``, and every
    class divides by ``scaling_factor``. Each reads only its own keys: a key another class reads (a ``shift_factor``
    in a Stable Diffusion folder's VAE, ``latents_mean`` in SD3's) was applied by every class, so those images were
    not the ones the folder's own pipeline decodes."""
    scaling = config.scaling_factor
    if class_name in LATENT_MEAN_STD_PIPELINES:
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            return latents * std_t / scaling + mean_t
    if class_name in SHIFT_FACTOR_PIPELINES:
        shift = getattr(config, "shift_factor", None)
        return latents / scaling + (0.0 if shift is None else shift)
    return latents / scaling


@torch.no_grad()
def decode_latents(class_name: str, vae: nn.Module, latents: Tensor, batch_size: int = 8) -> Tensor:
    """Final latents → the VAE's images in [-1, 1] (its dtype and device) as the pipeline ``class_name`` decodes
    them (``vae_input``), ``batch_size`` latents per VAE call; an fp16 VAE whose config asks for it
    (``force_upcast``) decodes in float32 and goes back to fp16, even when decoding fails (out of memory...).
    ``tadq sample`` and the pipeline call, and ``tadq evaluate`` / ``tadq run`` on a pipeline, decode with it."""
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        parameter = next(vae.parameters())
        latents = vae_input(class_name, vae.config, latents.to(parameter.device, parameter.dtype))
        return torch.cat([vae.decode(latents[start: start + batch_size], return_dict=False)[0]
                          for start in range(0, latents.shape[0], max(1, batch_size))])
    finally:
        if upcast:
            vae.to(torch.float16)


def _output_class(class_name: str) -> type:
    """The output dataclass diffusers' pipeline ``class_name`` returns (all take ``images=``)."""
    if class_name == "StableDiffusion3Pipeline":
        from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

        return StableDiffusion3PipelineOutput
    if class_name == "FluxPipeline":
        from diffusers.pipelines.flux import FluxPipelineOutput

        return FluxPipelineOutput
    if class_name.startswith("PixArt"):
        from diffusers import ImagePipelineOutput

        return ImagePipelineOutput
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    return StableDiffusionXLPipelineOutput


def latent_shape(pipe: Any) -> tuple[int, int, int]:
    """(C, h, w) of the latents a pipeline's denoiser is sampled at (its adapter's, from the model's config)."""
    from tadq.registry import adapter_for

    model = pipeline_denoiser(pipe)
    channels, height, width = adapter_for(model).sample_shape(model)
    return int(channels), int(height), int(width)


# pipelines whose __call__ walks flow-euler on σ = linspace(1, 1/S, S) instead of the scheduler's own grid
UNIFORM_FLOW_GRID_PIPELINES = ("FluxPipeline",)


def pipeline_sampler(pipe: Any, sampler: SamplerConfig) -> SamplerConfig:
    """``sampler`` as the pipeline's own ``__call__`` would run it: on a ``FluxPipeline``, flow-euler on its uniform
    σ grid (``flow_sigmas="uniform"`` unless given) and, with a resolution-dependent flow scheduler
    (``use_dynamic_shifting``), the shift it computes for the image (``pipeline_flow_shift``). Anything else is
    returned unchanged."""
    base = getattr(type(pipe), "tadq_base", type(pipe)).__name__
    if sampler.kind == "flow-euler" and sampler.flow_sigmas is None and base in UNIFORM_FLOW_GRID_PIPELINES:
        sampler = dataclasses.replace(sampler, flow_sigmas="uniform")
    return pipeline_flow_shift(pipe, sampler)


def pipeline_flow_shift(pipe: Any, sampler: SamplerConfig) -> SamplerConfig:
    """``sampler`` with the shift a resolution-dependent flow scheduler (``use_dynamic_shifting``: FLUX.1-dev, some
    SD3 folders) gives the pipeline's image, as FluxPipeline / StableDiffusion3Pipeline compute it: μ linear in the
    number of image tokens (2×2 latent patches) between the scheduler's (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift), shift = exp(μ) (μ with ``time_shift_type`` "linear"). Any other sampler, or one
    with its shift given, is returned unchanged."""
    config = pipe.scheduler.config
    if sampler.kind != "flow-euler" or sampler.shift is not None or not config.get("use_dynamic_shifting", False):
        return sampler
    flux = getattr(type(pipe), "tadq_base", type(pipe)).__name__ == "FluxPipeline"
    patch = 2 if flux else int(pipeline_denoiser(pipe).config.patch_size)  # Flux packs 2×2 patches itself
    _, height, width = latent_shape(pipe)
    tokens = (height // patch) * (width // patch)
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15 if flux else 1.16)
    slope = (max_shift - base_shift) / (max_len - base_len)
    mu = tokens * slope + base_shift - slope * base_len
    linear = config.get("time_shift_type", "exponential") == "linear"
    return dataclasses.replace(sampler, shift=mu if linear else math.exp(mu))


def tadq_pipeline_class(base: type) -> type:
    """``Tadq<Base>``: the pipeline class with tadq's ``__call__`` (made once per base class)."""
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"Tadq{base.__name__}", (TadqPipelineMixin, base),
                                   {"__module__": __name__, "tadq_base": base})
    return _SUBCLASSES[base]


def check_drivable_scheduler(path: str | Path) -> None:
    """``NotImplementedError`` (with the fix) when tadq's samplers cannot drive the pipeline folder's scheduler."""
    config_file = Path(path) / "scheduler" / "scheduler_config.json"
    config = read_json_file(config_file, "scheduler config")
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not an object")
    try:
        check_drivable(config.get("_class_name"), config)
    except NotImplementedError as error:
        if "FlowMatch" in str(config.get("_class_name")) or config.get("prediction_type") == "flow_prediction":
            fix = ("FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config) (with the shift the model was "
                   "trained with)")
        else:
            fix = ("DDIMScheduler.from_config(pipe.scheduler.config) (with the clip_sample and steps_offset the model "
                   "was trained with)")
        raise NotImplementedError(f"{config_file}: {error} To use this pipeline, save {fix} into its scheduler/ "
                                  "folder.") from error


def check_sampler_family(path: str | Path, sampler: SamplerConfig) -> None:
    """``NotImplementedError`` when ``sampler`` is of the other family than the pipeline folder's training schedule
    (flow-euler on a discrete ᾱ_t one, an ε kind on a flow-matching one), read from its scheduler config alone, so
    commands refuse it before any component is loaded (sampling refuses it too, after, by the same rule:
    ``check_sampler_pairing``). A folder without the config passes: the folder checks name it."""
    from tadq.sampling.config import check_sampler_pairing

    config_file = Path(path) / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        return
    config = read_json_file(config_file, "scheduler config")
    check_sampler_pairing(config.get("_class_name") if isinstance(config, dict) else None, sampler, str(path))


def _check_components_listed(path: Path, layout: Any) -> None:
    """Every file in an artefact's component folders (text encoders, tokenizers, VAE, scheduler) must be one its
    manifest lists: diffusers and transformers read whatever is there (an ``added_tokens.json`` put into
    ``tokenizer/`` after the save changed how prompts tokenize, silently; a text encoder whose manifest entry was
    removed loaded unchecked). ``tadq verify`` reports such files; loading refuses them."""
    from tadq.io.manifest import ArtefactDamaged, unlisted_files

    try:
        unlisted = [name for name in unlisted_files(path) if name.split("/")[0] in layout.components]
    except ArtefactDamaged as error:
        raise PipelineFolderError(str(error)) from error
    if unlisted:
        raise PipelineFolderError(f"{path}: {', '.join(unlisted[:3])} {'is' if len(unlisted) == 1 else 'are'} not "
                                  "listed in its manifest (added or replaced after tadq saved it, or the manifest was "
                                  "edited); the pipeline would read it unchecked. Remove it, or save the artefact "
                                  "again")


def load_pipeline(path: str | Path, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, text_encoder_bits: int | None = None,
                  backend: str = "fake") -> Any:
    """A diffusers pipeline object for a tadq pipeline artefact (quantized UNet or transformer, corrections active)
    or for an FP pipeline folder (the FP denoiser in tadq's loop, for same-noise comparisons); call it as usual:
    ``pipe(prompt, negative_prompt=..., guidance_scale=..., num_inference_steps=...).images``.

    Every component folder is checked before any weights are read. ``text_encoder_bits`` (8 or 4; off by default):
    weight-only quantization of the text encoders' Linear layers, as ``load_fp_pipeline`` does it (use the value
    the denoiser was calibrated with). ``backend`` (``tadq.backends``, an artefact only): ``"fake"`` simulates
    the quantized denoiser in float; ``"int8"`` / ``"int8-compiled"`` / ``"int8-cuda"`` run it with integer kernels
    (float32 only, on the backend's device; the text encoders and the VAE stay float), refused before anything is
    read when the machine cannot run it.

    Raises:
        PipelineFolderError (a ValueError): not a supported pipeline folder, a component missing or damaged.
        NotImplementedError: a scheduler tadq's DDIM/DDPM steps cannot drive.
        BackendUnavailableError (a ValueError): ``backend`` cannot run on this machine.
    """
    from tadq.api import load
    from tadq.device import resolve_device, resolve_dtype
    from tadq.io import is_quantized_artefact

    if not isinstance(path, (str, Path)):
        raise TypeError(f"load_pipeline takes a folder path, got {type(path).__name__}")
    path = Path(path)
    target_device = resolve_device(device) if device is not None else None
    target_dtype = resolve_dtype(dtype) if dtype is not None else None
    if text_encoder_bits is not None and text_encoder_bits not in TEXT_ENCODER_BITS:
        raise ValueError(f"text_encoder_bits must be one of {TEXT_ENCODER_BITS} or None, got {text_encoder_bits!r}")
    quantized = is_quantized_artefact(path)
    if backend != "fake":
        from tadq.backends import check_backend, check_placement

        kernels = check_backend(backend).device_type
        # device=None: where its kernels run (int8-cuda: the current GPU), as tadq.load places it, and the text
        # encoders and the VAE follow (pipe.to below); defaulting to the CPU refused int8-cuda without a device
        if target_device is None and kernels not in (None, "cpu"):
            target_device = resolve_device(kernels)
        check_placement(backend, target_device or torch.device("cpu"), target_dtype or torch.float32)
        if not quantized:
            raise ValueError(f"backend {backend!r}: {path} is an FP pipeline folder, not a tadq artefact; there is no "
                             "quantized denoiser to run in integers (quantize it first, or use backend='fake')")
    layout = check_pipeline_folder(path, denoiser_weights=not quantized)
    check_drivable_scheduler(path)
    klass = tadq_pipeline_class(pipeline_class(layout.class_name))
    options = pipeline_load_options(klass, target_dtype, layout)
    if quantized:  # an integer backend converts while loading, on its device
        _check_components_listed(path, layout)
        qmodel, _scheduler = load(path, device=target_device, dtype=target_dtype, backend=backend)
        pipe = load_components(klass, layout, **{denoiser_component(layout.class_name): qmodel.model}, **options)
        denoiser, recipe = qmodel, getattr(qmodel, "recipe", None)
    else:
        pipe = load_components(klass, layout, **options)
        denoiser, recipe = pipeline_denoiser(pipe), None
    pipe.tadq_denoiser, pipe.tadq_recipe = denoiser, recipe
    pipe.tadq_scheduler_class = type(pipe.scheduler)  # a caller's replacement chooses the sampler (diffusers' way)
    quantize_text_encoders(pipe, text_encoder_bits)
    if target_device is not None:
        pipe.to(target_device)
    return pipe
