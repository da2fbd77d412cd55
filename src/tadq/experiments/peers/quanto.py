"""optimum-quanto: ``quantize`` + its ``Calibration`` context on tadq's FP-trajectory inputs, then ``freeze``.

What quanto does here (0.2.7, CPU): the weights of every Conv2d and Linear, symmetric per output channel (qint8), or
qint4 affine in groups of up to 128 inputs where the fan-in divides (else per channel). Activations qint8, one
static symmetric scale per tensor from a running average (momentum 0.9) of the absolute maximum over the
calibration batches, but not at every layer's input: its ``QLinear`` quantizes its input, its ``QConv2d`` only its
output, and ``Calibration``'s "streamline" drops an output quantization whose consumer is an add, a SiLU or a norm.
On a diffusers UNet every conv therefore runs with floating-point inputs (W8A16): the report counts the layers
whose input arrives quantized in a probe forward instead of trusting the setting. No 4-bit activations, no
timestep awareness; it simulates on CPU, so no speed-up.
"""

from __future__ import annotations

import copy
import glob
from typing import TYPE_CHECKING

import torch
from torch import nn

from tadq.experiments.peers.base import (
    PeerReport,
    UnsupportedPreset,
    attach_report,
    calibration_batches,
    check_kept_fp,
    kept_fp_note,
    layer_counts,
    require,
)
from tadq.experiments.peers.base import tool_version as _version

if TYPE_CHECKING:
    from tadq.calibration import CalibrationSet

__all__ = ["SETTINGS", "quantize_quanto", "quanto_setting"]

DISTRIBUTION = "optimum-quanto"
# tadq preset -> (weight qtype, activation qtype or None for weight-only); quanto has no 4-bit activations
SETTINGS: dict[str, tuple[str, str | None]] = {
    "W8A8": ("qint8", "qint8"), "W4A8": ("qint4", "qint8"), "W8A16": ("qint8", None), "W4A16": ("qint4", None),
}


def quanto_setting(preset: str) -> tuple[str, str | None]:
    """quanto's (weights, activations) for a tadq preset; ``UnsupportedPreset`` names the ones it has."""
    key = preset.upper()
    if key not in SETTINGS:
        raise UnsupportedPreset(f"optimum-quanto has no setting for {preset!r} (its activations are 8-bit only); "
                                f"supported presets: {sorted(SETTINGS)}")
    return SETTINGS[key]


def quantize_quanto(model: nn.Module, calibration_set: CalibrationSet | None, preset: str = "W8A8",
                    batch_size: int = 128, *, momentum: float = 0.9, keep_fp: tuple[str, ...] = ()) -> nn.Module:
    """A quanto-quantized deep copy of ``model`` (the FP model is untouched), activations calibrated with
    quanto's own ``Calibration`` on ``calibration_set``; ``peers.peer_report`` tells what was quantized.
    ``keep_fp``: qualified layer names left in float (quanto's own ``exclude``)."""
    from tadq.registry import adapter_for

    weights, activations = quanto_setting(preset)
    if activations is not None and calibration_set is None:
        raise ValueError(f"quanto {preset} calibrates activations: pass a calibration set")
    check_kept_fp(model, keep_fp)
    quanto = require("optimum.quanto", DISTRIBUTION)
    adapter = adapter_for(model)
    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    # exclude takes fnmatch patterns: each name escaped so it matches itself only
    quanto.quantize(qmodel, weights=getattr(quanto, weights),
                    activations=getattr(quanto, activations) if activations else None,
                    exclude=[glob.escape(name) for name in keep_fp] or None)
    if activations is not None:
        with torch.no_grad(), quanto.Calibration(momentum=momentum):
            for x, t, cond in calibration_batches(calibration_set, batch_size):
                adapter.predict_eps(qmodel, x, t, cond)
    quanto.freeze(qmodel)
    inputs = _layers_with_quantized_inputs(qmodel, quanto, adapter, calibration_set) if activations else set()
    return attach_report(qmodel, _report(qmodel, model, quanto, weights, activations, inputs, len(keep_fp)))


def _layers_with_quantized_inputs(qmodel: nn.Module, quanto, adapter, calibration_set: CalibrationSet) -> set[str]:
    """The names of the quanto layers that receive a quantized tensor as input in one forward (two calibration rows).

    Measured rather than read off ``activation_qtype`` (set on every layer): whether an input is quantized depends
    on the layer type (QLinear quantizes its input, QConv2d does not) and on what calibration's streamline removed.
    """
    seen: set[str] = set()

    def hook(name: str):
        def record(_module: nn.Module, args: tuple, _output) -> None:
            if args and isinstance(args[0], quanto.QTensor):
                seen.add(name)
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in qmodel.named_modules()
               if isinstance(module, quanto.QModuleMixin)]
    try:
        x, t, cond = next(calibration_batches(calibration_set, 2))
        with torch.no_grad():
            adapter.predict_eps(qmodel, x, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _report(qmodel: nn.Module, model: nn.Module, quanto, weights: str, activations: str | None,
            quantized_inputs: set[str], kept_fp: int = 0) -> PeerReport:
    named = [(name, m) for name, m in qmodel.named_modules()
             if isinstance(m, quanto.QModuleMixin) and isinstance(m, nn.Conv2d | nn.Linear) and m.weight_qtype]
    layers = [m for _, m in named]
    conv_total, linear_total = layer_counts(model)
    setting = f"weights {weights}, activations {activations or 'FP (weight-only)'}"
    floating = [m for name, m in named if name not in quantized_inputs]
    floating_convs = sum(isinstance(m, nn.Conv2d) for m in floating)
    notes = ("static per-tensor activation scales at Linear inputs and at the outputs streamline keeps; "
             f"{len(floating)} layers ({floating_convs} Conv2d) take floating-point inputs" if activations else "")
    notes = "; ".join(filter(None, (notes, kept_fp_note(kept_fp))))
    return PeerReport(
        tool="optimum-quanto", version=_version(DISTRIBUTION), setting=setting, weights=len(layers),
        activations=sum(name in quantized_inputs for name, _ in named),
        convs=sum(isinstance(m, nn.Conv2d) for m in layers), linears=sum(isinstance(m, nn.Linear) for m in layers),
        conv_total=conv_total, linear_total=linear_total, notes=notes,
    )
