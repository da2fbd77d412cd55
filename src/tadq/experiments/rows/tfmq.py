"""Rows of ``tadq run`` for TFMQ-DM (docs/methods/tfmq.md), all on the Q-Diffusion row's ``QuantConfig``.

One TFMQ reconstruction (TIAR, then block reconstruction with the TIB frozen) is built per preset and kept on disk
by ``BaseModels`` under the tag of its ``TFMQConfig``; the FSC and maintenance variants are applied to a fresh load
of it (seconds), so every TFMQ row of a preset shares the very same weights:

    tfmq          TIAR + TIB-only FSC (the paper)            tfmq-cache    ... + exact FP temporal-feature cache
    tfmq-model    TIAR + model-wide FSC (the authors' code)  tfmq-select   ... + per-block TIB / quantized-cache choice
    tfmq+ptqd     PTQD fitted on top of ``tfmq``

and ablations: ``tfmq-tiar`` (TIAR, no FSC), and FSC or the cache alone on the Q-Diffusion row's own weights
(``qdiffusion+fsc``, ``qdiffusion+fsc-model``, ``qdiffusion+cache``).

Quantize times of the variants include the base's recorded time; ``tfmq+ptqd`` reports the PTQD fit only, like the
Q-Diffusion + PTQD row.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

from tadq.config import config_to_dict
from tadq.corrections import TACConfig, TCECConfig
from tadq.corrections.ptqd import PTQDConfig
from tadq.corrections.ptqd.correction import ptqd_tables
from tadq.corrections.ptqd.experiment import fit_ptqd
from tadq.denoiser import QuantizedDenoiser
from tadq.experiments.rows.base import BaseModels, Variant, method_label, register_method
from tadq.experiments.rows.builtin import method_config
from tadq.tfmq import TFMQConfig, apply_tfmq, quantize_tfmq, tfmq_tag

if TYPE_CHECKING:
    from tadq.experiments.run import RunConfig

__all__ = ["tfmq_base", "tfmq_config"]

# method → (label, weights it starts from, TFMQConfig changes); the last four rows are ablations
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "tfmq": ("TFMQ-DM", "tfmq", {}),
    "tfmq-model": ("TFMQ-DM, model-wide FSC", "tfmq", {"fsc": "model"}),
    "tfmq-cache": ("TFMQ-DM + FP cache", "tfmq", {"maintenance": "cache_fp"}),
    "tfmq-select": ("TFMQ-DM + selection", "tfmq", {"maintenance": "select"}),
    "tfmq-tiar": ("TIAR only (no FSC)", "tfmq", {"fsc": "off"}),
    "qdiffusion+fsc": ("Q-Diffusion + TIB FSC", "qdiffusion", {}),
    "qdiffusion+fsc-model": ("Q-Diffusion + model-wide FSC", "qdiffusion", {"fsc": "model"}),
    "qdiffusion+cache": ("Q-Diffusion + FP cache", "qdiffusion", {"fsc": "off", "maintenance": "cache_fp"}),
}
NO_TIAR = {"tiar": False, "freeze_time_projections": False}  # what the Q-Diffusion weights were built with


def tfmq_config(config: RunConfig) -> TFMQConfig:
    """The ``tfmq`` row's settings: defaults; model-wide FSC reads the run's calibration trajectories (same count,
    seed and inputs per step as the base calibration, but every step of the grid)."""
    calibration = config.calibration
    return TFMQConfig(num_samples=calibration.num_trajectories, seed=calibration.seed,
                      fsc_samples_per_step=calibration.samples_per_step)


def tfmq_base(bases: BaseModels, config: RunConfig, preset_name: str) -> QuantizedDenoiser:
    """The ``tfmq`` row's model (TIAR + TIB FSC on the Q-Diffusion config), built once and then loaded from disk.

    A fresh object on every call once saved, so callers may change it (``apply_tfmq``, stacking corrections).
    """
    quant_config = method_config("qdiffusion", preset_name, config)
    settings = tfmq_config(config)
    tag = tfmq_tag(settings)

    def build() -> QuantizedDenoiser:
        checkpoint = bases.folder / f"recon-{tag}-{quant_config.label}.pt"
        qmodel = quantize_tfmq(bases.model, bases.scheduler, quant_config, settings, config.sampler,
                               calibration=bases.calibration, cache_dir=config.cache_dir, checkpoint=checkpoint)
        checkpoint.unlink(missing_ok=True)
        return qmodel

    return bases.get(quant_config, build=build, tag=tag)


def _describe(denoiser: nn.Module) -> dict[str, Any]:
    """The TFMQ report (TIAR losses, per-feature disturbance and choices, cache bytes) kept with the cell."""
    extras: dict[str, Any] = {"tfmq": denoiser.corrections[0].report}
    if len(denoiser.corrections) > 1:  # PTQD on top: its tables join the PTQD figure
        extras["ptqd_tables"] = ptqd_tables(denoiser.corrections[-1])
    return extras


def _variant_row(name: str) -> None:
    label, weights, changes = VARIANTS[name]

    @register_method(name, label)
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        quant_config = method_config("qdiffusion", preset_name, config)
        settings = dataclasses.replace(tfmq_config(config), **(NO_TIAR if weights == "qdiffusion" else {}), **changes)

        def build() -> nn.Module:
            if weights == "qdiffusion":  # the Q-Diffusion row's very weights
                qmodel = bases.get(quant_config)
            else:
                qmodel = tfmq_base(bases, config, preset_name)
            if changes or weights == "qdiffusion":
                qmodel = apply_tfmq(qmodel, bases.model, bases.scheduler, settings, config.sampler,
                                    cache_dir=config.cache_dir)
            return qmodel

        return Variant(method_label(name), quant_config.label, build,
                       {"method": name, "quant": config_to_dict(quant_config), "tfmq": config_to_dict(settings)},
                       _describe)


for _name in VARIANTS:
    _variant_row(_name)


@register_method("tfmq+ptqd", "TFMQ-DM + PTQD")
def tfmq_ptqd_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
    """PTQD fitted for the deployment sampler on top of the ``tfmq`` row's model (calibration noise seed)."""
    quant_config = method_config("qdiffusion", preset_name, config)
    ptqd_config = PTQDConfig(seed=config.calibration.seed)

    def build() -> nn.Module:
        return fit_ptqd(tfmq_base(bases, config, preset_name), bases.model, bases.scheduler, config.sampler,
                        ptqd_config)

    return Variant(method_label("tfmq+ptqd"), quant_config.label, build,
                   {"method": "tfmq+ptqd", "quant": config_to_dict(quant_config),
                    "tfmq": config_to_dict(tfmq_config(config)), "ptqd": config_to_dict(ptqd_config)}, _describe)


def _stacked_row(name: str, label: str, make) -> None:
    """TFMQ-DM inside the network, sampler-level corrections on top (docs/methods/composition.md#compatibility)."""
    from tadq.experiments.rows.sampler_corrections import stacked_row

    @register_method(name, label)
    def build_row(bases: BaseModels, config: RunConfig, preset_name: str) -> Variant:
        quant_config = method_config("qdiffusion", preset_name, config)
        return stacked_row(name, method_label(name), lambda: tfmq_base(bases, config, preset_name),
                           {"quant": config_to_dict(quant_config), "tfmq": config_to_dict(tfmq_config(config))},
                           quant_config.label, make(config.calibration.seed), bases, config)


_stacked_row("tfmq+tac", "TFMQ-DM + TAC", lambda seed: [TACConfig(seed=seed)])
_stacked_row("tfmq+tac+tcec", "TFMQ-DM + TAC + TCEC", lambda seed: [TACConfig(seed=seed), TCECConfig(seed=seed)])
