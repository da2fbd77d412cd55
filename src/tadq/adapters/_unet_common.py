"""What the diffusers UNet adapters share: role claiming by module type, and the facts traced with one dummy forward.

``UNet2DModel`` and ``UNet2DConditionModel`` are built from the same parts (``ResnetBlock2D``, ``Attention``,
``Downsample2D``/``Upsample2D``, decoder blocks taking ``res_hidden_states_tuple``), so the role of a layer, the
forward order of the reconstruction units and the ``[deep | skip]`` split points are found by the same code; each
adapter only says which top-level modules it has and how it is called (``_roles``, ``predict_eps``,
``dummy_conditioning``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, ResnetBlockCondNorm2D, Upsample2D
from diffusers.models.unets.unet_2d_blocks import KAttentionBlock
from torch import Tensor, nn

from tadq.adapters.base import LayerInfo, LayerRole
from tadq.quant.attention import fused_projections_in_use
from tadq.sampling.conditioning import Conditioning

__all__ = ["INDEX_DTYPES", "QUANTIZABLE", "SKIP_ARGUMENT", "RoleClaims", "TracedUNetAdapter", "check_class_labels",
           "check_processor_layers", "check_unfused",
           "claim_attention", "claim_resnet", "class_label_width", "dummy_class_labels"]

logger = logging.getLogger(__name__)

QUANTIZABLE = (nn.Conv2d, nn.Linear)
SKIP_ARGUMENT = "res_hidden_states_tuple"  # how diffusers' decoder blocks receive the encoder's skip features
INDEX_DTYPES = (torch.int64, torch.int32)  # the index dtypes torch's nn.Embedding takes (not bool, int8, int16)


class RoleClaims:
    """id(layer) → (role, owning block name); the first claim of a layer wins, so specific parts are claimed before
    the generic sweep over the module tree."""

    def __init__(self, model: nn.Module) -> None:
        self.roles: dict[int, tuple[LayerRole, str]] = {}
        self.names = {id(m): n for n, m in model.named_modules()}

    def claim(self, module: nn.Module | None, role: LayerRole, block: str) -> None:
        """Give every not yet claimed quantizable layer inside ``module`` (itself included) ``role`` in ``block``."""
        if module is None:
            return
        for sub in module.modules():
            if isinstance(sub, QUANTIZABLE) and id(sub) not in self.roles:
                self.roles[id(sub)] = (role, block)


def claim_resnet(claims: RoleClaims, resnet: ResnetBlock2D, block: str) -> None:
    """A residual block: its time-embedding projection g_i, 1x1 shortcut and two convolutions."""
    claims.claim(resnet.time_emb_proj, "time_projection", block)
    claims.claim(resnet.conv_shortcut, "shortcut", block)
    claims.claim(resnet.conv1, "block_conv", block)
    claims.claim(resnet.conv2, "block_conv", block)


def claim_attention(claims: RoleClaims, attn: Attention, block: str) -> None:
    """An ``Attention``: q (and k, v of self-attention) ``attention_qkv``; k, v of cross-attention (they read the
    encoder states, e.g. text embeddings, not the image tokens) ``cross_attention_kv``; the output projection.
    An added-K/V attention (``SimpleCrossAttn*`` blocks: ``added_kv_proj_dim`` set) reads the encoder states through
    ``add_k_proj``/``add_v_proj``; its ``to_k``/``to_v`` read the image tokens, so they are ``attention_qkv``."""
    reads_encoder = attn.is_cross_attention and getattr(attn, "added_kv_proj_dim", None) is None
    kv_role: LayerRole = "cross_attention_kv" if reads_encoder else "attention_qkv"
    claims.claim(attn.to_q, "attention_qkv", block)
    claims.claim(attn.to_k, kv_role, block)
    claims.claim(attn.to_v, kv_role, block)
    claims.claim(getattr(attn, "add_q_proj", None), "attention_qkv", block)
    claims.claim(getattr(attn, "add_k_proj", None), "cross_attention_kv", block)  # added K/V read the encoder states
    claims.claim(getattr(attn, "add_v_proj", None), "cross_attention_kv", block)
    claims.claim(attn.to_out, "attention_out", block)
    claims.claim(getattr(attn, "to_add_out", None), "attention_out", block)


def check_unfused(model: nn.Module) -> None:
    """Refuse attention modules whose q/k/v projections were fused (``model.fuse_qkv_projections()``), before the
    layers are planned: the fused ``to_qkv``/``to_kv`` computes what ``to_q``/``to_k``/``to_v`` would, so those are
    never called and their input quantizers never see calibration data (the run used to fail only after the FP
    calibration trajectories had been sampled), and the fused processor is not one tadq's quantized processors
    reproduce. The layers ``unfuse_qkv_projections()`` leaves behind, unused, are not refused: tadq's copy drops
    them (``drop_unused_fused_projections``).

    Raises:
        NotImplementedError: naming the fused modules and the call that undoes it.
    """
    fused = [name for name, module in model.named_modules() if fused_projections_in_use(module)]
    if fused:
        shown = fused[:3] + (["..."] if len(fused) > 3 else [])
        raise NotImplementedError(f"{type(model).__name__} has fused q/k/v projections in {len(fused)} attention "
                                  f"modules ({', '.join(shown)}): tadq quantizes the separate to_q/to_k/to_v. Call "
                                  "model.unfuse_qkv_projections() before quantizing")


def claim_cond_norm_resnet(claims: RoleClaims, resnet: ResnetBlockCondNorm2D, block: str) -> None:
    """A residual block of the K-diffusion blocks (``KDownBlock2D``...): no ``time_emb_proj``, each of its two norms
    (``AdaGroupNorm``) projects the time embedding into a per-channel scale and shift through its ``linear``, which
    is that block's time projection; shortcut and convolutions as in ``ResnetBlock2D``."""
    for norm in (resnet.norm1, resnet.norm2):
        claims.claim(getattr(norm, "linear", None), "time_projection", block)
    claims.claim(resnet.conv_shortcut, "shortcut", block)
    claims.claim(resnet.conv1, "block_conv", block)
    claims.claim(resnet.conv2, "block_conv", block)


