"""The base rows: naive PTQ, Q-Diffusion, and PTQD on the very same Q-Diffusion model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import QuantConfig, config_to_dict
from tadq.corrections.ptqd import PTQDConfig
from tadq.corrections.ptqd.correction import ptqd_tables, vsc_report
from tadq.corrections.ptqd.experiment import fit_ptqd
from tadq.experiments.rows.base import BaseModels, Variant, method_label, register_method

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["method_config"]


def method_config(method: str, preset_name: str, config: RunConfig) -> QuantConfig:
    """The base ``QuantConfig`` of one (method, preset) row (correction rows sit on the Q-Diffusion base)."""
    if method == "naive":
        return QuantConfig.from_preset(preset_name, calibration=config.calibration)
    return QuantConfig.from_preset(preset_name, method="qdiffusion", calibration=config.calibration,
                                   reconstruction=config.reconstruction, split_shortcut=True, quantize_attention=True)


def _base_row(method: str) -> None:
    @register_method(method, {"naive": "naive PTQ", "qdiffusion": "Q-Diffusion"}[method])
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        quant_config = method_config(method, preset_name, config)
        return Variant(method_label(method), quant_config.label, lambda: bases.get(quant_config),
                       {"method": method, "quant": config_to_dict(quant_config)})


_base_row("naive")
_base_row("qdiffusion")


@register_method("ptqd", "Q-Diffusion + PTQD")
def ptqd_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
    """PTQD fitted for the deployment sampler on the Q-Diffusion base (calibration noise seed)."""
    base_config = method_config("qdiffusion", preset_name, config)
    ptqd_config = PTQDConfig(seed=config.calibration.seed)  # calibration noise, disjoint from the evaluation seed

    def build() -> nn.Module:
        return fit_ptqd(bases.get(base_config), bases.model, bases.scheduler, config.sampler, ptqd_config)

    def describe(denoiser: nn.Module) -> dict[str, Any]:
        correction = denoiser.corrections[-1]
        return {"ptqd_tables": ptqd_tables(correction), "ptqd_vsc": vsc_report(correction)}

    return Variant(method_label("ptqd"), base_config.label, build,
                   {"method": "ptqd", "quant": config_to_dict(base_config), "ptqd": config_to_dict(ptqd_config)},
                   describe)
