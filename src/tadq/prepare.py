"""The structural and calibrate phases of ``quantize``, below ``tadq.api`` so that loading and TFMQ can rebuild
exactly the structure ``quantize`` built without importing the public verbs (no import cycle)."""

from __future__ import annotations

import copy
import dataclasses
import weakref

import torch
from torch import nn

from tadq.calibration import Calibrate, CalibrationSet
from tadq.config import QuantConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.progress import progress_bar
from tadq.quant.attention import apply_attention_quantization, drop_unused_fused_projections
from tadq.quant.convert import convert_layers, plan_layers
from tadq.quant.split import apply_shortcut_split
from tadq.registry import adapter_for
from tadq.safefiles import require_finite

__all__ = ["build_quantized_structure", "calibrate_activations", "check_no_adapter_layers", "check_plain_weights",
           "check_no_runtime_hooks", "check_unshared_weights", "wrap_in_place"]

# float32 networks ``tadq.quantize`` cast from a caller's float16 / bfloat16 model for one call, held by nothing else
_WRAP_IN_PLACE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def wrap_in_place(network: nn.Module) -> nn.Module:
    """Mark ``network``, a copy made for one ``quantize`` call that nobody else holds, to be wrapped in place by the
    next ``build_quantized_structure`` instead of copied: the copy of that copy kept two float32 networks alive
    through calibration and every fit (the FP reference is the caller's model in its own dtype)."""
    _WRAP_IN_PLACE.add(network)
    return network


# what to do about a diffusers hook (diffusers.hooks.HookRegistry, in ``module._diffusers_hook``), by hook name
_HOOK_ADVICE = {
    "layerwise_casting": "enable_layerwise_casting stores the weights in a low-precision dtype and casts them layer "
                         "by layer: load the model without it (tadq runs a model in one dtype, device=/dtype=)",
    "group_offloading": "load the model without enable_group_offload; tadq places the model itself (device=)",
}


def check_plain_weights(model: nn.Module, where: str) -> None:
    """Refuse layers whose weight is recomputed from other tensors at every call (``torch.nn.utils.weight_norm``'s
    pre-hook, ``torch.nn.utils.parametrize``), naming the layer and the call that folds it into a plain weight:
    the legacy form failed deep in ``copy.deepcopy`` and the parametrized one as an unsupported layer class."""
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if any(type(hook).__name__ == "WeightNorm" for hook in module._forward_pre_hooks.values()):
            raise ValueError(f"{where}: layer {label} uses torch.nn.utils.weight_norm; fold it into a plain weight "
                             "with torch.nn.utils.remove_weight_norm(layer) before quantizing")
        if getattr(module, "parametrizations", None) is not None:
            tensors = ", ".join(sorted(module.parametrizations.keys()))
            raise ValueError(f"{where}: layer {label} is parametrized ({tensors}, torch.nn.utils.parametrize); fold "
                             "it into a plain tensor with torch.nn.utils.parametrize.remove_parametrizations(layer, "
                             "name) before quantizing")


def check_unshared_weights(model: nn.Module, where: str) -> None:
    """Refuse a model in which one weight tensor is reachable under several names (the same layer placed twice in
    the module tree, or two layers given one ``Parameter``), naming both. tadq swaps and saves every layer under
    its own name: a layer placed twice was quantized under its first name only and ran in full precision under the
    other, and either kind made ``save_pretrained`` fail inside safetensors ("Some tensors share memory") after
    all the calibration work."""
    seen: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue
        first = seen.setdefault(id(tensor), name)
        if first != name:
            raise ValueError(f"{where}: this {type(model).__name__} shares one tensor between {first} and {name} "
                             "(a layer placed twice, or tied weights); tadq quantizes and saves each layer on its "
                             "own: give each place its own copy first (copy.deepcopy(layer) for a layer used twice, "
                             "layer.weight = nn.Parameter(layer.weight.detach().clone()) for a tied weight)")