def claim_k_attention(claims: RoleClaims, module: KAttentionBlock, block: str) -> None:
    """A K-diffusion attention block, one unit: the ``AdaGroupNorm`` before each attention projects the time
    embedding (time projection), then the attentions."""
    for part in ("norm1", "norm2"):
        claims.claim(getattr(getattr(module, part, None), "linear", None), "time_projection", block)
    for attention in (getattr(module, "attn1", None), module.attn2):
        if attention is not None:
            claim_attention(claims, attention, block)


def check_processor_layers(model: nn.Module) -> None:
    """Refuse attention modules whose processor holds layers of its own (Custom Diffusion's
    ``to_k_custom_diffusion``/``to_v_custom_diffusion``, an IP-Adapter's ``to_k_ip``...), before the layers are
    planned: such a processor computes keys and values with its layers instead of, or besides, the attention's
    ``to_k``/``to_v``, so those never saw calibration data (the run failed only after the FP calibration
    trajectories had been sampled, naming an observer), and an artefact rebuilds the model from its config, which
    has no processor to load those layers into.

    Raises:
        NotImplementedError: naming the processor classes and one module running each.
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if isinstance(processor, nn.Module) and any(isinstance(sub, QUANTIZABLE) for sub in processor.modules()):
            found.setdefault(type(processor).__name__, f"{name}.processor")
    if found:
        shown = ", ".join(f"{kind} (e.g. {where})" for kind, where in sorted(found.items()))
        raise NotImplementedError(f"{type(model).__name__} runs attention processors with layers of their own: "
                                  f"{shown}. tadq quantizes and saves an attention's own projections (to_q, to_k, "
                                  "to_v, to_out) and rebuilds the model from its config; copy such weights into "
                                  "them (Custom Diffusion's train_kv layers replace to_k/to_v), or restore the "
                                  "default processors (model.set_default_attn_processor()), before quantizing")


def claim_unet_parts(claims: RoleClaims, module: nn.Module, block: str) -> None:
    """The parts both UNet classes share, claimed with ``block`` = the part's own name."""
    if isinstance(module, ResnetBlock2D):
        claim_resnet(claims, module, block)
    elif isinstance(module, ResnetBlockCondNorm2D):
        claim_cond_norm_resnet(claims, module, block)
    elif isinstance(module, KAttentionBlock):
        claim_k_attention(claims, module, block)
    elif isinstance(module, Attention):
        claim_attention(claims, module, block)
    elif isinstance(module, (Downsample2D, Upsample2D)):
        claims.claim(module, "resample", block)


