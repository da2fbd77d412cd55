"""Activation-range calibration: the explicit ``Calibrate`` phase.

Inside ``with Calibrate(model):`` every enabled, not-yet-calibrated input quantizer passes values through
unquantized and records them; on a clean exit each one's range is set from what it saw (all of them or, when one is
refused, none). Nothing else
ever writes a range, so a plain forward cannot change calibration state.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tadq.quant.qscheme import QScheme
from tadq.quant.quantizer import Quantizer
from tadq.quant.ranges import estimate_range

__all__ = ["RangeObserver", "Calibrate", "activation_quantizers"]


class RangeObserver:
    """Keeps exact running extremes plus a bounded random subsample, drawn with replacement (percentile/MSE ranges).

    Args:
        scheme: the quantizer's scheme (decides how the range is estimated at the end).
        values_per_batch: values kept from the largest observed tensor (uniform random subset); a smaller one
            (the last, partial calibration batch) keeps a proportional share, so that every input row weighs the
            same whatever the batch size. A fixed count gave a 2-row tail batch as many samples as a full batch of
            128, and its rows dominated the percentile / MSE range. The share is that of the largest tensor seen by
            the end: a small first batch (a user's own ``Calibrate`` loop) is cut down once larger ones follow.
        seed: seeds the subsampling, so calibration is reproducible.
    """

    def __init__(self, scheme: QScheme, values_per_batch: int = 16384, seed: int = 0) -> None:
        self.scheme = scheme
        self.values_per_batch = values_per_batch
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.low: Tensor | None = None
        self.high: Tensor | None = None
        self.samples: list[Tensor] = []
        self._sizes: list[int] = []  # values of each observed tensor, beside its kept sample
        self._reference: int | None = None  # values of the largest tensor observed so far (a full batch)

    def observe(self, x: Tensor) -> None:
        """Record ``x``'s extremes and its share of values. Only those leave ``x``'s device: the whole tensor was
        copied to the CPU first, every layer's full input on every calibration forward of a GPU model, to keep
        16384 values of it (the same values: the draw is on the CPU generator, the indexing where ``x`` is)."""
        flat = x.detach().float().reshape(-1)
        low, high = flat.min().cpu(), flat.max().cpu()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        if self.scheme.range_method != "minmax":
            self._reference = max(self._reference or 1, flat.numel())
            keep = self._share(flat.numel())
            self._sizes.append(flat.numel())
            if flat.numel() > keep:
                flat = flat[torch.randint(0, flat.numel(), (keep,), generator=self.generator).to(flat.device)]
            self.samples.append(flat.cpu().clone())

    def _share(self, numel: int) -> int:
        """Values kept of a tensor of ``numel`` values: in proportion to the largest tensor seen so far."""
        return min(self.values_per_batch, -(-self.values_per_batch * numel // self._reference))

    def _weighted_samples(self) -> list[Tensor]:
        """The kept samples, each cut to its share of the largest tensor seen (a random subset of it): unchanged
        when the first tensor was the largest, as in tadq's own calibration passes. Its own generator: reading
        the range twice gives the same range."""
        generator, samples = torch.Generator().manual_seed(self.seed), []
        for sample, numel in zip(self.samples, self._sizes, strict=True):
            share = self._share(numel)
            if sample.numel() > share:
                sample = sample[torch.randperm(sample.numel(), generator=generator)[:share]]
            samples.append(sample)
        return samples

    def range(self) -> tuple[Tensor, Tensor]:
        if self.low is None or self.high is None:
            raise RuntimeError("observer saw no data: the calibration forward never reached this layer")
        finite = bool(torch.isfinite(self.low) & torch.isfinite(self.high))
        if self.scheme.range_method == "minmax" or not finite:
            # an inf/NaN seen is refused by ``Quantizer.set_range`` whatever the method: a percentile of the
            # subsample cut a lone inf off whenever the draw missed it (silently, depending on the seed)
            return self.low.reshape(1), self.high.reshape(1)
        values = torch.cat([*self._weighted_samples(), self.low.reshape(1), self.high.reshape(1)])  # true extremes
        return estimate_range(values, self.scheme)


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every enabled activation quantizer (layer inputs, attention operands...), by qualified name."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, Quantizer) and module.kind == "activation" and module.enabled
    }


class Calibrate:
    """Context manager: observe activations during the enclosed forwards, then set the ranges.

    Args:
        model: a model whose layers carry ``Quantizer`` input quantizers.
        recalibrate: also re-estimate quantizers whose range is already set.
        seed: seeds the observers' subsampling.
    """

    def __init__(self, model: nn.Module, recalibrate: bool = False, seed: int = 0) -> None:
        self.model = model
        self.recalibrate = recalibrate
        self.seed = seed
        self.observers: dict[str, RangeObserver] = {}

    def __enter__(self) -> Calibrate:
        for index, (name, quantizer) in enumerate(activation_quantizers(self.model).items()):
            if self.recalibrate or not bool(quantizer.initialized):
                observer = RangeObserver(quantizer.scheme, seed=self.seed + index)
                self.observers[name] = observer
                quantizer.attach_observer(observer)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        quantizers = activation_quantizers(self.model)
        for name in self.observers:
            quantizers[name].attach_observer(None)
        if exc_type is None:
            # all or nothing: a layer refused after others were set left a half-calibrated model, whose set ranges
            # (from the failed pass) a plain ``Calibrate`` retry then kept, as it only observes uncalibrated layers
            saved = {name: [t.clone() for t in (q.scale, q.zero_point, q.initialized)]
                     for name, q in quantizers.items() if name in self.observers}
            try:
                self._set_ranges(quantizers)
            except BaseException:
                with torch.no_grad():
                    for name, tensors in saved.items():
                        q = quantizers[name]
                        for target, value in zip((q.scale, q.zero_point, q.initialized), tensors, strict=True):
                            target.copy_(value)
                raise

    def _set_ranges(self, quantizers: dict[str, Quantizer]) -> None:
        for name, observer in self.observers.items():
            try:
                low, high = observer.range()
            except RuntimeError as error:
                raise RuntimeError(f"{name}: {error} (an input the model adapter does not pass, or a branch "
                                   "its calibration runs never take)") from error
            try:
                quantizers[name].set_range(low, high)
            except ValueError as error:  # overflowing activations: named by the layer that saw them
                raise ValueError(f"activation range after calibration: {name}: {error}") from error