def _peft_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The PEFT tuner layers in ``model`` (LoRA and its kin, ``model.add_adapter``/``load_lora_adapter``): modules
    whose class derives from PEFT's ``BaseTunerLayer``, found by name so that the check needs no PEFT install."""
    return [(name, module) for name, module in model.named_modules()
            if any(klass.__name__ == "BaseTunerLayer" and klass.__module__.split(".")[0] == "peft"
                   for klass in type(module).__mro__)]


def check_no_adapter_layers(model: nn.Module, where: str) -> None:
    """Refuse a model carrying PEFT adapter layers (a LoRA loaded and not unloaded), naming the first and what to
    call. A layer with an unmerged LoRA computes base(x) + B(A(x)) from three ``nn.Linear``: each was quantized on
    its own (the LoRA's two matrices with their own activation quantizers), and the artefact, whose model is built
    from the config, had nowhere to load them. A fused LoRA keeps the wrapper and its unused A/B layers: calibration
    failed on their quantizers, which saw no data. After ``fuse_lora()`` and ``unload_lora()`` the model is plain."""
    found = _peft_layers(model)
    if not found:
        return
    name, layer = found[0]
    merged = all(bool(getattr(module, "merged", False)) for _, module in found)
    state = ("fused (merged) into their base layers, but the adapter layers are still in place: drop them with "
             "model.unload_lora() (the fused weights stay)") if merged else (
        "not fused: fuse the LoRA first, model.fuse_lora() (lora_scale= as you sample), then drop the adapter layers "
        "with model.unload_lora() (the fused weights stay; unload_lora() alone removes the LoRA)")
    raise ValueError(f"{where}: this {type(model).__name__} carries {len(found)} PEFT adapter layers (e.g. {name}, a "
                     f"{type(layer).__module__}.{type(layer).__name__}); tadq quantizes and saves plain layers. Its "
                     f"adapters are {state}, before quantizing")


def check_no_runtime_hooks(model: nn.Module, where: str, only: tuple[str, ...] | None = None) -> None:
    """Refuse a model carrying diffusers' runtime hooks (layerwise casting, group offloading, caches) or accelerate's
    (``_hf_hook``: cpu offload, device maps), naming the layer and the hook (``only``: just those diffusers hooks).
    Quantizing one failed inside ``copy.deepcopy`` ("cannot pickle 'module' object"), and a layerwise-cast model
    was refused for its float8 weights with the advice to pass ``dtype=``, which then crashed in a matmul."""
    for name, module in model.named_modules():
        label = name or type(model).__name__
        registry = getattr(module, "_diffusers_hook", None)
        hooks = [hook for hook in getattr(registry, "hooks", None) or {} if only is None or hook in only]
        if hooks:
            advice = next((_HOOK_ADVICE[hook] for hook in hooks if hook in _HOOK_ADVICE),
                          "remove it first (model.disable_cache() for a cache)")
            raise ValueError(f"{where}: layer {label} carries diffusers' {hooks[0]!r} hook; {advice}")
        if only is None and getattr(module, "_hf_hook", None) is not None:
            raise ValueError(f"{where}: layer {label} carries an accelerate hook (cpu offload or a device_map); load "
                             "the model without it (accelerate.hooks.remove_hook_from_module(model, recurse=True)); "
                             "tadq places the model itself (device=)")


@torch.no_grad()
def calibrate_activations(
    qmodel: QuantizedDenoiser, calib: CalibrationSet, batch_size: int = 128, seed: int = 0, progress: bool = True,
) -> None:
    """Set every activation range from the calibration inputs (the explicit calibrate phase).

    With ``config.branch_ranges`` the main ranges come from the conditional rows and the unconditional branch's
    from its own rows (``tadq.guidance_ranges``); otherwise from every row.
    """
    parameter = next(qmodel.model.parameters(), None)
    device = parameter.device if parameter is not None else calib.x.device  # inputs follow the model
    branches = qmodel.branch_ranges
    if branches is None:
        _observe(qmodel, calib, torch.arange(len(calib)), batch_size, seed, device, progress, recalibrate=False)
    else:
        marks = None if calib.cond is None else calib.cond.unconditional_rows
        if marks is None or not bool(marks.any()) or bool(marks.all()):
            raise ValueError("branch_ranges needs calibration data sampled with classifier-free guidance (both "
                             "branches, rows marked): a conditional model, conditions with an unconditional branch "
                             "and guidance_scale != 1 (a calibration cache written before tadq marked the rows "
                             "must be deleted)")
        _observe(qmodel, calib, marks.nonzero().squeeze(1), batch_size, seed, device, progress, recalibrate=True)
        branches.record(qmodel.model)
        _observe(qmodel, calib, (~marks).nonzero().squeeze(1), batch_size, seed, device, progress, recalibrate=True)
    ranges = {name: tensor for name, tensor in qmodel.model.state_dict().items()
              if name.endswith(("quantizer.scale", "quantizer.zero_point"))}
    require_finite(ranges, "activation range after calibration:")  # overflowing activations, not a bad weight


