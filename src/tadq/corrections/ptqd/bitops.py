"""Bit-operations of one denoiser forward: the cost measure of PTQD's mixed precision (docs/methods/ptqd.md).

    BOPs = Σ_layers MACs_layer × b_w × b_a

over every ``nn.Conv2d`` and ``nn.Linear`` (fake-quant wrappers included), with MACs counted by forward hooks on a
batch of one, so every call of a layer in the forward counts. Layers kept in floating point count 32 × 32, as do
the bits of an "off" scheme. Attention matmuls (q·kᵀ, P·v), norms and activations are not counted: they are a
small share of a UNet's MACs, and the same in every variant compared.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadq.denoiser import QuantizedDenoiser
from tadq.registry import adapter_for

__all__ = ["FP_BITS", "bit_operations", "dummy_conditioning", "layer_macs"]

FP_BITS = 32


@torch.no_grad()
def layer_macs(network: nn.Module, call, sample_shape: tuple[int, int, int], t: int = 500) -> dict[str, int]:
    """MACs per sample of every Conv2d/Linear in ``network`` (qualified name → MACs) for one ``call(x, t)``."""
    macs: dict[str, int] = {}
    handles = []

    def counter(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            per_output = int(module.weight[0].numel())  # Conv2d: C_in/groups·k_h·k_w; Linear: C_in
            macs[name] = macs.get(name, 0) + int(output.numel()) // int(output.shape[0]) * per_output
        return hook

    for name, module in network.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(counter(name)))
    try:
        device = next(network.parameters()).device
        call(torch.zeros((1, *sample_shape), device=device), torch.full((1,), t, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return macs


def dummy_conditioning(adapter, network: nn.Module):
    """One sample's placeholder conditioning for a conditional model (the layer MACs do not depend on its values;
    a text model's are counted at the adapter's placeholder caption length); ``None`` for an unconditional one."""
    if not adapter.conditioning_inputs(network):
        return None
    return adapter.dummy_conditioning(network, 1)


def bit_operations(model: nn.Module, bits_w: int | None = None, bits_a: int | None = None,
                   sample_shape: tuple[int, int, int] | None = None) -> int:
    """Bit-operations of one forward for one sample.

    Args:
        model: A ``QuantizedDenoiser`` (its quantized layers count ``bits_w × bits_a``, its FP layers 32 × 32) or a
            diffusers model (every layer counts ``bits_w × bits_a``).
        bits_w: Weight bits; default the ``QuantizedDenoiser``'s (32 when off). Required for a diffusers model.
        bits_a: Activation bits, likewise.
        sample_shape: (C, H, W); default the model's.

    Returns:
        Σ MACs × b_w × b_a.

    Raises:
        ValueError: ``model`` runs on an integer backend: its layers are prepacked kernels, not ``nn.Conv2d`` /
            ``nn.Linear``, so none would be counted (it returned 0); the count is the fake-quant model's.
    """
    backend = getattr(model, "backend", None)  # an IntegerDenoiser (tadq.backends) names its backend
    if isinstance(model, QuantizedDenoiser) and backend is not None:
        raise ValueError(f"bit_operations counts nn.Conv2d/nn.Linear MACs, and a model on backend {backend!r} runs "
                         "prepacked integer kernels instead: count the fake-quant model it was converted from (the "
                         "same layers, bits and MACs)")
    if isinstance(model, QuantizedDenoiser):
        network, shape = model.model, sample_shape or model.sample_shape
        cond = dummy_conditioning(model.adapter, network)

        def call(x: Tensor, t: Tensor) -> Tensor:
            with model.at_first_step():  # shapes only: a step-aware correction's first step will do
                return model(x, t, cond)

        # each quantized layer at its own plan's bits (QuantConfig.layer_bits may raise some), unless told
        per_layer = {plan.name: (bits_w if bits_w is not None else (plan.weights.bits or FP_BITS),
                                 bits_a if bits_a is not None else (plan.activations.bits or FP_BITS))
                     for plan in model.plans if plan.quantized}
    else:
        if bits_w is None or bits_a is None:
            raise ValueError("pass bits_w and bits_a for a model that is not a QuantizedDenoiser (32, 32 for FP)")
        adapter = adapter_for(model)
        network, shape = model, sample_shape or adapter.sample_shape(model)
        per_layer = {name: (bits_w, bits_a) for name, m in model.named_modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))}

        cond = dummy_conditioning(adapter, model)

        def call(x: Tensor, t: Tensor) -> Tensor:
            return adapter.predict_eps(model, x, t, cond)

    macs = layer_macs(network, call, shape)
    return sum(count * (per_layer[name][0] * per_layer[name][1] if name in per_layer else FP_BITS * FP_BITS)
               for name, count in macs.items())
