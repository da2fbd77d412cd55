"""``QuantizedDenoiser``: a fake-quantized model plus the config and layer plan that produced it."""

from __future__ import annotations

from torch import Tensor, nn

from tadq.config import QuantConfig
from tadq.quant.convert import LayerPlan

__all__ = ["QuantizedDenoiser"]


class QuantizedDenoiser(nn.Module):
    """Callable as ``denoiser(x, t) -> ε`` (what ``tadq.sample`` takes).

    Args:
        model: the converted (fake-quant) diffusers model.
        adapter: its ``ModelAdapter``.
        config: the ``QuantConfig`` used.
        plans: per-layer decisions (the quantization map).
    """

    def __init__(self, model: nn.Module, adapter, config: QuantConfig, plans: list[LayerPlan]) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.config = config
        self.plans = plans

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.adapter.predict_eps(self.model, x, t)

    def quantization_map(self) -> dict[str, dict]:
        """Layer name → role, schemes, and the reason a layer stayed in FP."""
        return {plan.name: plan.to_json() for plan in self.plans}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.adapter.sample_shape(self.model)
