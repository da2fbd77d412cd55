"""The named sets of layers kept in floating point (``--fp-layers``), in a module of their own: the command line
takes their default without importing ``tadq.config`` (and diffusers with it) for ``--help``. ``tadq.config``
exports the same names."""

from __future__ import annotations

__all__ = ["FP_LAYER_PRESETS", "DEFAULT_FP_LAYERS", "fp_layer_roles"]

FP_LAYER_PRESETS: dict[str, tuple[str, ...]] = {
    # Q-Diffusion's released code quantizes every conv/linear at the same bits (docs/methods/qdiffusion.md).
    "none": (),
    # The common convention of later papers (PTQD, TFMQ-DM): first and last layers in higher precision.
    "first_last": ("input_conv", "output_conv"),
    # ... plus the timestep-embedding MLP (PTQD keeps time_embed.0 at 8 bits; TFMQ keeps it in FP).
    "first_last_time": ("input_conv", "output_conv", "time_embedding"),
}
"""Named sets of adapter roles kept in floating point (``QuantConfig.keep_fp_roles``)."""
DEFAULT_FP_LAYERS = "first_last"
"""What ``tadq run``, ``tadq bench`` and ``tadq quantize`` (a recipe built from a preset) keep in floating point:
the setting that holds on both shipped pixel models (docs/methods/qdiffusion.md#the-default-base)."""


def fp_layer_roles(key: str) -> tuple[str, ...]:
    """The adapter roles ``FP_LAYER_PRESETS[key]`` keeps in floating point; ``ValueError`` naming the known keys."""
    if key not in FP_LAYER_PRESETS:
        raise ValueError(f"unknown fp_layers {key!r}; choose one of {list(FP_LAYER_PRESETS)} (tadq.config."
                         "FP_LAYER_PRESETS: the adapter roles each keeps in floating point)")
    return FP_LAYER_PRESETS[key]
