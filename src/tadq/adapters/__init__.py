"""Model adapters: role questions answered per architecture (registered by model class)."""

from tadq.adapters.base import LAYER_ROLES, TEMPORAL_ROLES, LayerInfo, LayerRole, ModelAdapter
from tadq.adapters.mmdit import FluxAdapter, SD3Adapter
from tadq.adapters.transformer2d import DiTAdapter, PixArtAdapter
from tadq.adapters.unet import UNet2DAdapter
from tadq.adapters.unet_condition import UNet2DConditionAdapter

__all__ = ["ModelAdapter", "LayerInfo", "LayerRole", "LAYER_ROLES", "TEMPORAL_ROLES", "UNet2DAdapter",
           "UNet2DConditionAdapter", "DiTAdapter", "PixArtAdapter", "SD3Adapter", "FluxAdapter"]
