"""The converted model's class, apart from the backend registry so that backends (``compiled``) can subclass it
without importing the registry that selects them."""

from __future__ import annotations

from pathlib import Path

import torch

from tadq.backends.placement import refuse_placement
from tadq.denoiser import QuantizedDenoiser

__all__ = ["IntegerDenoiser"]


class IntegerDenoiser(QuantizedDenoiser):
    """A ``QuantizedDenoiser`` whose quantized layers run integer kernels (same call, hooks and corrections).

    Made by ``to_backend`` by re-classing the converted object, so it keeps every attribute and method of the
    ``QuantizedDenoiser`` it came from.

    Attributes:
        backend: the backend name.
        layers: {"integer": {layer: kernel class}, "float": {module: why it stays in float}}.
        device_type: the device type its kernels run on (``None``: any).
    """

    backend: str
    layers: dict[str, dict[str, str]]
    device_type: str | None

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()`` and the like, refused before anything moves when the backend's kernels
        cannot follow (``refuse_placement``): the conversion is tried on a float32 probe to see where it leads."""
        probe = fn(torch.zeros((), dtype=torch.float32, device=self._device()))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            refuse_placement(self.backend, self.device_type, True, probe.device, probe.dtype)
        return super()._apply(fn, recurse)

    def _device(self) -> torch.device:
        first = next(self.parameters(), None)
        return torch.device("cpu") if first is None else first.device

    def save_pretrained(self, directory: str | Path, scheduler=None, *, overwrite: bool = False):
        raise TypeError("an integer-backend model holds prepacked kernels, not the artefact's tensors: save the "
                        "'fake' model (tadq.quantize / tadq.load) and convert after loading")
