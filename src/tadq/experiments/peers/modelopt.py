"""NVIDIA ModelOpt: ``mtq.quantize(model, cfg, forward_loop)`` with a forward loop over tadq's FP-trajectory inputs.

What ModelOpt does here (0.47.0, CPU, pure-PyTorch fake quant): it wraps every Conv2d and Linear, and its default
exclusions (LLM parts) leave those of the digits UNet alone; but ``*proj_out.*`` (Whisper's output head) matches the
``proj_out`` of every diffusers ``Transformer2DModel`` (the 4 in the text-to-image UNet): those keep float weights
and inputs, and the report counts them. ``INT8_DEFAULT_CFG``: int8 weights symmetric
per output channel, int8 inputs one symmetric per-tensor scale, both from the maximum ("max" calibration).
``INT8_SMOOTHQUANT_CFG``: the same after SmoothQuant moves activation outliers into the weights; ModelOpt smooths
Linear layers only (the convs get plain INT8) and only at int8 (at other widths it warns and skips smoothing,
so this recipe is offered at ``W8A8`` only). ``W4A8_AWQ_BETA_CFG``: int4 weights in blocks of 128 along the
weight's *last* dimension (for a Conv2d that is the kernel width: one scale per 3 weights in a 3×3 conv, one per
weight in a 1×1 conv), AWQ-lite scaling on Linear layers, and **FP8 (E4M3) activations**, not int8.

A tadq preset retargets the INT8 recipes' integer bit widths (e.g. ``W4A8`` = the INT8 recipe with 4-bit
per-channel weights); ``W4A8_AWQ_BETA_CFG`` exists only as shipped (nearest preset ``W4A8``).
"""

from __future__ import annotations

import copy
import glob
from typing import TYPE_CHECKING, Any

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

__all__ = ["RECIPES", "modelopt_config", "quantize_modelopt", "supported_presets"]

DISTRIBUTION = "nvidia-modelopt"
_INTEGER_RECIPES = ("INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG")
RECIPES: dict[str, str] = {
    "INT8_DEFAULT_CFG": "int8 per-channel weights, int8 per-tensor inputs, max calibration",
    "INT8_SMOOTHQUANT_CFG": "INT8 after SmoothQuant (Linear layers smoothed; convs plain INT8)",
    "W4A8_AWQ_BETA_CFG": "int4 weights in blocks of 128 along the last weight dim (conv: 3 weights per scale in 3x3, "
                         "1 in 1x1), AWQ-lite on Linear, FP8 E4M3 activations",
}
_ALL_PRESETS = ("W8A8", "W4A8", "W4A4", "W8A16", "W4A16")


def supported_presets(config: str) -> tuple[str, ...]:
    """The tadq presets ``config`` can be mapped onto."""
    if config == "INT8_DEFAULT_CFG":
        return _ALL_PRESETS
    if config == "INT8_SMOOTHQUANT_CFG":
        return ("W8A8",)  # ModelOpt skips smoothing at any other width ("Only int8 smoothing is supported")
    if config == "W4A8_AWQ_BETA_CFG":
        return ("W4A8",)
    return ()


def modelopt_config(config: str, preset: str | None, recipes: Any = None) -> tuple[dict[str, Any], str]:
    """(ModelOpt config dict, description) of recipe ``config`` mapped onto tadq ``preset`` (``None``: as shipped).

    ``recipes``: where the recipe dicts live (``modelopt.torch.quantization``; imported when ``None``).
    """
    from tadq.quant.qscheme import preset as preset_schemes

    if recipes is None:
        recipes = require("modelopt.torch.quantization", DISTRIBUTION)
    if not hasattr(recipes, config) or not config.endswith("_CFG"):
        raise ValueError(f"unknown ModelOpt config {config!r}; e.g. {sorted(RECIPES)}")
    cfg = copy.deepcopy(getattr(recipes, config))
    described = f"{config}: {RECIPES.get(config, 'as shipped')}"
    if preset is None:
        return cfg, described
    key = preset.upper()
    if key not in supported_presets(config):
        raise UnsupportedPreset(f"ModelOpt {config} cannot be mapped onto {preset!r}; supported presets: "
                                f"{list(supported_presets(config))}")
    if config not in _INTEGER_RECIPES or key == "W8A8":
        return cfg, described  # W4A8_AWQ_BETA_CFG as shipped (its A8 is FP8), INT8 recipes at their own bits
    weight_scheme, input_scheme = preset_schemes(key)
    _set_bits(cfg, "*weight_quantizer", weight_scheme.bits)
    _set_bits(cfg, "*input_quantizer", input_scheme.bits)
    inputs = f"int{input_scheme.bits} inputs" if input_scheme.bits else "inputs in FP"
    return cfg, f"{config} retargeted to int{weight_scheme.bits} weights, {inputs} ({key})"


