"""``TACConfig``: which of TAC-Diffusion's two corrections act and the [RECON] choices of each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tadq.corrections.base import CorrectionConfig, check_count, check_number, check_selection_seed
from tadq.corrections.pair import TrajectoryMode
from tadq.corrections.tcec.config import SELECTION_SEED_OFFSET

__all__ = ["TACConfig"]


@dataclass(frozen=True)
class TACConfig(CorrectionConfig):
    """TAC-Diffusion (Yao et al., ECCV 2024): input bias correction (IBC) and noise estimation reconstruction (NER).

    There is no public code; every formula is a reconstruction (docs/methods/tac.md) and each choice is a field here.
    Defaults are the ones the ablation in this folder's README picked on the shipped model.

    Args:
        ibc: Remove the per-step bias b_i of the quantized state against the FP state from the same noise.
        ner: Rescale ε̂ per channel with the closed-form K_i of the masked MSE + relative objective.
        ibc_apply: ``"trajectory"``: the corrected state x̂_i − b_i also enters the sampler update (the bias leaves
            the trajectory); ``"input"``: only the network sees x̂_i − b_i (the update adds A_i b_i back).
        ibc_resolution: ``"channel"`` (b_i of shape (C,)) or ``"full"`` ((C, H, W); overfits with few samples).
        ner_target: ``"fp_trajectory"``: fit K ε̂ onto ε_θ(x_i) on the FP trajectory, so NER also absorbs
            propagated error; ``"same_input"``: onto ε_θ(x̃_i), the quantization error alone.
        ner_resolution: ``"channel"`` (K_i of shape (C,), the paper) or ``"full"`` (one K per element (C, H, W):
            for models with very few channels, e.g. the 1-channel digits model).
        relative_weight: λ, weight of the masked relative term (0: plain least squares).
        mask_threshold: τ of the mask 1[|ε| > τ], in units of std(ε) of the step.
        ridge: ρ, pulls K toward 1 when the data say little.
        offset: Also fit a per-channel offset d (ε̃ = K ε̂ + d).
        sequential: Fit from the noisiest step down with the earlier steps' corrections active (TAC's calibration);
            ``False`` fits every step from one uncorrected pair (cheaper, ignores the corrections' own effect).
        trajectory: Must be ``"quantized"`` when ``ibc`` is on: on the FP trajectory there is no input bias.
        select_ner: Fit TAC twice, with and without NER, and keep NER only if it lowers the final-x_0 error on
            held-out calibration noise (``held_out_seed``, ``selection_samples``): NER's least-squares rescale can
            shrink ε̂ where the quantization noise is large (regression dilution, docs/methods/tac.md#ner), and
            this switch falls back to IBC alone instead of keeping a rescale that hurts. Off by default: on the
            shipped digits UNet it dropped NER where NER helped on the evaluation noise (W8A8 −0.87 dB against
            plain TAC; docs/methods/tac.md#the-held-out-ner-switch-ablated).
        selection_seed: Held-out seed of that choice; ``None``: ``seed + SELECTION_SEED_OFFSET`` (100000).
        selection_samples: Trajectories of the held-out score.
    """

    trajectory: TrajectoryMode = "quantized"
    ibc: bool = True
    ner: bool = True
    ibc_apply: Literal["trajectory", "input"] = "trajectory"
    ibc_resolution: Literal["channel", "full"] = "full"
    ner_target: Literal["fp_trajectory", "same_input"] = "same_input"
    ner_resolution: Literal["channel", "full"] = "channel"
    relative_weight: float = 0.0
    mask_threshold: float = 0.05
    ridge: float = 0.0
    offset: bool = False
    sequential: bool = True
    select_ner: bool = False
    selection_seed: int | None = None
    selection_samples: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ibc", "ner", "offset", "sequential", "select_ner"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TACConfig.{name} must be True or False, got {getattr(self, name)!r}")
        choices = {"ibc_apply": ("trajectory", "input"), "ibc_resolution": ("channel", "full"),
                   "ner_target": ("fp_trajectory", "same_input"), "ner_resolution": ("channel", "full")}
        for name, accepted in choices.items():
            if getattr(self, name) not in accepted:
                raise ValueError(f"TACConfig.{name}={getattr(self, name)!r}; accepted values: {accepted}")
        if not self.ibc and not self.ner:
            raise ValueError("TACConfig with ibc=False and ner=False corrects nothing; turn one of them on")
        check_number("TACConfig.relative_weight", self.relative_weight, 0.0, 1.0)
        check_number("TACConfig.mask_threshold", self.mask_threshold)
        check_number("TACConfig.ridge", self.ridge)
        check_selection_seed("TACConfig", self.seed, self.selection_seed, self.held_out_seed)
        check_count("TACConfig.selection_samples", self.selection_samples)
        if self.select_ner and not (self.ner and self.sequential):
            raise ValueError("TACConfig.select_ner chooses whether NER stays on: it needs ner=True and the "
                             "sequential fit")
        if self.ibc and self.trajectory != "quantized":
            raise ValueError("IBC measures the quantized trajectory's bias against FP: set trajectory='quantized'")

    @property
    def held_out_seed(self) -> int:
        """The seed that scores NER on against NER off."""
        return self.seed + SELECTION_SEED_OFFSET if self.selection_seed is None else self.selection_seed
