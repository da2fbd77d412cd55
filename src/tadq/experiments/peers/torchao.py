"""torchao: ``quantize_`` with int8 *dynamic* activations, the reference that needs no calibration at all.

What torchao does here (0.18.0, CPU): its configs touch ``nn.Linear`` only; every Conv2d stays in FP (forcing
convs in fails). ``W8A8`` = ``Int8DynamicActivationInt8WeightConfig``: int8 weights symmetric per output row,
int8 activations quantized per row (token) at run time from their own range. ``W4A8`` =
``Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, PerAxis(0))``: int4 weights per output row, int8
asymmetric per-row dynamic activations. Dynamic per-row ranges are finer than any static per-tensor scale, so on
the layers it touches this is an upper bound on what static calibration can reach.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from tadq.experiments.peers.base import (
    PeerReport,
    UnsupportedPreset,
    attach_report,
    check_kept_fp,
    kept_fp_note,
    layer_counts,
    require,
)
from tadq.experiments.peers.base import tool_version as _version

if TYPE_CHECKING:
    from tadq.calibration import CalibrationSet

__all__ = ["SETTINGS", "quantize_torchao", "torchao_config"]

DISTRIBUTION = "torchao"
SETTINGS: dict[str, str] = {
    "W8A8": "Int8DynamicActivationInt8WeightConfig (int8 per-row weights, int8 per-row dynamic activations)",
    "W4A8": "Int8DynamicActivationIntxWeightConfig(int4, PerAxis(0)) (int4 per-row weights, int8 per-row dynamic "
            "activations)",
}


def torchao_config(preset: str):
    """(torchao config object, description) for a tadq preset; ``UnsupportedPreset`` names the ones it has."""
    key = preset.upper()
    if key not in SETTINGS:
        raise UnsupportedPreset(f"torchao int8-dynamic-activation configs have no setting for {preset!r}; "
                                f"supported presets: {sorted(SETTINGS)}")
    quantization = require("torchao.quantization", DISTRIBUTION)
    if key == "W8A8":
        # set_inductor_config=False: do not change torch._inductor's global settings as a side effect
        return quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), SETTINGS[key]
    granularity = require("torchao.quantization.granularity", DISTRIBUTION)
    config = quantization.Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                               weight_granularity=granularity.PerAxis(0))
    return config, SETTINGS[key]


def quantize_torchao(model: nn.Module, calibration_set: CalibrationSet | None = None, preset: str = "W8A8",
                     batch_size: int = 128, *, keep_fp: tuple[str, ...] = ()) -> nn.Module:
    """A torchao-quantized deep copy of ``model`` (the FP model is untouched; Linear layers only).

    ``calibration_set`` and ``batch_size`` are accepted for a uniform peer signature and unused: activations are
    quantized dynamically, from each batch's own range. ``keep_fp``: qualified layer names left in float.
    """
    del calibration_set, batch_size
    check_kept_fp(model, keep_fp)
    config, described = torchao_config(preset)
    quantization = require("torchao.quantization", DISTRIBUTION)
    base_tensor = require("torchao.utils", DISTRIBUTION).TorchAOBaseTensor
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    kept = set(keep_fp)
    quantization.quantize_(qmodel, config,
                           filter_fn=lambda module, name: isinstance(module, nn.Linear) and name not in kept)
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    quantized = [m for m in layers if isinstance(m.weight, base_tensor)]
    conv_total, linear_total = layer_counts(model)
    report = PeerReport(
        tool="torchao", version=_version(DISTRIBUTION), setting=described, weights=len(quantized),
        activations=len(quantized), convs=sum(isinstance(m, nn.Conv2d) for m in quantized),
        linears=sum(isinstance(m, nn.Linear) for m in quantized), conv_total=conv_total, linear_total=linear_total,
        notes="; ".join(filter(None, (
            f"{conv_total} Conv2d left in FP" if not any(isinstance(m, nn.Conv2d) for m in quantized) else "",
            kept_fp_note(len(kept))))),
    )
    return attach_report(qmodel, report)