def class_label_width(model: nn.Module) -> int | None:
    """What the class embedding of a UNet takes: ``None`` for one label index per row, (N,) integers (an
    ``nn.Embedding`` table, or ``class_embed_type="timestep"``), else the width D of the label vectors, (N, D)
    floats (``"identity"``: the time-embedding width; ``"projection"``/``"simple_projection"``:
    ``projection_class_embeddings_input_dim``)."""
    config = model.config
    if isinstance(model.class_embedding, nn.Embedding) or config.class_embed_type == "timestep":
        return None
    if config.class_embed_type == "identity":
        return model.time_embedding.linear_1.out_features
    return config.projection_class_embeddings_input_dim


def dummy_class_labels(model: nn.Module, batch_size: int) -> Tensor:
    """Label 0 for every row (an index), or zero label vectors, as ``class_label_width`` says (for tracing)."""
    parameter = next(model.parameters())
    width = class_label_width(model)
    if width is None:
        return torch.zeros(batch_size, dtype=torch.long, device=parameter.device)
    return torch.zeros(batch_size, width, device=parameter.device, dtype=parameter.dtype)


def check_class_labels(model: nn.Module, labels: Tensor) -> None:
    """Refuse class labels whose shape or dtype the class embedding cannot take, naming what it takes, instead of
    a broadcasting error deep inside the UNet."""
    width = class_label_width(model)
    kind = type(model).__name__
    if width is None and (labels.ndim != 1 or labels.is_floating_point()):
        raise ValueError(f"this {kind}'s class embedding takes one integer label per sample, (N,); got "
                         f"{labels.dtype} of shape {list(labels.shape)}")
    if width is not None and (labels.ndim != 2 or labels.shape[1] != width or not labels.is_floating_point()):
        raise ValueError(f"this {kind}'s class embedding (class_embed_type={model.config.class_embed_type!r}) takes "
                         f"a float label vector per sample, (N, {width}); got {labels.dtype} of shape "
                         f"{list(labels.shape)}")
    table = getattr(model, "class_embedding", None)
    if width is None and isinstance(table, nn.Embedding) and labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"this {kind}'s class embedding is a table indexed by int64 or int32 labels; got "
                         f"{labels.dtype} (torch's embedding refuses it deep inside the model): pass .long() labels")
    if width is None and isinstance(table, nn.Embedding) and labels.numel():
        # an index past the table failed inside torch's embedding; one read back to the host for both ends
        low, high = torch.stack(torch.aminmax(labels)).tolist()
        if low < 0 or high >= table.num_embeddings:
            raise ValueError(f"this {kind}'s class embedding holds labels 0..{table.num_embeddings - 1} "
                             f"(num_class_embeds={table.num_embeddings}); got labels in [{low}, {high}] (a null "
                             "class for guidance must be one of its rows too)")


_CONDITIONING_HINT = "pass cond=Conditioning(...) (when sampling, conditions= a condition source)"


