"""Temporal information aware reconstruction (TIAR, docs/methods/tfmq.md#tiar).

AdaRound on every quantized layer of the TIB (h's linears, the label path's linears, every g_i), with the loss

    L_TIAR = Σ_i mean_batch Σ_feat (ĝ_i(ĥ(t, y)) − g_i(h(t, y)))² + λ Σ (1 − |2h(V) − 1|^β)

over the finite deployment set {(t, y)}: the sampler grid's timesteps (× the class labels). x never enters, so the
temporal features are fitted directly instead of through x_t-driven block targets (which TFMQ-DM shows overfit
and disturb them). Activation quantizers are off, as in the weight phase of block reconstruction; λ and
the β schedule are the block reconstruction's (``ReconstructionConfig``). If the learned rounding ends worse than
nearest rounding over the whole set, nearest rounding is kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from tadq.calibration.reconstruction import attach_adaround, bake_adaround, with_rounding_penalty
from tadq.config import ReconstructionConfig
from tadq.quant.quantizer import quantizers_bypassed
from tadq.tfmq.cache import disturbance
from tadq.tfmq.config import TFMQConfig
from tadq.tfmq.tib import TemporalInformationBlock

__all__ = ["TIARReport", "reconstruct_tib", "feature_disturbance"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TIARReport:
    """TIAR's loss and mean temporal-feature cosine similarity to FP, before (nearest rounding) and after."""

    loss_before: float
    loss_after: float
    cosine_before: float
    cosine_after: float
    kept_learned: bool

    def to_json(self) -> dict[str, float | bool]:
        return dict(self.__dict__)


def _loss(features: list[Tensor], targets: list[Tensor]) -> Tensor:
    return sum((f - y).pow(2).sum(dim=1).mean() for f, y in zip(features, targets, strict=True))


@torch.no_grad()
def feature_disturbance(tib: TemporalInformationBlock, targets: list[Tensor], t: Tensor, labels: Tensor | None
                        ) -> list[dict[str, float]]:
    """Per temporal feature, the disturbance (1 − cos, relative L2) of ``tib``'s output against ``targets``."""
    return [disturbance(f, y) for f, y in zip(tib(t, labels), targets, strict=True)]


def _mean_cosine(tib: TemporalInformationBlock, targets: list[Tensor], t: Tensor, labels: Tensor | None) -> float:
    values = feature_disturbance(tib, targets, t, labels)
    return 1.0 - sum(v["cosine_distance"] for v in values) / max(1, len(values))


def reconstruct_tib(
    qtib: TemporalInformationBlock, fp_tib: TemporalInformationBlock, t: Tensor, labels: Tensor | None,
    reconstruction: ReconstructionConfig, config: TFMQConfig,
) -> TIARReport:
    """Learn the rounding of ``qtib``'s quantized weights so its features match ``fp_tib``'s on (t, labels).

    Args:
        qtib: the TIB of the converted model (its weights are rounded in place, then baked onto the grid).
        fp_tib: the TIB of the FP model (targets).
        t: (N,) timesteps of the finite set; ``labels`` (N,) class labels or ``None``.
        reconstruction: λ and the β schedule.
        config: TIAR iterations, learning rate and batch.
    """
    with torch.no_grad():
        targets = [f.detach() for f in fp_tib(t, labels)]
    pairs = qtib.weight_pairs()
    with quantizers_bypassed(qtib.model, "activation"):
        with torch.no_grad():
            before = float(_loss(qtib(t, labels), targets))
            cosine_before = _mean_cosine(qtib, targets, t, labels)
        initial = [weight.detach().clone() for _, weight in pairs]
        if pairs and config.tiar_iters > 0:
            _learn_rounding(qtib, pairs, targets, t, labels, reconstruction, config)
        with torch.no_grad():
            after = float(_loss(qtib(t, labels), targets))
            kept = after <= before
            if not kept:  # too few iterations to beat nearest rounding: keep the initialisation
                for (_, weight), saved in zip(pairs, initial, strict=True):
                    weight.copy_(saved)
                after = before
            cosine_after = _mean_cosine(qtib, targets, t, labels)
    report = TIARReport(before, after, cosine_before, cosine_after, kept)
    logger.info("TIAR: loss %.4g -> %.4g, mean cosine %.5f -> %.5f", before, after, cosine_before, cosine_after)
    return report


def _learn_rounding(qtib: TemporalInformationBlock, pairs: list, targets: list[Tensor], t: Tensor,
                    labels: Tensor | None, reconstruction: ReconstructionConfig, config: TFMQConfig) -> None:
    """Adam on the AdaRound variables, then hard rounding baked into the weights (they end on the grid)."""
    roundings = attach_adaround(pairs)
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=config.tiar_lr)
    generator = torch.Generator().manual_seed(config.seed)
    n = t.shape[0]
    try:
        for step in range(config.tiar_iters):
            index = torch.randperm(n, generator=generator)[: min(config.tiar_batch_size, n)]
            with torch.enable_grad():
                batch_labels = None if labels is None else labels[index]
                loss = _loss(qtib(t[index], batch_labels), [y[index] for y in targets])
                loss = with_rounding_penalty(loss, roundings, reconstruction, step, config.tiar_iters)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        bake_adaround(pairs)
    finally:  # an interrupted fit leaves no half-learned rounding attached
        for quantizer, _ in pairs:
            quantizer.rounding = None
