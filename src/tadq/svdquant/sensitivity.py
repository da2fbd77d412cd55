"""Sensitivity-based mixed precision: the layers whose quantization hurts the final image most stay at 8 bits, under
a bit-operations budget (issue 16, docs/methods/svdquant.md#sensitivity-based-mixed-precision).

1. **Sensitivity** of layer l: sample from fixed noise with *only* l's quantizers active (every other layer at
   floating point) and take the final-image MSE (images clamped to [-1, 1], as PSNR is computed) against the same
   network with every quantizer bypassed (the FP run from the same noise; for SVDQuant's transformed layers
   bypassing is the FP function up to float rounding).
   This is l's contribution to the final error alone, propagated through the whole sampler; interactions between
   layers are ignored. One sampling run per quantized layer, so it is measured on a few samples.
2. **Choice** under a budget B on the bit-operations of one forward (Σ MACs × b_w × b_a over every Conv2d/Linear,
   floating-point layers 32 × 32: ``tadq.corrections.ptqd.bitops``): start from every layer at the base's bits and
   raise layers to 8 bits greedily, highest sensitivity per added bit-operation first, skipping a layer that would
   cross B. The branch of SVDQuant layers is the same in every plan and not part of B.
3. **Apply** (in place): the chosen layers' weight quantizers re-estimate their range at 8 bits from the current
   weight (SVDQuant's residual); their activation quantizers switch to 8 bits (dynamic schemes) or keep the
   calibrated clipping range on an 8-bit grid (static schemes).

Only networks without learned rounding (``naive``, ``svdquant``) and without corrections can be raised; fit the
corrections after. The choice is part of the network's config: ``apply_mixed_precision`` records the raised layers
in ``QuantConfig.layer_bits`` (and in the recipe, its layer plans and quantization map), so ``save_pretrained``
writes it and ``tadq.load`` rebuilds those layers at 8 bits with the saved ranges: the same outputs bit for bit.
Quantizing from scratch with that config (``mixed_precision_config``) is a different network of the same bits:
the raised layers' ranges (and SVDQuant's smoothing) are then calibrated at 8 bits instead of carried over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tadq.config import QuantConfig
from tadq.corrections.ptqd.bitops import FP_BITS, dummy_conditioning, layer_macs
from tadq.denoiser import QuantizedDenoiser
from tadq.quant.convert import LayerPlan
from tadq.quant.modules import QuantLayer
from tadq.quant.qscheme import MAX_BITS, MIN_BITS
from tadq.quant.quantizer import Quantizer, bypassing, quantizers_bypassed
from tadq.safefiles import finite_float
from tadq.sampling import ConditionSource, SamplerConfig, SamplingPlan
from tadq.sampling import sample as sample_loop

__all__ = ["HIGH_BITS", "LayerSensitivity", "MixedPrecisionPlan", "apply_mixed_precision", "choose_high_precision",
           "layer_bits", "layer_sensitivities", "mixed_precision_config", "network_macs", "plan_bitops"]

HIGH_BITS = 8
RAISABLE_METHODS = ("naive", "svdquant")


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer: MACs of one forward per sample, and the final-image MSE vs FP with only this layer quantized."""

    name: str
    macs: int
    error: float


@dataclass(frozen=True)
class MixedPrecisionPlan:
    """The layers raised to ``high_bits`` and what the plan costs (bit-operations of one forward per sample)."""

    high_layers: tuple[str, ...]
    budget_bitops: int
    bitops: int
    base_bitops: int
    all_high_bitops: int
    sensitivities: tuple[LayerSensitivity, ...]
    high_bits: int = HIGH_BITS

    def to_json(self) -> dict[str, object]:
        return {"high_layers": list(self.high_layers), "high_bits": self.high_bits,
                "budget_bitops": self.budget_bitops, "bitops": self.bitops, "base_bitops": self.base_bitops,
                "all_high_bitops": self.all_high_bitops,
                "sensitivities": [dataclasses.asdict(s) for s in self.sensitivities]}


