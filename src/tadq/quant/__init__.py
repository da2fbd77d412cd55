"""The fake-quant core: schemes, range estimators, quantizers and quantized layers."""

from tadq.quant.convert import LayerPlan, convert_layers, plan_layers
from tadq.quant.fake_quant import fake_quantize, quantize_to_int, round_ste, scale_and_zero_point
from tadq.quant.modules import QuantConv2d, QuantLayer, QuantLinear, quantize_module
from tadq.quant.qscheme import PRESETS, QScheme, preset
from tadq.quant.quantizer import Quantizer
from tadq.quant.ranges import estimate_range, minmax_range, mse_range, percentile_range

__all__ = [
    "QScheme", "PRESETS", "preset", "Quantizer", "QuantConv2d", "QuantLinear", "QuantLayer", "quantize_module",
    "fake_quantize", "quantize_to_int", "round_ste", "scale_and_zero_point", "estimate_range", "minmax_range",
    "mse_range", "percentile_range", "LayerPlan", "plan_layers", "convert_layers",
]
