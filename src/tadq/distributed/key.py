"""What a chunk of samples is a function of: its run key, stored in the manifest and inside every chunk file.

A resumed run may only reuse chunks computed with the same model, scheduler, sampler, seed, sample shape and
batching (batch composition can change float results in the last bits), so these are hashed or stored into a
plain dict that is compared field by field before any chunk is skipped. Chunks of another configuration then
raise instead of being silently mixed into the output.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tadq.sampling import DEFAULTED_KEYS, SamplerConfig, scheduler_config_key
from tadq.utils import public_config

__all__ = ["KEY_VERSION", "conditioning_key", "key_differences", "model_fingerprint", "run_key",
           "scheduler_fingerprint"]

# 2: the model fingerprint holds each diffusers/transformers module's public config (version 1 missed settings
# its forward reads from the config alone, e.g. a UNet's ``center_input_sample``)
KEY_VERSION = 2
_SCALARS = (bool, int, float, str, type(None))


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def _plain_attributes(module: nn.Module) -> dict[str, Any]:
    """Public scalar attributes and registered tadq configs of one module (e.g. a mixed-precision switch step)."""
    from tadq.config import config_to_dict

    found: dict[str, Any] = {}
    for name, value in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, _SCALARS):
            found[name] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(item, _SCALARS) for item in value):
            found[name] = list(value)
        else:
            try:
                found[name] = config_to_dict(value)
            except TypeError:
                continue  # not a registered config (tensors, adapters, reports): the state_dict covers the numbers
    return found


def model_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a denoiser's tensors (names, dtypes, shapes, bytes), module classes and plain settings.

    Tensors alone miss settings such as bit-widths or a mixed-precision switch that live in Python attributes, so
    each submodule's class, scalar attributes, tadq configs and diffusers/transformers config are hashed too.
    Computed on the CPU copy, so it does not depend on the device.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(_tensor_bytes(value))
        else:
            digest.update(repr(value).encode())
    for name, submodule in module.named_modules():
        description = {"class": f"{type(submodule).__module__}.{type(submodule).__qualname__}",
                       "attributes": _plain_attributes(submodule)}
        config = public_config(submodule)
        if config:  # absent for plain modules (their descriptions are as before)
            description["config"] = config
        digest.update(name.encode())
        digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def scheduler_fingerprint(scheduler: Any) -> str:
    """SHA-256 of a diffusers scheduler's public config (betas, prediction type, clipping, ...) and of the keys it
    left at its class defaults (``DEFAULTED_KEYS``, sorted; absent when there are none, as for a loaded folder whose
    config names every key), which decide the sampler another class builds from it."""
    config = {key: value for key, value in scheduler_config_key(scheduler.config).items()
              if not key.startswith("_") or (key == DEFAULTED_KEYS and value)}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sampler_fields(sampler: SamplerConfig) -> dict[str, Any]:
    """The sampler as a run key holds it (all fields, ``clip_sample`` included)."""
    return {"kind": sampler.kind, "num_steps": sampler.num_steps, "eta": sampler.eta,
            "clip_sample": sampler.clip_sample,
            # dpmsolver++'s order, flow-euler's shift and grid; absent (None) keeps every older run's key
            **{name: getattr(sampler, name) for name in ("order", "shift", "flow_sigmas")
               if getattr(sampler, name) is not None}}


def conditioning_key(conditions: Any, guidance_scale: float) -> dict[str, Any] | None:
    """The run key's ``conditioning`` entry: the conditions' ``key`` and the guidance scale, or ``None`` (no entry)
    for an unconditional, unguided run, so their keys and resumes hold. ``conditions`` is a ``ConditionSource`` or
    ``None``; ``guidance_scale`` as ``SamplingPlan`` checked it."""
    if conditions is None and guidance_scale == 1.0:
        return None
    return {"conditions": None if conditions is None else conditions.key, "guidance_scale": guidance_scale}


def run_key(
    model: str, scheduler: str, sampler: SamplerConfig, *, seed: int, sample_shape: tuple[int, int, int],
    batch_size: int, chunk_size: int, record_trajectory: bool, device_type: str,
) -> dict[str, Any]:
    """The fields two runs must share for their chunks to be interchangeable (JSON- and ``weights_only``-safe).

    Args:
        model: ``model_fingerprint`` of the denoiser.
        scheduler: ``scheduler_fingerprint`` of its training scheduler.
        sampler: The deployment sampler (all fields, ``clip_sample`` included).
        seed: Run seed.
        sample_shape: Per-sample shape (C, H, W).
        batch_size: Samples per denoiser call inside a chunk (already capped at ``chunk_size``).
        chunk_size: Samples per chunk file.
        record_trajectory: Whether chunks hold every state of the trajectory.
        device_type: ``"cpu"`` or ``"cuda"``: kernels differ, so the last bits of the samples do too.
    """
    return {
        "key_version": KEY_VERSION,
        "model_fingerprint": model,
        "scheduler_fingerprint": scheduler,
        "sampler": sampler_fields(sampler),
        "seed": int(seed),
        "sample_shape": [int(d) for d in sample_shape],
        "batch_size": int(batch_size),
        "chunk_size": int(chunk_size),
        "record_trajectory": bool(record_trajectory),
        "device_type": str(device_type),
    }


def key_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """``"field: found X, expected Y"`` for every field that differs (empty when the keys match)."""
    fields = sorted(set(expected) | set(found))
    return [f"{name}: found {found.get(name)!r}, this run has {expected.get(name)!r}"
            for name in fields if expected.get(name) != found.get(name)]
