"""Prompts → ``Conditioning``: the pipeline's own text encoders, as its ``encode_prompt`` uses them.

``PromptConditions`` is a ``ConditionSource`` (``tadq.sampling.conditioning``): sample i gets prompt
``prompts[i % len(prompts)]``, a function of the index only, so it does not depend on the batch or the number of
workers. Each distinct prompt is encoded once, alone (batch 1, so its embedding does not depend on which other
prompts share a batch), and cached.

Contract with the ``UNet2DConditionModel`` adapter: ``encoder_hidden_states`` (N, L, D); ``pooled_embeds`` (N, D')
is SDXL's ``text_embeds``; ``added_cond_kwargs["time_ids"]`` (N, 6) is SDXL's (original size, crop corner, target
size). The transformer pipelines (PixArt, SD3, Flux) encode through their own ``encode_prompt``
(``tadq.pipelines.encode_prompt``): PixArt's caption mask becomes ``attention_mask``, SD3's and Flux's pooled text
``pooled_embeds``, Flux's distilled guidance ``added_cond_kwargs["guidance"]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tadq.pipelines.encode_prompt import (
    ENCODE_PROMPT_PIPELINES,
    EncodedPrompt,
    PipelinePromptEncoder,
    base_pipeline_class,
    check_token_counts,
    check_vocabulary,
    embedding_rows,
    text_encoder_digest,
    token_ids_digest,
)
from tadq.sampling.conditioning import Conditioning

__all__ = ["PromptEncoder", "PromptConditions", "check_prompt_lengths", "prompt_encoder_for"]


MAX_TOKENIZER_LENGTH = 1 << 20  # above: transformers' "no limit" placeholder (int(1e30)), not a real length


@dataclass(eq=False)
class PromptEncoder:
    """The text side of a pipeline: tokenizers and encoders in diffusers' order, and SDXL's extras.

    Args:
        tokenizers: one per text encoder.
        text_encoders: SD: one ``CLIPTextModel`` (last hidden state); SDXL: ``CLIPTextModel`` and
            ``CLIPTextModelWithProjection`` (penultimate hidden states concatenated, pooled output of the second).
        sdxl: whether the SDXL rules apply (pooled embeddings, time ids, penultimate layer).
        force_zeros_for_empty_prompt: SDXL: a negative prompt that is not given is all zeros, not "" encoded.
        time_ids: SDXL: original size (h, w) + crop corner (top, left) + target size (h, w).
    """

    tokenizers: tuple[Any, ...]
    text_encoders: tuple[nn.Module, ...]
    sdxl: bool = False
    force_zeros_for_empty_prompt: bool = False
    time_ids: tuple[float, ...] | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.tokenizers) != len(self.text_encoders) or not self.tokenizers:
            raise ValueError("PromptEncoder needs one tokenizer per text encoder (at least one)")
        if self.sdxl and (self.time_ids is None or len(self.time_ids) != 6):
            raise ValueError("SDXL needs time_ids = original size (2) + crop corner (2) + target size (2)")
        for tokenizer in self.tokenizers:
            if not isinstance(tokenizer.model_max_length, int) or tokenizer.model_max_length > MAX_TOKENIZER_LENGTH:
                where = getattr(tokenizer, "name_or_path", "") or "this pipeline"
                raise ValueError(f"the tokenizer of {where} has no model_max_length (tokenizer_config.json missing, "
                                 "or without it): prompts are padded to it (CLIP's is 77)")

    @classmethod
    def from_pipeline(cls, pipe: Any, *, original_size: tuple[int, int] | None = None,
                      crops_coords_top_left: tuple[int, int] = (0, 0),
                      target_size: tuple[int, int] | None = None) -> PromptEncoder:
        """The encoders of a Stable Diffusion (one encoder) or SDXL (two encoders) pipeline object.

        SDXL sizes default as in the pipeline: the UNet's sample size × the VAE's scale factor.
        """
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
        tokenizers = [getattr(pipe, name, None) for name in ("tokenizer", "tokenizer_2")]
        pairs = [(t, e) for t, e in zip(tokenizers, encoders, strict=True) if t is not None and e is not None]
        if not pairs:
            raise ValueError(f"{type(pipe).__name__} has no text encoder and tokenizer: it takes no prompts")
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        time_ids = None
        if sdxl:
            size = pipe.unet.config.sample_size
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            default = (height * pipe.vae_scale_factor, width * pipe.vae_scale_factor)
            time_ids = tuple(float(v) for v in (*(original_size or default), *crops_coords_top_left,
                                                 *(target_size or default)))
            _check_time_embedding(pipe, len(time_ids))
        return cls(tuple(t for t, _ in pairs), tuple(e for _, e in pairs), sdxl,
                   bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)) if sdxl else False, time_ids)

    def check(self, prompts: Sequence[str], what: str = "prompt") -> None:
        """``ValueError`` for a non-string or a prompt longer than a tokenizer takes (diffusers only warns and
        truncates it, so the image would silently ignore its end)."""
        check_token_counts(self.tokenizers, [t.model_max_length for t in self.tokenizers], prompts, what)

    @torch.no_grad()
    def encode(self, prompt: str) -> tuple[Tensor, Tensor | None]:
        """((1, L, D) hidden states, (1, D') pooled or ``None``) of one prompt, on the CPU, as diffusers'
        ``encode_prompt`` computes them."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
            check_vocabulary(tokenizer, embedding_rows(encoder), [prompt])
            device = next(encoder.parameters()).device
            if not self.sdxl:
                use_mask = getattr(encoder.config, "use_attention_mask", False)
                mask = tokens.attention_mask.to(device) if use_mask else None
                hidden.append(encoder(tokens.input_ids.to(device), attention_mask=mask)[0])
                continue
            output = encoder(tokens.input_ids.to(device), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first; diffusers keeps the first one
                pooled = output[0] if pooled is None else pooled
            hidden.append(output.hidden_states[-2])
        states = torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1)
        return states.cpu(), None if pooled is None else pooled.cpu()

    def encode_text(self, prompt: str) -> EncodedPrompt:
        """``encode`` as an ``EncodedPrompt`` (no caption mask), the interface ``PromptConditions`` reads."""
        return EncodedPrompt(*self.encode(prompt), None)

    def added_conditions(self, rows: int, dtype: torch.dtype) -> dict[str, Tensor]:
        """SDXL's time ids (N, 6); nothing for Stable Diffusion."""
        if not self.sdxl:
            return {}
        return {"time_ids": torch.tensor([self.time_ids], dtype=dtype).expand(rows, -1).clone()}

    @property
    def settings(self) -> dict[str, Any]:
        """What besides the prompts changes the conditioning (part of ``PromptConditions.key``)."""
        return {"time_ids": self.time_ids, "sdxl": self.sdxl, "zeros": self.force_zeros_for_empty_prompt}

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the encoders (tensors and config) and the tokenizers' limits (computed once); what the
        tokenizers do is keyed per prompt set (``token_digest``)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
                digest.update(str(tokenizer.model_max_length).encode())
                digest.update(text_encoder_digest(encoder).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def token_digest(self, texts: Sequence[str]) -> str:
        """``token_ids_digest`` of ``texts`` through the tokenizers, padded as ``encode`` pads them."""
        return token_ids_digest(self.tokenizers, [t.model_max_length for t in self.tokenizers], texts)


def _check_time_embedding(pipe: Any, num_time_ids: int) -> None:
    """The UNet's added embedding must take time ids + pooled text (diffusers checks this too, later)."""
    unet, encoder = pipe.unet, pipe.text_encoder_2
    linear = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    if linear is None or unet.config.addition_time_embed_dim is None:
        raise ValueError("this SDXL pipeline's UNet has no added time/text embedding (addition_embed_type "
                         "'text_time'); it cannot take SDXL conditioning")
    expected = unet.config.addition_time_embed_dim * num_time_ids + encoder.config.projection_dim
    if linear.in_features != expected:
        raise ValueError(f"the UNet's added embedding takes {linear.in_features} features, but {num_time_ids} time "
                         f"ids and text_encoder_2's projection give {expected}; the components do not match")


class PromptConditions:
    """Per-sample prompt conditioning for ``tadq.sample``/``tadq.quantize(conditions=...)``.

    Sample i gets ``prompts[i % len(prompts)]``; the unconditional branch (classifier-free guidance) is the
    negative prompt (one for all, or one per prompt), or — not given — the empty prompt ("" encoded; SDXL with
    ``force_zeros_for_empty_prompt``: zeros), as diffusers does. The seed is not used: prompts are assigned by index.

    Args:
        source: a pipeline object (``load_fp_pipeline``, ``tadq.load_pipeline``), a ``PromptEncoder`` or a
            ``PipelinePromptEncoder``.
        prompts: the prompt set, non-empty; every prompt is checked against the tokenizers' limit here.
        negative_prompt: ``None``, one string, or one per prompt.
    """

    def __init__(self, source: Any, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None
                 ) -> None:
        self.encoder = source if isinstance(source, (PromptEncoder, PipelinePromptEncoder)) \
            else prompt_encoder_for(source)
        if isinstance(prompts, str):
            prompts = [prompts]
        self.prompts = tuple(prompts)
        if not self.prompts:
            raise ValueError("PromptConditions needs at least one prompt")
        if negative_prompt is None or isinstance(negative_prompt, str):
            self.negative_prompts: tuple[str | None, ...] = (negative_prompt,)
        else:
            self.negative_prompts = tuple(negative_prompt)
            if len(self.negative_prompts) != len(self.prompts):
                raise ValueError(f"{len(self.negative_prompts)} negative prompts for {len(self.prompts)} prompts; "
                                 "give one for all or one per prompt")
        self.encoder.check(self.prompts)
        self.encoder.check([n for n in self.negative_prompts if n is not None], "negative prompt")
        self._cache: dict[str, EncodedPrompt] = {}
        self._key: str | None = None
        self.encoder_calls = 0  # distinct texts encoded so far (each once)

    def _encoded(self, text: str) -> EncodedPrompt:
        if text not in self._cache:
            self._cache[text] = self.encoder.encode_text(text)
            self.encoder_calls += 1
        return self._cache[text]

    def _negative(self, index: int) -> EncodedPrompt:
        negative = self.negative_prompts[index % len(self.negative_prompts)]
        if negative is None and self.encoder.force_zeros_for_empty_prompt:
            hidden, pooled, mask = self._encoded("")
            return EncodedPrompt(torch.zeros_like(hidden), None if pooled is None else torch.zeros_like(pooled), mask)
        return self._encoded(negative or "")

    def __len__(self) -> int:
        """The number of prompts (sample i takes prompt i mod len)."""
        return len(self.prompts)

    def prompt_of(self, index: int) -> str:
        """The prompt of sample ``index``."""
        return self.prompts[int(index) % len(self.prompts)]

    def _branch(self, parts: list[EncodedPrompt]) -> Conditioning:
        hidden = torch.cat([p.hidden for p in parts])  # (N, L, D)
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])  # (N, D')
        mask = None if parts[0].mask is None else torch.cat([p.mask for p in parts])  # (N, L)
        return Conditioning(encoder_hidden_states=hidden, pooled_embeds=pooled, attention_mask=mask,
                            added_cond_kwargs=self.encoder.added_conditions(len(parts), hidden.dtype))

    def __call__(self, seed: int, indices: Sequence[int]) -> Conditioning:
        indices = [int(i) for i in indices]
        if not indices or min(indices) < 0:
            raise ValueError(f"sample indices must be non-negative, got {indices}")
        conditional = self._branch([self._encoded(self.prompt_of(i)) for i in indices])
        unconditional = self._branch([self._negative(i) for i in indices])
        return Conditioning(encoder_hidden_states=conditional.encoder_hidden_states,
                            pooled_embeds=conditional.pooled_embeds, attention_mask=conditional.attention_mask,
                            added_cond_kwargs=dict(conditional.added_cond_kwargs), unconditional=unconditional)

    @property
    def key(self) -> str:
        """Names the prompt set: a hash of the prompts, negatives, the encoder's settings (SDXL time ids, T5 length,
        Flux's distilled guidance) and the encoders' weights (run and calibration-cache keys change whenever any of
        them does)."""
        if self._key is None:
            payload = json.dumps({"prompts": self.prompts, "negative": self.negative_prompts,
                                  **self.encoder.settings})
            texts = [*self.prompts, *(n for n in self.negative_prompts if n is not None), ""]  # "": a missing negative
            tokens = self.encoder.token_digest(texts)
            digest = hashlib.sha256(payload.encode() + self.encoder.fingerprint.encode() + tokens.encode())
            self._key = f"prompts-{len(self.prompts)}-{digest.hexdigest()[:16]}"
        return self._key


def check_prompt_lengths(path: str | Path, prompts: Sequence[str], what: str = "prompt", *,
                         max_sequence_length: int | None = None, negative_prompt: str | None = None) -> None:
    """Check ``prompts`` against the tokenizers of the pipeline folder ``path`` alone (no encoder, VAE or denoiser
    is loaded), so a prompt that is too long fails before the expensive part of a command. A T5 tokenizer of a
    transformer pipeline is held to ``max_sequence_length`` (default: the pipeline's own), a CLIP one to its
    ``model_max_length``. ``negative_prompt`` is checked too, named as such (the tokenizers are read once)."""
    import transformers

    from tadq.pipelines.components import check_pipeline_folder, pipeline_class
    from tadq.pipelines.encode_prompt import default_max_sequence_length, t5_tokenizers, token_limits

    layout = check_pipeline_folder(path, denoiser_weights=False)
    t5 = t5_tokenizers(layout.class_name)
    if t5 and max_sequence_length is None:
        max_sequence_length = default_max_sequence_length(pipeline_class(layout.class_name))
    tokenizers = {}
    for name, (_library, class_name) in sorted(layout.components.items()):
        if name.startswith("tokenizer"):
            klass = getattr(transformers, class_name, None)
            if klass is None:
                raise ValueError(f"{layout.path / name}: unknown tokenizer class {class_name!r}")
            tokenizers[name] = _read_tokenizer(klass, layout.path, name)
    if not t5:  # the CLIP pipelines: the same checks as their PromptEncoder (a real model_max_length first)
        PromptEncoder(tuple(tokenizers.values()), tuple(nn.Identity() for _ in tokenizers))
    limits, truncated = token_limits(layout.class_name, tokenizers, max_sequence_length)
    groups = [(list(prompts), what), *([([negative_prompt], "negative prompt")] if negative_prompt else [])]
    for texts, label in groups:
        check_token_counts(list(tokenizers.values()), limits, texts, label, truncated)
    for name, tokenizer in tokenizers.items():  # against each encoder's config.json: nothing else is loaded
        encoder = "text_encoder" + name.removeprefix("tokenizer")
        config = layout.path / encoder / "config.json"
        vocab = _vocab_size(config)
        for texts, label in groups:
            check_vocabulary(tokenizer, vocab, texts, label, (name, f"{encoder} ({config})"))


def _read_tokenizer(klass: type, folder: Path, name: str) -> Any:
    """The tokenizer in ``folder/name``, read alone. An artefact's tokenizer files are held to its manifest first
    (they are small); a file the tokenizers library cannot parse (a flipped byte in ``tokenizer.json``) raises
    ``PipelineFolderError`` naming the folder: it ended `tadq sample` and `tadq quantize` in a Rust traceback."""
    from tadq.io.manifest import check_saved_file, read_manifest
    from tadq.pipelines.components import PipelineFolderError

    if (manifest := read_manifest(folder)) is not None:
        for listed in sorted(manifest["files"]):
            if listed.startswith(f"{name}/"):
                check_saved_file(folder, listed)
    try:
        return klass.from_pretrained(str(folder / name), local_files_only=True)
    except Exception as error:  # the tokenizers library raises a bare Exception for a malformed tokenizer.json
        first = " ".join(str(error).split())[:300] or type(error).__name__
        raise PipelineFolderError(f"{folder / name}: transformers could not read the tokenizer ({type(error).__name__}"
                                  f": {first}); a damaged or edited file: restore the folder from the model's "
                                  "download") from error


def _vocab_size(config: Path) -> int | None:
    """``vocab_size`` of a text encoder's config; ``None`` without one (the pipeline checks name a damaged
    config)."""
    try:
        return int(json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def prompt_encoder_for(pipe: Any, *, max_sequence_length: int | None = None,
                       distilled_guidance: float | None = None) -> PromptEncoder | PipelinePromptEncoder:
    """The prompt encoder of a pipeline object: ``PromptEncoder`` for Stable Diffusion / SDXL,
    ``PipelinePromptEncoder`` (its own ``encode_prompt``, with these settings) for PixArt, SD3 and Flux; a tadq
    pipeline's own (``tadq_prompt_encoder``: a Flux artefact's recorded distilled guidance, checked against its
    fitted tables). Stable Diffusion / SDXL refuse both settings (CLIP pads to its own length, no scale is
    embedded)."""
    if callable(getattr(pipe, "tadq_prompt_encoder", None)):
        return pipe.tadq_prompt_encoder(max_sequence_length, distilled_guidance)
    return build_prompt_encoder(pipe, max_sequence_length, distilled_guidance)


def build_prompt_encoder(pipe: Any, max_sequence_length: int | None = None, distilled_guidance: float | None = None
                         ) -> PromptEncoder | PipelinePromptEncoder:
    """``prompt_encoder_for`` without a tadq pipeline's defaults and checks (which call it)."""
    name = base_pipeline_class(pipe).__name__
    if name in ENCODE_PROMPT_PIPELINES:
        return PipelinePromptEncoder(pipe, max_sequence_length=max_sequence_length,
                                     distilled_guidance=distilled_guidance)
    if max_sequence_length is not None:
        raise TypeError(f"max_sequence_length is for T5-encoded prompts; {name} pads prompts to its CLIP "
                        "tokenizer's length")
    if distilled_guidance is not None:
        raise ValueError(f"distilled_guidance: a {name} embeds no guidance scale; use classifier-free guidance "
                         "(guidance_scale) instead")
    return PromptEncoder.from_pipeline(pipe)
