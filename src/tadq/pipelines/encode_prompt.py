"""The prompt side of the transformer pipelines (PixArt-α/Σ, SD3, Flux), through each pipeline's own
``encode_prompt``.

Stable Diffusion and SDXL encode with ``PromptEncoder`` (``tadq.pipelines.prompts``), a re-statement of their CLIP
rules that needs only tokenizers and encoders. The transformer pipelines mix T5 and CLIP encoders with rules that
differ per class (PixArt's caption mask, SD3's CLIP-L + CLIP-G + T5 padding, Flux's pooled CLIP beside T5 states),
so tadq calls the pipeline's ``encode_prompt`` itself: what the model sees is what diffusers gives it, by
construction. Each prompt is encoded alone (batch 1) with guidance off, so its embedding does not depend on the
other prompts; the unconditional branch is the negative (or empty) prompt encoded the same way, as the pipelines do.

Length: a T5 encoder reads at most ``max_sequence_length`` tokens (the pipeline's ``__call__`` default: PixArt-α
120, PixArt-Σ 300, SD3 256, Flux 512) and a CLIP one its tokenizer's ``model_max_length``; diffusers truncates a
longer prompt with a warning, tadq refuses it (``check``). PixArt's caption cleaning (``clean_caption``, which needs
``bs4`` and ``ftfy``) is not applied: prompts are encoded as given.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tadq.pipelines.components import DISTILLED_GUIDANCE_PIPELINES, T5_TOKENIZERS, TEXT_ENCODERS
from tadq.recipe import check_distilled_guidance
from tadq.safefiles import tensors_digest
from tadq.utils import public_config

__all__ = ["DISTILLED_GUIDANCE_PIPELINES", "ENCODE_PROMPT_PIPELINES", "EncodedPrompt", "PipelinePromptEncoder",
           "check_vocabulary", "embedding_rows", "t5_tokenizers", "text_encoder_digest", "token_ids_digest"]

logger = logging.getLogger(__name__)

# the pipelines encoded through their own encode_prompt: those with a T5 encoder
ENCODE_PROMPT_PIPELINES: tuple[str, ...] = tuple(T5_TOKENIZERS)
# the pipelines that read a prompt with CLIP and T5 side by side and cap T5 at MAX_T5_TOKENS
CAPPED_SEQUENCE_PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")
MAX_T5_TOKENS = 512
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


class EncodedPrompt(NamedTuple):
    """One prompt's embeddings, batch 1, on the CPU: states (1, L, D), pooled (1, D') or ``None``, the caption
    mask (1, L) or ``None``."""

    hidden: Tensor
    pooled: Tensor | None
    mask: Tensor | None


def t5_tokenizers(class_name: str) -> tuple[str, ...]:
    """The tokenizer components of ``class_name`` whose limit is ``max_sequence_length``."""
    return T5_TOKENIZERS.get(class_name, ())


def default_max_sequence_length(pipeline_class: type) -> int:
    """The ``max_sequence_length`` default of the pipeline's ``__call__`` (what a diffusers call would use)."""
    parameter = inspect.signature(pipeline_class.__call__).parameters.get("max_sequence_length")
    if parameter is None or not isinstance(parameter.default, int):
        raise ValueError(f"{pipeline_class.__name__}.__call__ has no integer max_sequence_length default")
    return parameter.default


