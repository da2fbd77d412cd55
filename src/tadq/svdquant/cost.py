"""What a granularity / SVDQuant recipe costs: bit-operations with the low-rank branch, FP overhead operations and
the runnable-kernel status of every quantized layer.

Bit-operations follow ``tadq.corrections.ptqd.bitops`` (Σ MACs × b_w × b_a; floating point counts 32 × 32): the
quantized GEMMs at the recipe's bits, plus the branch's MACs r·(K + O) per output position in floating point
(reported at 32 × 32, the counter's convention, and at 16 × 16, the BF16 branch SVDQuant deploys). Scale
computation, rescaling of partial sums, smoothing and online Hadamard transforms are element operations, not
MACs of a GEMM; they are reported beside the bit-operations, not folded into them.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor, nn

from tadq.corrections.ptqd.bitops import FP_BITS, bit_operations, dummy_conditioning
from tadq.denoiser import QuantizedDenoiser
from tadq.quant.granularity import granularity_overhead, kernel_status
from tadq.quant.lowrank import lowrank_macs
from tadq.quant.modules import QuantLayer, QuantLinear
from tadq.quant.rotation import rotation_ops
from tadq.quant.transformed import TransformedQuantLayer

__all__ = ["layer_costs", "cost_summary"]


@torch.no_grad()
def _output_positions(qmodel: QuantizedDenoiser) -> dict[str, int]:
    """Output positions per sample (tokens, or pixels of the output map) of every quantized layer, one forward."""
    positions: dict[str, int] = {}
    handles = []
    for name, module in qmodel.model.named_modules():
        if isinstance(module, QuantLayer):
            def hook(m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor, name: str = name) -> None:
                positions[name] = positions.get(name, 0) + output.numel() // output.shape[0] // m.weight.shape[0]
            handles.append(module.register_forward_hook(hook))
    try:
        device = next(qmodel.model.parameters()).device
        x = torch.zeros((1, *qmodel.sample_shape), device=device)
        cond = dummy_conditioning(qmodel.adapter, qmodel.model)  # a conditional model needs one to run
        with qmodel.at_first_step():
            qmodel(x, torch.full((1,), 500, dtype=torch.long, device=device), cond)
    finally:
        for handle in handles:
            handle.remove()
    return positions


def layer_costs(qmodel: QuantizedDenoiser) -> dict[str, dict[str, object]]:
    """Per quantized layer: MACs, branch MACs, FP overhead operations and kernel status (one forward, batch 1)."""
    positions = _output_positions(qmodel)
    costs: dict[str, dict[str, object]] = {}
    for name, layer in qmodel.model.named_modules():
        if not isinstance(layer, QuantLayer) or name not in positions:
            continue
        out_features, in_channels = layer.weight.shape[0], layer.weight.shape[1]
        reduction = int(layer.weight[0].numel())
        linear = isinstance(layer, QuantLinear)
        kernel = (1, 1) if linear else tuple(layer.weight.shape[2:])
        scheme = layer.input_quantizer.scheme
        count = positions[name]
        rank = layer.rank if isinstance(layer, TransformedQuantLayer) else 0
        overhead = granularity_overhead(scheme, reduction, in_channels, out_features)
        rotate = isinstance(layer, TransformedQuantLayer) and layer.rotate
        smooth = isinstance(layer, TransformedQuantLayer) and layer.smooth is not None
        status = kernel_status(scheme, kernel_size=kernel, in_channels=in_channels, linear=linear)
        costs[name] = {
            "macs": count * reduction * out_features, "branch_macs": count * lowrank_macs(rank, reduction,
                                                                                          out_features),
            "rank": rank, "kernel": list(kernel), "in_channels": in_channels, "out_features": out_features,
            # element operations on the input map are per input pixel; the layer's stride makes them ≤ this bound
            "scale_ops": count * overhead["scale_ops"], "rescale_macs": count * overhead["rescale_macs"],
            "transform_ops": count * ((rotation_ops(in_channels) if rotate else 0) + (in_channels if smooth else 0)),
            **{f"kernel_{k}": v for k, v in status.to_json().items()},
        }
    return costs


def cost_summary(qmodel: QuantizedDenoiser, steps: int = 1) -> dict[str, object]:
    """Totals per sample over ``steps`` denoiser forwards: bit-operations (GEMMs at the recipe's bits, branch in
    floating point), overhead element operations, and how many layers each kernel class can run."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:  # 0 or -3 reported zero/negative costs
        raise ValueError(f"steps must be an integer >= 1 (denoiser forwards per sample), got {steps!r}")
    costs = layer_costs(qmodel)
    main = bit_operations(qmodel)
    branch = sum(int(c["branch_macs"]) for c in costs.values())
    kernels = Counter(str(c["kernel_runnable"]) for c in costs.values())
    return {
        "bitops": steps * (main + branch * FP_BITS * FP_BITS),
        "bitops_branch_bf16": steps * (main + branch * 16 * 16),
        "bitops_quantized_gemms": steps * main,
        "macs": steps * sum(int(c["macs"]) for c in costs.values()),
        "branch_macs": steps * branch,
        "scale_ops": steps * sum(int(c["scale_ops"]) for c in costs.values()),
        "rescale_macs": steps * sum(int(c["rescale_macs"]) for c in costs.values()),
        "transform_ops": steps * sum(int(c["transform_ops"]) for c in costs.values()),
        "kernel_layers": dict(sorted(kernels.items())),
    }
