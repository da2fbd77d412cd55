"""The converted model's class, apart from the backend registry so that backends (``compiled``) can subclass it
without importing the registry that selects them."""

from __future__ import annotations

from pathlib import Path

from tadq.denoiser import QuantizedDenoiser

__all__ = ["IntegerDenoiser"]


class IntegerDenoiser(QuantizedDenoiser):
    """A ``QuantizedDenoiser`` whose quantized layers run integer kernels (same call, hooks and corrections).

    Made by ``to_backend`` by re-classing the converted object, so it keeps every attribute and method of the
    ``QuantizedDenoiser`` it came from.

    Attributes:
        backend: the backend name.
        layers: {"integer": {layer: kernel class}, "float": {module: why it stays in float}}.
    """

    backend: str
    layers: dict[str, dict[str, str]]

    def save_pretrained(self, directory: str | Path, scheduler=None, *, overwrite: bool = False):
        raise TypeError("an integer-backend model holds prepacked kernels, not the artefact's tensors: save the "
                        "'fake' model (tadq.quantize / tadq.load) and convert after loading")
