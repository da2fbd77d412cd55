"""``TFMQConfig``: the switches of TFMQ-DM and its journal extension (docs/methods/tfmq.md).

Every [RECON] choice (docs/methods/tfmq.md) is a field here, so the ablations in ``src/tadq/tfmq/README.md`` are config
changes, not code changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from tadq.corrections.base import CorrectionConfig, check_number

__all__ = ["TFMQConfig", "FSCMode", "Maintenance", "tfmq_tag"]

FSCMode = Literal["off", "tib", "model"]
Maintenance = Literal["tib", "cache_fp", "cache_quantized", "select"]
FSC_MODES: tuple[str, ...] = ("off", "tib", "model")
MAINTENANCE: tuple[str, ...] = ("tib", "cache_fp", "cache_quantized", "select")


@dataclass(frozen=True)
class TFMQConfig(CorrectionConfig):
    """TFMQ-DM (Huang et al., CVPR 2024) and *Temporal Feature Matters* (TPAMI 2025), docs/methods/tfmq.md.

    Args:
        tiar: Temporal information aware reconstruction: AdaRound the temporal information block (TIB) against the
            FP temporal features over the deployment timesteps, before the other blocks (docs/methods/tfmq.md#tiar).
        tiar_iters: AdaRound iterations of TIAR (the authors: 20 000 on a GPU; the TIB is a few linears, so a CPU
            budget of 2000 costs seconds).
        tiar_lr: Adam learning rate of TIAR's rounding variables (3e-2: the rate measured best for block
            reconstruction on this CPU budget, ``ReconstructionConfig.weight_lr``).
        tiar_batch_size: timesteps (× labels) per TIAR step (32: the authors' batch).
        freeze_time_projections: keep every block's time projection out of the ordinary block reconstruction
            (the paper's "Freeze" strategy, docs/methods/tfmq.md#tiar). With ``tiar`` the whole TIB is frozen there.
        fsc: finite-set calibration of activation ranges, one (Δ, z) per sampler step (B3): ``"tib"`` for the
            TIB's activation quantizers only (the paper), ``"model"`` for every activation quantizer (the authors'
            code, issue #5), ``"off"`` for none.
        fsc_range: how a step's range is estimated: ``"minmax"`` (the paper's choice) or ``"scheme"`` (the
            activation scheme's own estimator, MSE-Lp2.4 in the presets).
        fsc_samples_per_step: FP-trajectory inputs per step for model-wide FSC (the TIB needs none: its inputs
            depend only on t).
        maintenance: how temporal features are served at inference (journal, B5, [RECON]): ``"tib"`` (through
            the quantized TIB), ``"cache_fp"`` (a table of exact FP features per timestep), ``"cache_quantized"``
            (FP features quantized with one (Δ, z) per step and block, ``cache_bits``), ``"select"`` (per block,
            whichever of the TIB and the quantized cache disturbs the feature less).
        cache_bits: bit-width of the quantized cache (2..8).
        select_metric: disturbance that decides ``"select"``: ``"cosine"`` (1 − cos) or ``"l2"`` (relative L2).
        trajectory: must be ``"teacher_forced"``: FSC reads FP trajectories.
        num_samples: FP trajectories recorded (once, O(S)) for model-wide FSC.
        seed: noise seed of those trajectories (a calibration seed, never an evaluation seed).
    """

    tiar: bool = True
    tiar_iters: int = 2000
    tiar_lr: float = 3e-2
    tiar_batch_size: int = 32
    freeze_time_projections: bool = True
    fsc: FSCMode = "tib"
    fsc_range: Literal["minmax", "scheme"] = "minmax"
    fsc_samples_per_step: int = 64
    maintenance: Maintenance = "tib"
    cache_bits: int = 8
    select_metric: Literal["cosine", "l2"] = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trajectory != "teacher_forced":
            raise ValueError("TFMQConfig.trajectory must be 'teacher_forced': FSC calibrates on FP trajectories")
        for name in ("tiar", "freeze_time_projections"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TFMQConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name, least in (("tiar_iters", 0), ("tiar_batch_size", 1), ("fsc_samples_per_step", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"TFMQConfig.{name} must be an int >= {least}, got {value!r}")
        check_number("TFMQConfig.tiar_lr", self.tiar_lr)  # finite, a number (inf and True were taken)
        if self.tiar_lr == 0:
            raise ValueError("TFMQConfig.tiar_lr must be > 0, got 0")
        choices = {"fsc": FSC_MODES, "fsc_range": ("minmax", "scheme"), "maintenance": MAINTENANCE,
                   "select_metric": ("cosine", "l2")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"TFMQConfig.{name}={getattr(self, name)!r}; accepted values: {accepted}")
        if isinstance(self.cache_bits, bool) or not isinstance(self.cache_bits, int) or not 2 <= self.cache_bits <= 8:
            raise ValueError(f"TFMQConfig.cache_bits must be an int in 2..8, got {self.cache_bits!r}")
        if self.fsc == "model" and self.fsc_samples_per_step > self.num_samples:  # refused here, not after TIAR
            raise ValueError(f"TFMQConfig.fsc_samples_per_step ({self.fsc_samples_per_step}) cannot exceed "
                             f"num_samples ({self.num_samples}): model-wide FSC keeps that many inputs of the "
                             "num_samples FP trajectories at every step")

    @property
    def weight_fields(self) -> dict[str, object]:
        """The fields that decide the reconstructed weights (the rest acts after reconstruction)."""
        return {"tiar": self.tiar, "tiar_iters": self.tiar_iters, "tiar_lr": self.tiar_lr,
                "tiar_batch_size": self.tiar_batch_size, "freeze_time_projections": self.freeze_time_projections}


def tfmq_tag(config: TFMQConfig) -> str:
    """``"tfmq-<hash>"`` of a config: names a TFMQ construction of a ``QuantConfig`` in ``BaseModels``."""
    from tadq.config import config_to_dict

    payload = json.dumps(config_to_dict(config), sort_keys=True)
    return "tfmq-" + hashlib.sha256(payload.encode()).hexdigest()[:12]