def _quantized_layers(qmodel: QuantizedDenoiser) -> dict[str, QuantLayer]:
    if qmodel.config.split_shortcut:  # a split layer has two weight and two input quantizers, not one of each
        raise ValueError("mixed precision measures and raises layers with one weight and one input quantizer; "
                         "quantize without split_shortcut")
    return {name: m for name, m in qmodel.model.named_modules()
            if isinstance(m, QuantLayer) and m.weight_quantizer.enabled}


def layer_bits(qmodel: QuantizedDenoiser) -> dict[str, tuple[int, int]]:
    """(b_w, b_a) of every Conv2d/Linear of the network as its quantizers stand (32 for floating point)."""
    bits: dict[str, tuple[int, int]] = {}
    for name, module in qmodel.model.named_modules():
        if isinstance(module, QuantLayer):
            weight, activation = module.weight_quantizer.scheme, module.input_quantizer.scheme
            bits[name] = (weight.bits or FP_BITS, activation.bits or FP_BITS)
    return bits


def network_macs(qmodel: QuantizedDenoiser) -> dict[str, int]:
    """MACs per sample of one forward of every Conv2d/Linear of the network (``tadq.corrections.ptqd.bitops``); a
    conditional network is called with a placeholder conditioning, as ``bit_operations`` does (without one its first
    forward refused the call)."""
    cond = dummy_conditioning(qmodel.adapter, qmodel.model)
    return layer_macs(qmodel.model, lambda x, t: qmodel(x, t, cond), qmodel.sample_shape)


def plan_bitops(macs: dict[str, int], bits: dict[str, tuple[int, int]], high: Sequence[str] = (),
                high_bits: int = HIGH_BITS) -> int:
    """Bit-operations of one forward with the layers ``high`` at ``high_bits`` (activations only where quantized)."""
    total = 0
    raised = set(high)
    for name, count in macs.items():
        b_w, b_a = bits.get(name, (FP_BITS, FP_BITS))
        if name in raised:
            b_w, b_a = high_bits, (high_bits if b_a < FP_BITS else b_a)
        total += count * b_w * b_a
    return total


@contextlib.contextmanager
def _only_quantized(qmodel: QuantizedDenoiser, layer: QuantLayer) -> Iterator[None]:
    """Every quantizer outside ``layer`` bypassed for the block; restored on exit."""
    own = {id(q) for q in layer.modules() if isinstance(q, Quantizer)}
    with bypassing([q for q in qmodel.model.modules() if isinstance(q, Quantizer) and id(q) not in own]):
        yield


