"""Where an integer backend's model may run: its kernels' device type, and float32 around them.

A leaf module (it imports nothing from tadq), so both the backend registry and the converted model's class can ask
it without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["refuse_placement"]


def refuse_placement(name: str, device_type: str | None, integer: bool, device: torch.device,
                     dtype: torch.dtype) -> None:
    """Raise ``ValueError`` when backend ``name`` (kernels on ``device_type`` only, ``None``: any; ``integer``: int8
    kernels with float32 around them) cannot run on ``device`` in ``dtype``; the message says what to use."""
    if device_type is not None and device.type != device_type:
        other = {"cuda": " or backend 'int8-cuda'", "cpu": " or backend 'int8'"}.get(device.type, "")
        raise ValueError(f"backend {name!r} runs on {device_type} devices only, not on {device}; choose device "
                         f"{device_type!r}{other}")
    if integer and dtype != torch.float32:
        raise ValueError(f"backend {name!r} computes in float32 around its int8 kernels (the calibrated arithmetic); "
                         f"dtype {dtype} would change every result: use float32, or backend 'fake' for a "
                         f"{dtype} simulation")
