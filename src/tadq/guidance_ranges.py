"""Separate activation ranges for the unconditional branch of classifier-free guidance.

Under guidance the network sees every input twice: with the prompt (or label) and with the empty prompt (or null
label). The two branches can have quite different activations — measured on the shipped text-to-image model, the
input of a cross-attention output projection spans 2.6× more with the prompt than without
(docs/pipelines.md#guidance-aware-quantization) — so one shared static range wastes grid levels on one of them.
With ``QuantConfig.branch_ranges`` the main ranges are calibrated on the conditional rows and a second set, held
here, on the unconditional rows; a guided call runs each branch's rows with its own ranges. The cost at inference
is nothing but swapping one scale and zero point per quantizer between the two halves of the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from tadq.calibration.observers import activation_quantizers
from tadq.quant.quantizer import Quantizer

__all__ = ["BranchRanges", "branch_quantizers"]


def branch_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """The activation quantizers that get a second range: enabled, static and one range per tensor (exactly the
    ones a ``Calibrate`` pass sets; dynamic ones measure every tensor anyway)."""
    return {name: q for name, q in activation_quantizers(model).items()
            if type(q) is Quantizer and not q.scheme.dynamic and q.scale.numel() == 1}


class BranchRanges(nn.Module):
    """(Δ, z) of every branch quantizer for the unconditional rows, in one pair of flat buffers (saved with the
    model's state, so an artefact carries them and loading rebuilds them from the config alone).

    Args:
        names: qualified names of the quantizers (``branch_quantizers(model)``), in model order.
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.register_buffer("scale", torch.ones(len(self.names)))
        self.register_buffer("zero_point", torch.zeros(len(self.names)))

    @classmethod
    def for_model(cls, model: nn.Module) -> BranchRanges:
        return cls(list(branch_quantizers(model)))

    def _quantizers(self, model: nn.Module) -> list[Quantizer]:
        found = branch_quantizers(model)
        missing = [name for name in self.names if name not in found]
        if missing:
            raise ValueError(f"branch ranges were recorded for quantizers this model does not have as static "
                             f"per-tensor quantizers, e.g. {missing[:3]} (TFMQ's per-step quantizers have no second "
                             "range: branch_ranges does not combine with TFMQ-DM)")
        return [found[name] for name in self.names]

    @torch.no_grad()
    def record(self, model: nn.Module) -> None:
        """Take the model's current ranges as the unconditional branch's (after calibrating on those rows)."""
        for index, quantizer in enumerate(self._quantizers(model)):
            self.scale[index] = quantizer.scale.reshape(())
            self.zero_point[index] = quantizer.zero_point.reshape(())

    @torch.no_grad()
    def rescale(self, model: nn.Module, before: Mapping[str, Tensor]) -> None:
        """Follow a change of the main ranges (Q-Diffusion's learned activation steps): each unconditional Δ is
        multiplied by the ratio its quantizer's main Δ moved by; zero points are kept ([RECON])."""
        for index, (name, quantizer) in enumerate(zip(self.names, self._quantizers(model), strict=True)):
            self.scale[index] *= float(quantizer.scale.reshape(())) / float(before[name].reshape(()))

    @staticmethod
    def main_scales(model: nn.Module) -> dict[str, Tensor]:
        """Snapshot of the main Δ of every branch quantizer (for ``rescale``)."""
        return {name: q.scale.detach().clone() for name, q in branch_quantizers(model).items()}

    @contextmanager
    def active(self, model: nn.Module) -> Iterator[None]:
        """Within the block every branch quantizer quantizes with the unconditional ranges; restored on exit.
        Copied device-side (``fill_(float(...))`` read every value back to the host: a device sync per quantizer
        and call); the same values, as a float32 value converts to any dtype as its float does."""
        quantizers = self._quantizers(model)
        saved = [(q.scale.detach().clone(), q.zero_point.detach().clone()) for q in quantizers]
        with torch.no_grad():
            for quantizer, scale, zero_point in zip(quantizers, self.scale.unbind(), self.zero_point.unbind(),
                                                    strict=True):
                quantizer.scale.copy_(scale)
                quantizer.zero_point.copy_(zero_point)
        try:
            yield
        finally:
            with torch.no_grad():
                for quantizer, (scale, zero_point) in zip(quantizers, saved, strict=True):
                    quantizer.scale.copy_(scale)
                    quantizer.zero_point.copy_(zero_point)