def _set_bits(cfg: dict[str, Any], quantizer: str, bits: int | None) -> None:
    """Set the integer width of the ``quantizer`` pattern in ModelOpt's ``quant_cfg`` list (``None``: disable)."""
    for index, entry in enumerate(cfg["quant_cfg"]):
        if entry.get("quantizer_name") == quantizer and "cfg" in entry:
            if bits is None:
                cfg["quant_cfg"][index] = {"quantizer_name": quantizer, "enable": False}
            else:
                entry["cfg"]["num_bits"] = bits
            return
    raise ValueError(f"ModelOpt config has no {quantizer!r} entry to retarget")


def quantize_modelopt(model: nn.Module, calibration_set: CalibrationSet, config: str = "INT8_DEFAULT_CFG",
                      batch_size: int = 128, *, preset: str | None = None, keep_fp: tuple[str, ...] = ()
                      ) -> nn.Module:
    """A ModelOpt-quantized deep copy of ``model`` (the FP model is untouched), calibrated by a forward loop over
    ``calibration_set``; ``config`` names a recipe of ``modelopt.torch.quantization``, ``preset`` retargets it.
    ``keep_fp``: qualified layer names whose quantizers are switched off (entries after the recipe's)."""
    from tadq.registry import adapter_for

    if calibration_set is None:  # its forward loop failed inside ModelOpt with "NoneType has no len()"
        raise ValueError(f"ModelOpt {config} calibrates with a forward loop over data (weight-only presets too): "
                         "pass a calibration set")
    check_kept_fp(model, keep_fp)
    mtq = require("modelopt.torch.quantization", DISTRIBUTION)
    cfg, described = modelopt_config(config, preset, mtq)
    if keep_fp:  # ordered list, later entries win: each kept layer's quantizers (weight, input, output) off
        cfg["quant_cfg"] = [*cfg["quant_cfg"], *({"quantizer_name": f"{glob.escape(name)}.*_quantizer",
                                                  "enable": False} for name in keep_fp)]
        described += f"; {kept_fp_note(len(keep_fp))}"
    adapter = adapter_for(model)

    def forward_loop(module: nn.Module) -> None:
        with torch.no_grad():
            for x, t, cond in calibration_batches(calibration_set, batch_size):
                adapter.predict_eps(module, x, t, cond)

    qmodel = copy.deepcopy(model).eval().requires_grad_(False)
    qmodel = mtq.quantize(qmodel, cfg, forward_loop).eval()
    return attach_report(qmodel, _report(qmodel, model, described))


def _enabled(quantizer: nn.Module | None) -> bool:
    if quantizer is None:
        return False
    if hasattr(quantizer, "is_enabled"):
        return bool(quantizer.is_enabled)
    return any(_enabled(part) for part in quantizer.children())  # SequentialQuantizer (two-stage AWQ weights)


def _report(qmodel: nn.Module, model: nn.Module, described: str) -> PeerReport:
    layers = [m for m in qmodel.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    weighted = [m for m in layers if _enabled(getattr(m, "weight_quantizer", None))]
    inputs = sum(_enabled(getattr(m, "input_quantizer", None)) for m in layers)
    scaled = sum(getattr(getattr(m, "input_quantizer", None), "pre_quant_scale", None) is not None for m in layers)
    conv_total, linear_total = layer_counts(model)
    return PeerReport(
        tool="nvidia-modelopt", version=_version(DISTRIBUTION), setting=described, weights=len(weighted),
        activations=inputs, convs=sum(isinstance(m, nn.Conv2d) for m in weighted),
        linears=sum(isinstance(m, nn.Linear) for m in weighted), conv_total=conv_total, linear_total=linear_total,
        notes=f"{scaled} layers with a smoothing/AWQ input scale" if scaled else "",
    )