def _observe(qmodel: QuantizedDenoiser, calib: CalibrationSet, rows: torch.Tensor, batch_size: int, seed: int,
             device: torch.device, progress: bool, recalibrate: bool) -> None:
    """One ``Calibrate`` pass over the selected rows of ``calib`` (markers dropped: ranges are set directly)."""
    with Calibrate(qmodel.model, seed=seed, recalibrate=recalibrate), \
            progress_bar(range(0, len(rows), batch_size), desc="calibrate activation ranges", disable=not progress,
                         leave=False) as bar:
        for start in bar:
            chosen = rows[start:start + batch_size]
            cond = None if calib.cond is None else calib.cond.rows(chosen).without_markers().to(device)
            qmodel(calib.x[chosen].to(device), calib.t[chosen].to(device), cond)


def build_quantized_structure(
    model: nn.Module, config: QuantConfig, *, init_weight_range: bool = True, copy_model: bool = True,
) -> QuantizedDenoiser:
    """The structural step of ``quantize``: copy ``model``, plan the layers and swap in fake-quant wrappers.

    No calibration happens here. It is one function so that ``tadq.load`` rebuilds exactly the structure
    ``quantize`` built (every structural feature added here is rebuilt on load without further changes).

    Args:
        model: a diffusers denoiser supported by a registered adapter (left unmodified).
        config: what to quantize and how.
        init_weight_range: set weight ranges from the weights; ``False`` when saved ranges are loaded next.
        copy_model: ``False`` wraps ``model`` itself, for a model built only to be wrapped (``tadq.load``'s, whose
            weights the artefact overwrites): its copy doubled the memory and a fifth of the time of a load. A model
            marked by ``wrap_in_place`` is wrapped itself too (once).
    """
    adapter = adapter_for(model)
    if copy_model and model in _WRAP_IN_PLACE:
        _WRAP_IN_PLACE.discard(model)
        copy_model = False
    check_unshared_weights(model, "build_quantized_structure")  # one name per layer: each is swapped and saved once
    check_no_adapter_layers(model, "build_quantized_structure")  # plain layers only: a LoRA fused and unloaded
    if init_weight_range:  # a NaN weight used to fail late, as a zero_point error that never said NaN
        require_finite(model.state_dict(), "model weight")
    qmodel_inner = (copy.deepcopy(model) if copy_model else model).eval().requires_grad_(False)
    drop_unused_fused_projections(qmodel_inner)  # left by unfuse_qkv_projections(), never called
    plans = plan_layers(adapter.layers(qmodel_inner), config.weights, config.activations,
                        exclude=config.exclude, keep_fp_roles=config.keep_fp_roles, layer_bits=config.layer_bits)
    convert_layers(qmodel_inner, plans, init_weight_range=init_weight_range)
    splits = apply_shortcut_split(qmodel_inner, adapter, config, plans, init_weight_range=init_weight_range)
    plans = [dataclasses.replace(plan, split=splits.get(plan.name)) for plan in plans]
    apply_attention_quantization(qmodel_inner, adapter, config)
    # in eval mode throughout, as the model it copies: the wrappers conversion built and the denoiser itself were
    # nn.Module's default, training (qmodel.training read True, half the quantized layers too)
    return QuantizedDenoiser(qmodel_inner, adapter, config, plans).eval()