def token_limits(class_name: str, tokenizers: dict[str, Any], max_sequence_length: int | None
                 ) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Per tokenizer component (in the order given): the tokens its encoder reads (a T5 one: the call's
    ``max_sequence_length``; a CLIP one: its ``model_max_length``) and whether a longer prompt is cut by design
    rather than refused (SD3's and Flux's CLIP copy beside a T5 that reads the prompt whole, as the pipelines and
    models do)."""
    t5 = t5_tokenizers(class_name)
    limits = tuple(int(max_sequence_length) if name in t5 else int(tokenizer.model_max_length)
                   for name, tokenizer in tokenizers.items())
    truncated = tuple(name not in t5 and class_name in CAPPED_SEQUENCE_PIPELINES for name in tokenizers)
    return limits, truncated


def base_pipeline_class(pipe: Any) -> type:
    """The diffusers class a (possibly ``Tadq``-subclassed) pipeline object was made from."""
    return getattr(type(pipe), "tadq_base", type(pipe))


class PipelinePromptEncoder:
    """Prompts → embeddings for a PixArt, SD3 or Flux pipeline object (module docstring).

    Args:
        pipe: the pipeline object (``load_fp_pipeline``, ``tadq.load_pipeline``).
        max_sequence_length: T5 tokens per prompt (default: the pipeline's own default).
        distilled_guidance: Flux with ``guidance_embeds``: the guidance scale the model embeds (FluxPipeline's
            ``guidance_scale``; default its 3.5), a finite number. A Flux transformer without a guidance embedding
            (FLUX.1-schnell) ignores it, as FluxPipeline does (logged); any other pipeline refuses it.
    """

    force_zeros_for_empty_prompt = False
    sdxl = False
    time_ids = None

    def __init__(self, pipe: Any, *, max_sequence_length: int | None = None,
                 distilled_guidance: float | None = None) -> None:
        base = base_pipeline_class(pipe)
        self.class_name = base.__name__
        if self.class_name not in ENCODE_PROMPT_PIPELINES:
            raise ValueError(f"{self.class_name} does not encode prompts through encode_prompt in tadq; supported: "
                             f"{sorted(ENCODE_PROMPT_PIPELINES)}")
        self.pipe = pipe
        if max_sequence_length is None:
            max_sequence_length = default_max_sequence_length(base)
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        if self.class_name in CAPPED_SEQUENCE_PIPELINES and max_sequence_length > MAX_T5_TOKENS:
            raise ValueError(f"max_sequence_length={max_sequence_length}: {self.class_name} takes at most "
                             f"{MAX_T5_TOKENS} T5 tokens (diffusers refuses more)")
        self.max_sequence_length = max_sequence_length
        embeds_guidance = bool(getattr(getattr(pipe, "transformer", None), "config", {}).get("guidance_embeds", False))
        if distilled_guidance is not None:
            distilled_guidance = check_distilled_guidance(distilled_guidance)
            if self.class_name not in DISTILLED_GUIDANCE_PIPELINES:
                raise ValueError(f"distilled_guidance: a {self.class_name} embeds no guidance scale; use "
                                 "classifier-free guidance (guidance_scale) instead")
            if not embeds_guidance:
                logger.warning("this %s's transformer embeds no guidance scale (guidance_embeds is false, as in "
                               "FLUX.1-schnell): guidance_scale=%g is ignored, as FluxPipeline ignores it",
                               self.class_name, distilled_guidance)
                distilled_guidance = None
        if embeds_guidance and distilled_guidance is None:
            distilled_guidance = float(inspect.signature(base.__call__).parameters["guidance_scale"].default)
        self.distilled_guidance = None if distilled_guidance is None else float(distilled_guidance)
        named = {name: getattr(pipe, name) for name in _TOKENIZERS if getattr(pipe, name, None) is not None}
        self.tokenizers = tuple(named.values())
        self.limits, self.truncated = token_limits(self.class_name, named, max_sequence_length)
        self._fingerprint: str | None = None

    def check(self, prompts: Sequence[str], what: str = "prompt") -> None:
        """Refuse a non-string or a prompt longer than an encoder reads (diffusers would cut its end off)."""
        check_token_counts(self.tokenizers, self.limits, prompts, what, self.truncated)

    @torch.no_grad()
    def encode_text(self, prompt: str) -> EncodedPrompt:
        """The pipeline's ``encode_prompt`` on one prompt, guidance off, on the text encoders' device."""
        pipe, length = self.pipe, self.max_sequence_length
        for tokenizer_name, encoder_name in zip(_TOKENIZERS, TEXT_ENCODERS, strict=True):
            tokenizer, encoder = getattr(pipe, tokenizer_name, None), getattr(pipe, encoder_name, None)
            if tokenizer is not None and encoder is not None:
                check_vocabulary(tokenizer, embedding_rows(encoder), [prompt])
        device = next(pipe.text_encoder.parameters()).device
        if self.class_name.startswith("PixArt"):
            hidden, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=device,
                                                    clean_caption=False, max_sequence_length=length)
            return EncodedPrompt(hidden.cpu(), None, mask.cpu())
        if self.class_name == "StableDiffusion3Pipeline":
            hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=False, max_sequence_length=length)
            return EncodedPrompt(hidden.cpu(), pooled.cpu(), None)
        hidden, pooled, _text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                       max_sequence_length=length)
        return EncodedPrompt(hidden.cpu(), pooled.cpu(), None)

    def added_conditions(self, rows: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """Per-sample model inputs besides the text: Flux's distilled guidance (N,); PixArt-α's size conditions
        at 1024 px (``use_additional_conditions``): resolution (N, 2) = (height, width), aspect ratio (N, 1)."""
        added: dict[str, Tensor] = {}
        if self.distilled_guidance is not None:
            added["guidance"] = torch.full((rows,), self.distilled_guidance, dtype=dtype)
        transformer = self.pipe.transformer
        if self.class_name.startswith("PixArt") and getattr(transformer, "use_additional_conditions", False):
            size = transformer.config.sample_size * self.pipe.vae_scale_factor
            added["resolution"] = torch.tensor([[float(size), float(size)]], dtype=dtype).expand(rows, -1).clone()
            added["aspect_ratio"] = torch.ones(rows, 1, dtype=dtype)
        return added

    @property
    def settings(self) -> dict[str, Any]:
        """What besides the prompts changes the conditioning (part of ``PromptConditions.key``)."""
        return {"pipeline": self.class_name, "max_sequence_length": self.max_sequence_length,
                "distilled_guidance": self.distilled_guidance}

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the text encoders (tensors and config) and the token limits (computed once); what the
        tokenizers do is keyed per prompt set (``token_digest``)."""
        if self._fingerprint is None:
            digest = hashlib.sha256(json.dumps(list(self.limits)).encode())
            for name in TEXT_ENCODERS:
                encoder = getattr(self.pipe, name, None)
                if encoder is not None:
                    digest.update(name.encode() + text_encoder_digest(encoder).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def token_digest(self, texts: Sequence[str]) -> str:
        """``token_ids_digest`` of ``texts`` through this pipeline's tokenizers."""
        return token_ids_digest(self.tokenizers, self.limits, texts)


def check_vocabulary(tokenizer: Any, vocab: int | None, prompts: Sequence[str], what: str = "prompt",
                     names: tuple[str, str] = ("the tokenizer", "its text encoder")) -> None:
    """Refuse a prompt for which ``tokenizer`` gives a token id (or pads with one) past the ``vocab``-token
    embedding table of its text encoder (a token added to the tokenizer only, as textual inversion does before
    training): it failed inside the embedding ("index out of range in self"), without naming the token. ``names``:
    (tokenizer, encoder) as the message calls them; ``vocab`` ``None``: nothing to check against."""
    if vocab is None:
        return
    pad = getattr(tokenizer, "pad_token_id", None)
    for prompt in prompts:
        ids = [*tokenizer(prompt)["input_ids"], *([pad] if isinstance(pad, int) else [])]
        past = [index for index in ids if index >= vocab]
        if past:
            raise ValueError(f"{what} {prompt!r}: {names[0]} gives token "
                             f"{tokenizer.convert_ids_to_tokens(past[0])!r} id {past[0]}, past the {vocab}-token "
                             f"vocabulary of {names[1]}; a token added to the tokenizer (textual inversion) needs the "
                             "text encoder's embeddings resized and trained with it")


def embedding_rows(encoder: Any) -> int | None:
    """The number of rows of a loaded text encoder's token embedding table (``None`` if it has none to ask)."""
    embeddings = encoder.get_input_embeddings() if callable(getattr(encoder, "get_input_embeddings", None)) else None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def text_encoder_digest(encoder: Any) -> str:
    """SHA-256 over a text encoder's tensors and the config its forward reads besides them (``layer_norm_eps``,
    ``hidden_act``, ``projection_dim``...; ``public_config``): a config edited on disk changes the encodings without
    changing a tensor."""
    payload = tensors_digest(dict(encoder.state_dict())) + json.dumps(public_config(encoder), sort_keys=True,
                                                                     default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def token_ids_digest(tokenizers: Sequence[Any], limits: Sequence[int], texts: Sequence[str]) -> str:
    """SHA-256 of the token ids every tokenizer gives ``texts``, padded to its limit: all a tokenizer contributes to
    those texts' encodings, whatever its files hold (vocabulary, BPE merges, normaliser, special tokens); hashing
    the vocabulary alone missed an edited merges file."""
    digest = hashlib.sha256()
    for tokenizer, limit in zip(tokenizers, limits, strict=True):
        ids = tokenizer(list(texts), padding="max_length", max_length=limit, truncation=True)["input_ids"]
        digest.update(json.dumps([list(map(int, row)) for row in ids]).encode())
    return digest.hexdigest()


# lone surrogates: what Python makes of bytes that do not decode (surrogateescape: argv, file names)
_SURROGATE = re.compile("[\ud800-\udfff]")


def _short(prompt: str) -> str:
    return prompt if len(prompt) <= 60 else prompt[:57] + "..."


def check_token_counts(tokenizers: Sequence[Any], limits: Sequence[int], prompts: Sequence[str],
                       what: str = "prompt", truncated: Sequence[bool] | None = None) -> None:
    """``TypeError`` for a non-string, ``ValueError`` for a prompt with more tokens (special tokens included) than a
    tokenizer's limit: diffusers only warns and truncates it, so the image would silently ignore its end. A
    tokenizer marked ``truncated`` (SD3's and Flux's CLIP beside their T5) only warns: the pipeline cuts that
    encoder's copy of the prompt by design while T5 reads all of it."""
    marks = tuple(truncated) if truncated is not None else (False,) * len(tokenizers)
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"a {what} must be a str, got {type(prompt).__name__}: {prompt!r}")
        if _SURROGATE.search(prompt):  # the tokenizers refused it with "TextEncodeInput must be Union[...]"
            raise ValueError(f"{what} {_short(prompt)!r} holds bytes that are not text: it was decoded with another "
                             "encoding than it was written in (a command line under a non-UTF-8 locale such as "
                             "LC_ALL=C). Run under a UTF-8 locale (LANG=C.UTF-8), or give the prompts in a UTF-8 file")
        for tokenizer, limit, cut in zip(tokenizers, limits, marks, strict=True):
            count = len(tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids)
            if count > limit and cut:
                logger.warning("%s %r is %d tokens long: its %s copy is cut at %d tokens, as the pipeline does "
                               "(the T5 encoder reads all of it)", what, _short(prompt), count,
                               type(tokenizer).__name__, limit)
            elif count > limit:
                raise ValueError(f"{what} {_short(prompt)!r} is {count} tokens long (special tokens included); "
                                 f"this pipeline's {type(tokenizer).__name__} reads at most {limit}. Shorten it "
                                 "(diffusers would silently drop the rest)")
