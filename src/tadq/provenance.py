"""Is this FP model the one a quantized model was made from? Paired metrics (PSNR vs FP, trajectory error) and
corrections fitted against an FP reference mean nothing against another model, so evaluation, analysis and
``tadq.quantize(base=...)`` check it first. A leaf module (no sampling, no metrics), so every layer can ask."""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from tadq.utils import public_config

__all__ = ["check_same_architecture", "check_same_weights", "KEPT_PARAMETER_RTOL", "QUANTIZED_WEIGHT_RTOL"]


def _public_config(model: nn.Module) -> dict | None:
    """``public_config`` of the denoiser (a ``QuantizedDenoiser`` wraps its model) as JSON reads it back, or ``None``
    for a model without a config (nothing to compare)."""
    model = getattr(model, "model", model)
    if getattr(model, "config", None) is None:
        return None
    return json.loads(json.dumps(public_config(model), default=str))


def check_same_architecture(candidate: nn.Module, reference: nn.Module) -> None:
    """Raise unless both models have the same diffusers config and the same trained weights
    (``check_same_weights``): paired metrics against another model mean nothing."""
    mine, theirs = _public_config(candidate), _public_config(reference)
    if mine is not None and theirs is not None:
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differing:
            raise ValueError(f"the reference model's config differs from the quantized model's at {differing[:5]}; "
                             "pass the FP model it was quantized from")
    check_same_weights(candidate, reference)


# Tensors tadq keeps as they are (biases, norms, embeddings, layers left in floating point) are the FP model's own
# values, at most cast to another float type (bfloat16 moves a value by 2^-8 relative); 1 % leaves room for that.
KEPT_PARAMETER_RTOL = 1e-2
# A quantized weight differs from its FP weight by the rounding error: about 0.6 of its norm for a 2-bit min/max grid
# (step 2σ over ±3σ, error σ/√3), far less for more bits, and at most about 1 when a coarse grid rounds everything to
# zero. Another training's independent weight differs by about √2 ≈ 1.41; 1.2 lies between.
QUANTIZED_WEIGHT_RTOL = 1.2


def _relative_difference(mine: Tensor, theirs: Tensor) -> float:
    """‖mine − theirs‖ / ‖theirs‖ on ``mine``'s device in float32 (the tolerances are percent-scale; nothing of a
    large model is copied to the host)."""
    with torch.no_grad():
        mine, theirs = mine.detach().float(), theirs.detach().to(mine.device).float()
        scale = float(torch.linalg.vector_norm(theirs))
        difference = float(torch.linalg.vector_norm(mine - theirs))
    return difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))


def check_same_weights(candidate: nn.Module, reference: nn.Module) -> None:
    """Raise unless the reference holds the weights ``candidate`` was quantized from.

    Two trainings of one config pass ``check_same_architecture``'s config test, and the paired metrics then report
    the distance between two different models as quantization error (a W8A8 artefact scored 21 dB against another
    training's weights instead of 49 dB against its own). Every parameter both models hold under the same name and
    shape is compared: kept tensors must match to ``KEPT_PARAMETER_RTOL``, quantized weights to the rounding error
    (``QUANTIZED_WEIGHT_RTOL``); weights folded with a smoothing vector, rotation or low-rank branch are skipped.
    A candidate that is not a ``QuantizedDenoiser`` (two FP models compared) is not checked.
    """
    from tadq.quant.modules import QuantLayer

    if not callable(getattr(candidate, "quantization_map", None)):  # not a QuantizedDenoiser: quantized from nothing
        return
    model = getattr(candidate, "model", candidate)
    reference = getattr(reference, "model", reference)
    if not isinstance(model, nn.Module) or not isinstance(reference, nn.Module) or model is reference:
        return
    quantized, transformed = set(), set()
    for prefix, module in model.named_modules():
        if isinstance(module, QuantLayer):
            name = f"{prefix}.weight" if prefix else "weight"
            is_transformed = (getattr(module, "smooth", None) is not None or getattr(module, "rotate", False)
                              or getattr(module, "rank", 0))
            (transformed if is_transformed else quantized).add(name)
    theirs = dict(reference.named_parameters())
    differing = []
    for name, mine in model.named_parameters():
        other = theirs.get(name)
        if other is None or other.shape != mine.shape or name in transformed:
            continue
        tolerance = QUANTIZED_WEIGHT_RTOL if name in quantized else KEPT_PARAMETER_RTOL
        relative = _relative_difference(mine, other)
        if not relative <= tolerance:
            differing.append((name, relative))
    if differing:
        listed = ", ".join(f"{name} ({relative:.2g} of its norm)" for name, relative in differing[:3])
        raise ValueError(f"the reference model's weights are not the ones the artefact was quantized from: "
                         f"{len(differing)} tensors differ, e.g. {listed}; paired metrics against another training "
                         "would be the distance between two models; pass the FP model it was quantized from")
