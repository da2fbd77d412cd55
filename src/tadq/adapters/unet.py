"""Adapter for diffusers ``UNet2DModel`` (unconditional or class-conditional pixel UNets).

Roles come from module types and the diffusers block structure (``ResnetBlock2D.time_emb_proj``,
``Attention.to_q``...), never from name substrings. Facts that only the forward pass knows (block order, which
decoder inputs are ``[deep | skip]`` concatenations) are traced with one dummy forward and hooks.
"""

from __future__ import annotations

from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import (
    AttnSkipDownBlock2D,
    AttnSkipUpBlock2D,
    SkipDownBlock2D,
    SkipUpBlock2D,
)
from torch import Tensor, nn

from tadq.adapters._unet_common import (
    RoleClaims,
    TracedUNetAdapter,
    check_class_labels,
    claim_unet_parts,
    dummy_class_labels,
)
from tadq.adapters.base import LayerRole
from tadq.registry import register_adapter
from tadq.sampling.conditioning import Conditioning

__all__ = ["UNet2DAdapter"]


def _named_roles(model: UNet2DModel) -> dict[int, tuple[LayerRole, str]]:
    """id(layer) → (role, owning block name) from the module tree."""
    claims = RoleClaims(model)
    claims.claim(model.conv_in, "input_conv", "conv_in")
    claims.claim(model.conv_out, "output_conv", "conv_out")
    claims.claim(model.time_embedding, "time_embedding", "time_embedding")
    claims.claim(getattr(model, "class_embedding", None), "class_embedding", "class_embedding")
    for module in model.modules():
        _claim_skip_conv(claims, module)
        claim_unet_parts(claims, module, claims.names[id(module)])
    return claims.roles


def _claim_skip_conv(claims: RoleClaims, block: nn.Module) -> None:
    """The progressive input/output path of the score-SDE skip blocks (NCSN++ layout): a down block's
    ``skip_conv`` reads the FIR-downsampled input sample x_t itself, as ``conv_in`` does; an up block's writes
    image channels that ``UNet2DModel.forward`` adds to the prediction after ``conv_out``. So they are the input
    and output convs of their resolution (kept in float by ``fp_layers="first_last"``), each its own unit."""
    skip_conv = getattr(block, "skip_conv", None)
    if skip_conv is None:
        return
    if isinstance(block, (SkipDownBlock2D, AttnSkipDownBlock2D)):
        claims.claim(skip_conv, "input_conv", claims.names[id(skip_conv)])
    elif isinstance(block, (SkipUpBlock2D, AttnSkipUpBlock2D)):
        claims.claim(skip_conv, "output_conv", claims.names[id(skip_conv)])


def _timesteps_for(model: UNet2DModel, t: Tensor) -> Tensor:
    """``t`` as the UNet's time embedding takes it: a learned embedding (``time_embedding_type="learned"``, one
    table row per training timestep) is indexed by integers, so a fractional timestep (euler or Karras grids) is
    refused by name instead of failing inside ``nn.Embedding``, and so is a timestep past its last row (a scheduler
    of more training timesteps than the UNet config's ``num_train_timesteps``: an IndexError inside torch)."""
    if model.config.time_embedding_type != "learned":
        return t
    if t.is_floating_point():
        fractional = t[t != t.round()]
        if fractional.numel():
            raise ValueError(f"this UNet2DModel has a learned time embedding (one table row per training timestep) "
                             f"and cannot take the fractional timestep {float(fractional[0]):g} of this sampler's "
                             "grid: sample it on an integer grid (ddim, ddpm, or euler/dpmsolver++ with "
                             "timestep_spacing 'leading' or 'trailing')")
    rows = model.time_proj.num_embeddings
    outside = t[(t < 0) | (t >= rows)]
    if outside.numel():
        raise ValueError(f"this UNet2DModel's learned time embedding has {rows} rows (its config's "
                         f"num_train_timesteps) and cannot take timestep {float(outside[0]):g}: its scheduler has "
                         "more training timesteps than the UNet was built for; fix num_train_timesteps in the "
                         "scheduler's or the UNet's config so that they agree")
    return t.long()


