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
from tadq.tfmq.cache import disturbance, disturbance_rows
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


TARGET_CHUNK = 1024  # (t, y) pairs whose FP and quantized temporal features TIAR holds at once outside its batches


def _loss(features: list[Tensor], targets: list[Tensor]) -> Tensor:
    return sum((f - y).pow(2).sum(dim=1).mean() for f, y in zip(features, targets, strict=True))


def _chunks(t: Tensor, labels: Tensor | None, size: int):
    """(t, labels) of the finite set ``size`` pairs at a time."""
    for start in range(0, t.shape[0], size):
        yield t[start: start + size], None if labels is None else labels[start: start + size]


@torch.no_grad()
def _scores(qtib: TemporalInformationBlock, fp_tib: TemporalInformationBlock, t: Tensor, labels: Tensor | None
            ) -> tuple[float, float]:
    """TIAR's loss (``_loss`` over the whole set) and the mean temporal-feature cosine similarity to FP, computed
    ``TARGET_CHUNK`` pairs at a time: every pair's FP and quantized features at once were ≈ 39 GB each for
    DiT-XL/2 (1001 labels × 50 steps × 28 blocks of 6912 channels). Only each pair's terms (one number per pair
    and feature) are kept and reduced as before, so the numbers are those of the whole set at once whenever a
    chunk's features are the whole set's rows (a GEMM of fewer rows may round them otherwise, by float32 ulps)."""
    squared: list[list[Tensor]] = []
    cosine: list[list[Tensor]] = []
    for t_chunk, label_chunk in _chunks(t, labels, TARGET_CHUNK):
        features, targets = qtib(t_chunk, label_chunk), fp_tib(t_chunk, label_chunk)
        squared.append([(f - y).pow(2).sum(dim=1) for f, y in zip(features, targets, strict=True)])
        cosine.append([disturbance_rows(f, y)[0] for f, y in zip(features, targets, strict=True)])
    loss = sum(torch.cat(rows).mean() for rows in zip(*squared, strict=True))
    per_feature = [float(torch.cat(rows).mean()) for rows in zip(*cosine, strict=True)]
    return float(loss), 1.0 - sum(per_feature) / max(1, len(per_feature))


@torch.no_grad()
def feature_disturbance(tib: TemporalInformationBlock, targets: list[Tensor], t: Tensor, labels: Tensor | None
                        ) -> list[dict[str, float]]:
    """Per temporal feature, the disturbance (1 − cos, relative L2) of ``tib``'s output against ``targets``."""
    return [disturbance(f, y) for f, y in zip(tib(t, labels), targets, strict=True)]


def reconstruct_tib(
    qtib: TemporalInformationBlock, fp_tib: TemporalInformationBlock, t: Tensor, labels: Tensor | None,
    reconstruction: ReconstructionConfig, config: TFMQConfig,
) -> TIARReport:
    """Learn the rounding of ``qtib``'s quantized weights so its features match ``fp_tib``'s on (t, labels).

    The FP targets are computed per batch and per ``TARGET_CHUNK`` pairs, never for the whole set at once, so
    memory does not grow with the grid (steps × labels).

    Args:
        qtib: the TIB of the converted model (its weights are rounded in place, then baked onto the grid).
        fp_tib: the TIB of the FP model (targets).
        t: (N,) timesteps of the finite set; ``labels`` (N,) class labels or ``None``.
        reconstruction: λ and the β schedule.
        config: TIAR iterations, learning rate and batch.
    """
    pairs = qtib.weight_pairs()
    with quantizers_bypassed(qtib.model, "activation"):
        before, cosine_before = _scores(qtib, fp_tib, t, labels)
        initial = [weight.detach().clone() for _, weight in pairs]
        if pairs and config.tiar_iters > 0:
            _learn_rounding(qtib, fp_tib, pairs, t, labels, reconstruction, config)
        after, cosine_after = _scores(qtib, fp_tib, t, labels)
        kept = after <= before
        if not kept:  # too few iterations to beat nearest rounding: keep the initialisation
            with torch.no_grad():
                for (_, weight), saved in zip(pairs, initial, strict=True):
                    weight.copy_(saved)
            after, cosine_after = before, cosine_before
    report = TIARReport(before, after, cosine_before, cosine_after, kept)
    logger.info("TIAR: loss %.4g -> %.4g, mean cosine %.5f -> %.5f", before, after, cosine_before, cosine_after)
    return report


def _learn_rounding(qtib: TemporalInformationBlock, fp_tib: TemporalInformationBlock, pairs: list, t: Tensor,
                    labels: Tensor | None, reconstruction: ReconstructionConfig, config: TFMQConfig) -> None:
    """Adam on the AdaRound variables, then hard rounding baked into the weights (they end on the grid). Each
    batch's FP targets are computed with it (a few linears), not held for the whole set."""
    roundings = attach_adaround(pairs)
    optimizer = torch.optim.Adam([r.v for r in roundings], lr=config.tiar_lr)
    generator = torch.Generator().manual_seed(config.seed)
    n = t.shape[0]
    try:
        for step in range(config.tiar_iters):
            index = torch.randperm(n, generator=generator)[: min(config.tiar_batch_size, n)]
            batch_labels = None if labels is None else labels[index]
            with torch.no_grad():
                targets = fp_tib(t[index], batch_labels)
            with torch.enable_grad():
                loss = _loss(qtib(t[index], batch_labels), targets)
                loss = with_rounding_penalty(loss, roundings, reconstruction, step, config.tiar_iters)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
        bake_adaround(pairs)
    finally:  # an interrupted fit leaves no half-learned rounding attached
        for quantizer, _ in pairs:
            quantizer.rounding = None