class TracedUNetAdapter:
    """Adapter methods common to the diffusers UNets; subclasses give ``_roles`` and the calls (``predict_eps``,
    ``dummy_conditioning``)."""

    name = "unet"
    # whether the adapter's ``predict_eps`` returns the prediction half of a learned-variance output
    # (``out_channels = 2·in_channels``, ``prediction_half``); a subclass that does not declare it has any output
    # whose channels differ from its input's refused in ``sample_shape``
    splits_learned_variance = False
    # conditioning fields the model takes but does not require (``attention_mask``); any other field beyond
    # ``conditioning_inputs`` is refused, by ``tadq.quantize`` before any work and by ``predict_eps`` at each call
    optional_inputs: tuple[str, ...] = ()

    def _roles(self, model: nn.Module) -> dict[int, tuple[LayerRole, str]]:
        raise NotImplementedError

    def _dummy_forward(self, model: nn.Module) -> None:
        """One forward on zeros (batch 1, t = 0) with ``dummy_conditioning`` (label 0 for a class-conditional
        ``UNet2DModel``), for tracing; every adapter traces the same way, through its own ``predict_eps``."""
        parameter = next(model.parameters())
        x = torch.zeros(1, *self.sample_shape(model), device=parameter.device, dtype=parameter.dtype)
        t = torch.zeros(1, dtype=torch.long, device=parameter.device)
        with torch.no_grad():
            self.predict_eps(model, x, t, self.dummy_conditioning(model))  # type: ignore[attr-defined]

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        raise NotImplementedError

    def _check_fields(self, model: nn.Module, cond: Conditioning | None, optional: tuple[str, ...],
                      hint: str = _CONDITIONING_HINT) -> None:
        """Refuse conditioning that lacks a field ``model`` needs or carries one it does not take (``optional``
        are accepted), naming the fields, before the model's own error deep inside a matmul."""
        required = self.conditioning_inputs(model)
        kind = type(model).__name__
        if cond is None:
            raise ValueError(f"this {kind} needs conditioning {list(required)}: {hint}")
        given = {name for name in cond.describe() if name != "unconditional"}
        missing = [name for name in required if name not in given]
        if missing:
            raise ValueError(f"this {kind} needs {list(required)}; the conditioning lacks {missing} "
                             f"(it has {sorted(given)})")
        extra = sorted(given - set(required) - set(optional))
        if extra:
            raise ValueError(f"this {kind} takes {list(required)}" +
                             (f" (and optionally {list(optional)})" if optional else "") + f", not {extra}")

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        """Every ``Linear``/``Conv2d`` with its role and unit, in module order.

        Raises:
            NotImplementedError: fused q/k/v projections (``check_unfused``), an attention processor holding
                layers (``check_processor_layers``).
        """
        check_unfused(model)
        check_processor_layers(model)
        roles = self._roles(model)
        infos = []
        for name, module in model.named_modules():
            if isinstance(module, QUANTIZABLE):
                role, block = roles.get(id(module), ("other", name))
                infos.append(LayerInfo(name=name, role=role, block=block))
        return infos

    def blocks(self, model: nn.Module) -> list[str]:
        """Residual and attention blocks as units, every other layer its own unit (BRECQ, docs/methods/qdiffusion.md).

        Ordered as the forward pass visits them (traced with one dummy input), not as modules are registered:
        diffusers registers a block's attentions before its resnets, and the mid block after the up blocks.
        """
        block_of = {info.name: info.block for info in self.layers(model)}
        order: list[str] = []
        hooks = {
            module: (lambda _m, _args, _kwargs, name=name: order.append(block_of[name]))
            for name, module in model.named_modules() if name in block_of
        }
        with pre_hooks(hooks):
            self._dummy_forward(model)
        return list(dict.fromkeys(order))

    def concat_splits(self, model: nn.Module) -> dict[str, int]:
        """Decoder shortcut convs that read ``X = cat[h_deep, h_skip]``, mapped to C1 = channels of ``h_deep``.

        Shortcut splitting (docs/methods/qdiffusion.md) gives each half its own quantizers. The split point
        is measured in one dummy forward: a pre-hook on each decoder block reads the skip tensors it is handed
        (``res_hidden_states_tuple``; diffusers pops them from the end, one per resnet), and a pre-hook on each of
        its ``ResnetBlock2D`` reads the channels of the concatenated input, so C1 = C_in − C_skip. A resnet whose
        deep part does not match the tensor flowing into it (an unfamiliar block layout) is left out, with a warning.
        """
        names = {id(m): n for n, m in model.named_modules()}
        records: dict[str, dict] = {}  # block name → {"input": C, "skips": [C...], "resnets": [(name, C_in, C_out)]}
        hooks: dict[nn.Module, Callable] = {}
        for block in getattr(model, "up_blocks", ()):
            if SKIP_ARGUMENT not in inspect.signature(block.forward).parameters:
                continue
            block_name = names[id(block)]
            hooks[block] = _record_block_inputs(records, block_name, inspect.signature(block.forward))
            for resnet in block.modules():
                if isinstance(resnet, ResnetBlock2D):
                    hooks[resnet] = _record_resnet_input(records, block_name, names[id(resnet)], resnet.out_channels)
        with pre_hooks(hooks):
            self._dummy_forward(model)
        return _splits_from_records(model, records)

    def attention_modules(self, model: nn.Module) -> list[str]:
        """Qualified names of the diffusers ``Attention`` modules (their matmuls are quantized, Q-Diffusion)."""
        return [name for name, module in model.named_modules() if isinstance(module, Attention)]

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W) of one sample; asked at the start of every sampling and calibration run, so a UNet tadq cannot
        drive is refused here, before any work."""
        if getattr(model.config, "time_embedding_type", "positional") == "fourier":
            if getattr(model.time_proj, "log", True):  # UNet2DModel's: log t
                raise ValueError(f"this {type(model).__name__} has a Gaussian-Fourier time embedding: it takes "
                                 "continuous noise levels σ (score-SDE / NCSN++ models), and tadq drives discrete "
                                 "timesteps (at t = 0 the embedding's log t is −inf and every output NaN); score-SDE "
                                 "models are not supported")
            # UNet2DConditionModel's embeds its input as is (no log): the latent upscaler's pipeline feeds log σ / 4
            raise ValueError(f"this {type(model).__name__} has a Gaussian-Fourier time embedding: it takes a "
                             "continuous noise input (StableDiffusionLatentUpscalePipeline feeds it log σ / 4), not "
                             "the discrete timesteps tadq's samplers pass; such UNets are not supported")
        channels_in = model.config.in_channels
        self._check_output_channels(model, channels_in, self._out_channels(model))
        height, width = _sample_size(model)
        return (channels_in, height, width)

    @staticmethod
    def _out_channels(model: nn.Module) -> int:
        """``config.out_channels``, or ``in_channels`` where the config leaves it unset."""
        config = model.config
        out = getattr(config, "out_channels", None)
        return out if out is not None else config.in_channels

    def _check_output_channels(self, model: nn.Module, channels: int, out: int) -> None:
        """Refuse an output the samplers cannot read as a prediction of the input's shape: anything but C channels,
        or 2·C (a learned variance, whose first C channels ``prediction_half`` returns) where the adapter splits it.

        Raises:
            ValueError: naming both channel counts; inpainting's 9 → 4 and any other count is refused here.
        """
        if out == channels or (self.splits_learned_variance and out == 2 * channels):
            return
        kind = type(model).__name__
        if out == 2 * channels:
            raise ValueError(f"this {kind} returns {out} channels for {channels} input channels (a learned-variance "
                             f"output); {type(self).__name__} does not split off its prediction half")
        accepted = f"{channels}" + (f" or {2 * channels} (a learned variance)" if self.splits_learned_variance else "")
        raise ValueError(f"this {kind} returns {out} channels for {channels} input channels (extra conditioning "
                         f"channels as in inpainting, or another output layout); tadq samples models that return "
                         f"{accepted} channels, whose first {channels} are the prediction of the input's shape")

    def prediction_half(self, model: nn.Module, output: Tensor) -> Tensor:
        """The prediction channels of the network's ``output``: its first ``in_channels`` when the model also
        predicts the variance interpolation (``out_channels = 2·in_channels``: improved DDPM, guided diffusion, DiT,
        DeepFloyd IF), else all of it. Only samplers, corrections and the trajectory see this half; the layers
        (``conv_out``, ``proj_out``) are quantized and reconstructed on everything they compute."""
        channels, out = model.config.in_channels, self._out_channels(model)
        if out == channels:
            return output
        self._check_output_channels(model, channels, out)
        return output[:, :channels]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _sample_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) from ``config.sample_size`` (an int, or [H, W]); a value of another type (a string, a float, a bool,
    three sizes) is refused naming the field, instead of an unpacking error or a 1x1 sample (``True``)."""
    size = model.config.sample_size
    if _positive_int(size):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(v) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"this {type(model).__name__}'s config has sample_size={size!r}: expected a positive int or "
                     "[height, width] of positive ints (fix config.json)")