@register_adapter(UNet2DModel, subfolder="unet", pipeline_class="DDPMPipeline")
class UNet2DAdapter(TracedUNetAdapter):
    """Roles and calls for ``UNet2DModel``."""

    name = "unet2d"
    splits_learned_variance = True  # improved-DDPM / guided-diffusion 2·C outputs: ``predict_eps`` gives the ε half

    def _roles(self, model: nn.Module) -> dict[int, tuple[LayerRole, str]]:
        return _named_roles(model)

    def sample_shape(self, model: nn.Module) -> tuple[int, int, int]:
        """(C, H, W); also refuses a size the UNet cannot take: ``UNet2DModel`` halves H and W in every downsampling
        block and concatenates the skips without resizing, so H and W must be multiples of 2^(downsampling
        blocks), else its forward fails on the first decoder concatenation."""
        channels, height, width = super().sample_shape(model)
        factor = 2 ** sum(getattr(block, "downsamplers", None) is not None for block in model.down_blocks)
        if height % factor or width % factor:
            raise ValueError(f"this UNet2DModel's sample_size is {height}x{width}, not a multiple of {factor} (it "
                             f"downsamples {factor.bit_length() - 1} times): fix sample_size in its config.json")
        return channels, height, width

    def dummy_conditioning(self, model: nn.Module, batch_size: int = 1) -> Conditioning | None:
        """Label 0 for every row of a class-conditional UNet (zero label vectors for ``class_embed_type="identity"``;
        tracing, cost counting); ``None`` when unconditional."""
        if not self.conditioning_inputs(model):
            return None
        return Conditioning(class_labels=dummy_class_labels(model, batch_size))

    def conditioning_inputs(self, model: nn.Module) -> tuple[str, ...]:
        """``("class_labels",)`` for a UNet with a class embedding (``num_class_embeds`` / ``class_embed_type``)."""
        return ("class_labels",) if getattr(model, "class_embedding", None) is not None else ()

    def predict_eps(self, model: nn.Module, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The UNet's output (in its scheduler's prediction type) at (x, t), with ``cond.class_labels`` if it takes
        labels, its first ``in_channels`` for a learned-variance output (``prediction_half``);
        ``cond.unconditional`` is the walker's business, not the model's."""
        t = _timesteps_for(model, t)
        if not self.conditioning_inputs(model):
            if cond is not None:
                raise ValueError(f"this UNet2DModel is unconditional but was given conditioning {cond.describe()}")
            return self.prediction_half(model, model(x, t).sample)
        if cond is None or cond.class_labels is None:
            raise ValueError("this UNet2DModel is class-conditional: pass cond=Conditioning(class_labels=...) (e.g. "
                             "conditions=RandomClassLabels(num_classes, null_class) when sampling)")
        extra = sorted(k for k, v in cond.describe().items() if k not in ("class_labels", "unconditional") and v)
        if extra:
            raise ValueError(f"this UNet2DModel takes class_labels only, not {extra}")
        check_class_labels(model, cond.class_labels)
        return self.prediction_half(model, model(x, t, class_labels=cond.class_labels).sample)

    def temporal_embedding(self, model: nn.Module, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """emb = h(t) [+ e(y)], (B, D): the temporal path's input to every residual block, exactly as
        ``UNet2DModel.forward`` computes it (its step 1). TFMQ-DM's temporal information block starts here."""
        emb = model.time_embedding(model.time_proj(t).to(dtype=model.dtype))
        if model.class_embedding is not None:
            if labels is None:
                raise ValueError("this UNet is class-conditional: pass the class labels with the timesteps")
            label_input = model.time_proj(labels) if model.config.class_embed_type == "timestep" else labels
            emb = emb + model.class_embedding(label_input).to(dtype=model.dtype)
        elif labels is not None:
            raise ValueError("labels given, but this UNet has no class embedding")
        return emb

    def temporal_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules ``temporal_embedding`` runs: sinusoidal projection, the time MLP h, the label table e."""
        parts = [model.time_proj, model.time_embedding, getattr(model, "class_embedding", None)]
        return [m for m in parts if m is not None]