@torch.no_grad()
def layer_sensitivities(qmodel: QuantizedDenoiser, scheduler, sampler: SamplerConfig, *, num_samples: int = 16,
                        seed: int = 0, batch_size: int = 16, layers: Sequence[str] | None = None,
                        guidance_scale: float = 1.0, conditions: ConditionSource | None = None,
                        ) -> list[LayerSensitivity]:
    """Final-image MSE vs FP of each quantized layer alone (module docstring), most sensitive first.

    ``seed`` should be a calibration seed (not the evaluation seed the plan is later judged on); ``layers``
    restricts the measurement (default: every quantized layer). ``conditions``: the per-sample conditioning of a
    conditional model (class labels, prompts; calibration ones, with an unconditional branch when
    ``guidance_scale`` ≠ 1), as ``tadq.quantize`` takes them.
    """
    from tadq.api import check_conditions

    if len(qmodel.corrections):
        raise ValueError("measure sensitivities on the network without corrections (they are fitted on top after)")
    # a conditional model without conditions (or guidance without an unconditional branch) was refused only by its
    # first forward, and could not be measured at all: there was no way to pass them
    check_conditions(qmodel.model, conditions, guidance_scale, "layer_sensitivities")
    plan = SamplingPlan.build(scheduler, sampler, guidance_scale)
    parameter = next(qmodel.model.parameters())
    # the layers are checked before the reference run: a misspelt name used to fail after a whole sampling run
    candidates = _quantized_layers(qmodel)
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    names = list(candidates) if layers is None else list(layers)
    unknown = [name for name in names if name not in candidates]
    if unknown:
        raise ValueError(f"not quantized layers of this model: {unknown}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"each layer is measured once; named more than once: {repeated}")

    def run() -> Tensor:
        return sample_loop(qmodel, plan, num_samples=num_samples, seed=seed, sample_shape=qmodel.sample_shape,
                           batch_size=batch_size, conditions=conditions, progress=False, device=parameter.device,
                           dtype=parameter.dtype).images.float().clamp(-1, 1)

    with quantizers_bypassed(qmodel.model):
        reference = run()
    macs = network_macs(qmodel)
    results = []
    for name in names:
        with _only_quantized(qmodel, candidates[name]):
            error = float((run() - reference).pow(2).mean())
        results.append(LayerSensitivity(name, macs.get(name, 0), error))
    return sorted(results, key=lambda s: -s.error)


def choose_high_precision(qmodel: QuantizedDenoiser, sensitivities: Sequence[LayerSensitivity], budget_bitops: int,
                          high_bits: int = HIGH_BITS) -> MixedPrecisionPlan:
    """The layers to raise to ``high_bits`` within ``budget_bitops`` per forward (greedy, module docstring).

    ``ValueError`` when the budget is below the base's own bit-operations (nothing can be raised, and the base
    itself does not fit), is not a finite number, or when ``high_bits`` or the sensitivities cannot make a plan
    (a layer named twice, or a name that is not a quantized layer of ``qmodel``). A layer already at
    ``high_bits`` or above is never listed: raising it would add no precision (or lower it).
    """
    if isinstance(high_bits, bool) or not isinstance(high_bits, int) or not MIN_BITS <= high_bits <= MAX_BITS:
        raise ValueError(f"high_bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {high_bits!r}")
    if not finite_float(budget_bitops):  # NaN passed every comparison and inf failed in int() after the greedy loop
        raise ValueError(f"budget_bitops must be a finite number of bit-operations per forward, got {budget_bitops!r}")
    names = [item.name for item in sensitivities]
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise ValueError(f"each layer's sensitivity must be given once; named more than once: {repeated}")
    quantized = _quantized_layers(qmodel)
    unknown = [name for name in names if name not in quantized]
    if unknown:
        raise ValueError(f"sensitivities of layers that are not quantized layers of this model: {unknown}")
    undefined = [item.name for item in sensitivities if math.isnan(item.error) or item.error < 0]
    if undefined:  # a NaN ranks neither above nor below anything: the greedy order would be arbitrary
        raise ValueError(f"sensitivities must be final-image MSEs >= 0; NaN or negative for {undefined} (a layer "
                         "whose samples diverge when quantized alone: measure it again, or keep it in floating point)")
    macs, bits = network_macs(qmodel), layer_bits(qmodel)
    base = plan_bitops(macs, bits)
    if budget_bitops < base:
        raise ValueError(f"budget {budget_bitops:.4g} bit-operations per forward is below the base's own {base:.4g}")
    chosen: list[str] = []
    used = base

    def raises(name: str) -> bool:
        """Whether ``high_bits`` adds precision to the layer (its weights, or its quantized activations)."""
        b_w, b_a = bits[name]
        return b_w < high_bits or (b_a < FP_BITS and b_a < high_bits)

    def density(item: LayerSensitivity) -> float:
        extra = plan_bitops(macs, bits, [item.name], high_bits) - base
        return item.error / extra if extra > 0 else float("inf")

    for item in sorted(sensitivities, key=density, reverse=True):
        if item.error <= 0 or not raises(item.name):
            continue
        cost = plan_bitops(macs, bits, [*chosen, item.name], high_bits)
        if cost <= budget_bitops:
            chosen.append(item.name)
            used = cost
    all_high = plan_bitops(macs, bits, [s.name for s in sensitivities], high_bits)
    return MixedPrecisionPlan(tuple(chosen), int(budget_bitops), int(used), int(base), int(all_high),
                              tuple(sensitivities), high_bits)


@torch.no_grad()
def _raise_quantizer(quantizer: Quantizer, bits: int) -> None:
    """An activation quantizer at ``bits``: dynamic schemes just change grid; a static one keeps its clipping range."""
    scheme = quantizer.scheme
    if not scheme.enabled or scheme.bits == bits:
        return
    if scheme.dynamic or not bool(quantizer.initialized):
        quantizer.scheme = dataclasses.replace(scheme, bits=bits)
        return
    low = (scheme.qmin - quantizer.zero_point) * quantizer.scale
    high = (scheme.qmax - quantizer.zero_point) * quantizer.scale
    quantizer.scheme = dataclasses.replace(scheme, bits=bits)
    quantizer.set_range(low, high)


def mixed_precision_config(config: QuantConfig, plan: MixedPrecisionPlan) -> QuantConfig:
    """``config`` with the plan's layers at ``plan.high_bits`` in ``layer_bits`` (earlier overrides of other
    layers kept): what a raised network is, for saving it or quantizing it again from scratch."""
    activation_bits = plan.high_bits if config.activations.enabled else None
    overrides = {name: (weight, activation) for name, weight, activation in config.layer_bits}
    overrides |= {name: (plan.high_bits, activation_bits) for name in plan.high_layers}
    return dataclasses.replace(config, layer_bits=tuple((name, *bits) for name, bits in overrides.items()))


def _raised_plan(layer_plan: LayerPlan, bits: int) -> LayerPlan:
    """The layer's plan at ``bits``, as ``plan_layers`` makes it from ``layer_bits`` (a disabled activation stays
    off), so the saved quantization map is the one loading rebuilds."""
    activations = layer_plan.activations
    if activations.enabled:
        activations = dataclasses.replace(activations, bits=bits)
    return dataclasses.replace(layer_plan, weights=dataclasses.replace(layer_plan.weights, bits=bits),
                               activations=activations)


def apply_mixed_precision(qmodel: QuantizedDenoiser, plan: MixedPrecisionPlan) -> QuantizedDenoiser:
    """Raise the plan's layers to its bits, in place (module docstring); returns ``qmodel``.

    The choice becomes part of the model: ``qmodel.config.layer_bits`` (and ``qmodel.recipe``, ``qmodel.plans``)
    name the raised layers, so saving writes it and loading rebuilds it; ``qmodel.mixed_precision`` keeps the plan's
    report (budget, sensitivities).
    """
    if qmodel.config.method not in RAISABLE_METHODS:
        raise ValueError(f"mixed precision raises naive or SVDQuant networks (ranges re-estimated from the weight); "
                         f"this one is {qmodel.config.method!r}, whose weights were fitted to their grid")
    if len(qmodel.corrections):
        raise ValueError("raise layers before fitting corrections (their tables depend on the network)")
    layers = _quantized_layers(qmodel)
    unknown = [name for name in plan.high_layers if name not in layers]
    if unknown:
        raise ValueError(f"the plan raises layers that are not quantized layers of this model: {unknown}")
    config = mixed_precision_config(qmodel.config, plan)  # validates the bits before anything changes
    for name in plan.high_layers:
        layer = layers[name]
        layer.weight_quantizer.scheme = dataclasses.replace(layer.weight_quantizer.scheme, bits=plan.high_bits)
        layer.init_weight_range()
        _raise_quantizer(layer.input_quantizer, plan.high_bits)
    raised = set(plan.high_layers)
    qmodel.plans = [_raised_plan(p, plan.high_bits) if p.name in raised else p for p in qmodel.plans]
    qmodel.config = config
    recipe = getattr(qmodel, "recipe", None)
    if recipe is not None:
        qmodel.recipe = dataclasses.replace(recipe, layer_bits=config.layer_bits)
    qmodel.mixed_precision = plan.to_json()
    return qmodel