@contextmanager
def pre_hooks(hooks: dict[nn.Module, Callable]) -> Iterator[None]:
    """Install ``module → hook(module, args, kwargs)`` forward pre-hooks for the duration of the block."""
    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record_block_inputs(records: dict[str, dict], block_name: str, signature: inspect.Signature) -> Callable:
    """Pre-hook for a decoder block: channels of its input and of each skip tensor it receives."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = signature.bind(*args, **kwargs).arguments
        hidden, skips = next(iter(bound.values())), bound[SKIP_ARGUMENT]
        records[block_name] = {"input": hidden.shape[1], "skips": [s.shape[1] for s in skips], "resnets": []}

    return hook


def _record_resnet_input(records: dict[str, dict], block_name: str, name: str, out_channels: int) -> Callable:
    """Pre-hook for a decoder resnet: channels of its (concatenated) input, in call order."""

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        records[block_name]["resnets"].append((name, hidden.shape[1], out_channels))

    return hook


def _splits_from_records(model: nn.Module, records: dict[str, dict]) -> dict[str, int]:
    """C1 per shortcut conv: resnet i of a block consumes the i-th skip tensor from the end of the tuple."""
    splits: dict[str, int] = {}
    for record in records.values():
        skips = list(reversed(record["skips"]))
        deep_expected = record["input"]
        for index, (name, in_channels, out_channels) in enumerate(record["resnets"]):
            if index >= len(skips):
                break
            deep = in_channels - skips[index]
            resnet = model.get_submodule(name)
            if deep != deep_expected or deep <= 0:
                logger.warning("%s: input of %d channels is not [deep %d | skip %d]; not split",
                               name, in_channels, deep_expected, skips[index])
            elif resnet.conv_shortcut is not None:
                splits[f"{name}.conv_shortcut"] = deep
            deep_expected = out_channels
    return splits
