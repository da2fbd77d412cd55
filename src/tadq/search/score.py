"""The held-out score of a candidate: median over trajectories of the final sample's PSNR against FP.

**Which noise.** A candidate is scored on noise nobody fitted or evaluates on: the held-out seed is derived from
the calibration seed (``calibration seed + HELDOUT_SEED_OFFSET``), apart from the corrections' fit seed (the
calibration seed) and TCEC's own selection seed (calibration seed + 100000), and ``check_seeds`` refuses it when it
equals the evaluation seed. Every sample's noise is a function of (seed, index) through a hash
(``tadq.sampling.noise``), so distinct seeds give unrelated noise.

**Why the median of per-trajectory PSNR.** The quantity a user reads is PSNR against FP; averaged over samples
it is the mean of −10·log10(MSE_i), so one trajectory that goes 10× wrong moves it by 10 dB / n, not by 10× its
share. A *mean MSE*, the obvious score, is different: the per-trajectory final error is heavy-tailed, and on the
shipped model the 5 worst of 128 held-out trajectories carried 49–66 % of the mean MSE
(``src/tadq/corrections/tcec/README.md``) — the TAC + TCEC choice made on such a mean was reversed on the
evaluation noise. A mean of PSNR over a small held-out set still moves with its few worst trajectories; the
median does not move at all until half of them go wrong, and its sampling error over n trajectories is close to
the mean's for a well-behaved distribution. So the score is the median; the mean, a 20 % trimmed mean, the 10th
percentile and the mean final MSE are recorded beside it (``HeldOutScore``) for the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from tadq.api import sample
from tadq.metrics.image import psnr_per_sample
from tadq.sampling import ConditionSource, SamplerConfig, check_seed

__all__ = ["HELDOUT_SEED_OFFSET", "HeldOutScore", "heldout_seed", "check_seeds", "robust_score", "final_samples",
           "score_samples", "trimmed_mean"]

HELDOUT_SEED_OFFSET = 200_000
"""Held-out seed = calibration seed + this (TCEC's selection uses + 100000, the fits the calibration seed)."""

TRIM = 0.2  # share cut from each end for the trimmed mean recorded beside the median


def heldout_seed(calibration_seed: int) -> int:
    """The seed the candidates are scored on, derived from the calibration seed."""
    return int(calibration_seed) + HELDOUT_SEED_OFFSET


def check_seeds(*, calibration_seed: int, heldout: int, eval_seed: int, fit_seeds: dict[str, int] | None = None
                ) -> None:
    """Raise ``ValueError`` unless the evaluation seed is apart from every seed the search fits or scores on, and
    the held-out seed is apart from every fit seed (a candidate scored on its own fitting noise proves nothing)."""
    used = {"calibration": calibration_seed, **(fit_seeds or {})}
    for role, seed in {**used, "held-out scoring": heldout, "evaluation": eval_seed}.items():
        check_seed(f"the {role} seed", seed)
    for role, seed in {**used, "held-out scoring": heldout}.items():
        if seed == eval_seed:
            raise ValueError(f"the {role} seed {seed} equals the evaluation seed {eval_seed}: the search must never "
                             "see evaluation noise; choose another --seed or --eval-seed")
    for role, seed in used.items():
        if seed == heldout:
            raise ValueError(f"the held-out scoring seed {heldout} equals the {role} seed; choose another --seed")


def trimmed_mean(values: Tensor, share: float = TRIM) -> float:
    """Mean after cutting ``share`` of the values from each end (at least one value kept)."""
    ordered = values.double().sort().values
    cut = min(int(math.floor(share * len(ordered))), (len(ordered) - 1) // 2)
    return float(ordered[cut: len(ordered) - cut].mean())


@dataclass(frozen=True)
class HeldOutScore:
    """The score (``median_psnr``, dB, higher is better) and the statistics recorded beside it."""

    median_psnr: float
    mean_psnr: float
    trimmed_mean_psnr: float
    p10_psnr: float
    mean_final_mse: float
    num_trajectories: int
    seed: int

    @property
    def value(self) -> float:
        return self.median_psnr

    def to_json(self) -> dict:
        return asdict(self)


def robust_score(psnr: Tensor, mse: Tensor, seed: int) -> HeldOutScore:
    """``HeldOutScore`` of per-trajectory PSNR (N,) and final MSE (N,) on seed ``seed``."""
    psnr = psnr.double()
    return HeldOutScore(
        median_psnr=float(psnr.median()), mean_psnr=float(psnr.mean()), trimmed_mean_psnr=trimmed_mean(psnr),
        p10_psnr=float(torch.quantile(psnr, 0.1)), mean_final_mse=float(mse.double().mean()),
        num_trajectories=int(len(psnr)), seed=int(seed),
    )


def final_samples(denoiser: nn.Module, scheduler, sampler: SamplerConfig, *, num_samples: int, seed: int,
                  batch_size: int = 128, conditions: ConditionSource | None = None, guidance_scale: float = 1.0,
                  decoder: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Final images (N, C, H, W) of ``denoiser`` (FP model or one carrying corrections) from ``seed``: sample i
    conditioned on ``conditions(seed, i)`` (``None``: unconditional) with classifier-free guidance
    ``guidance_scale``, decoded by ``decoder`` (a latent model's VAE) in batches; the samples as they are without
    one."""
    images = sample(denoiser, scheduler, sampler, num_samples=num_samples, seed=seed, batch_size=batch_size,
                    progress=False, conditions=conditions, guidance_scale=guidance_scale).images
    if decoder is None:
        return images
    with torch.no_grad():
        return torch.cat([decoder(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])


def score_samples(images: Tensor, reference: Tensor, seed: int) -> HeldOutScore:
    """The score of ``images`` against the FP ``reference`` drawn from the same noise (row i ↔ row i)."""
    mse = (images.clamp(-1, 1) - reference.clamp(-1, 1)).double().square().flatten(1).mean(1)
    return robust_score(psnr_per_sample(images, reference), mse, seed)
