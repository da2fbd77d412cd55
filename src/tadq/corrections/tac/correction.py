"""TAC-Diffusion's per-step input bias correction (IBC) and noise estimation reconstruction (NER), docs/methods/tac.md.

Per sampler step i (table row ``step.index``):

    b_i = mean over samples and pixels of (x̂_i − x_i)      per channel (C,) or per element (C, H, W)     (B2)
    x̃_i = x̂_i − b_i                                        before the network
    ε̃   = K_i ⊙ ε̂(x̃_i) + d_i                                after the network; K, d closed form (B4,
                                                             ``tadq.corrections.scaling``)

x̂_i is the quantized state with every earlier step's correction active (the rows are fitted sequentially by
``tadq.corrections.sequential.fit_sequentially``); x_i is the FP state from the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from tadq.corrections.scaling import broadcast_row, fit_channel_affine, pixel_means
from tadq.corrections.sequential import SequentialCorrection, StepTargets
from tadq.corrections.tac.config import TACConfig
from tadq.device import wide_dtype
from tadq.registry import register_correction
from tadq.sampling import StepContext

__all__ = ["TACCorrection", "tac_tables"]


@register_correction(TACConfig)
class TACCorrection(SequentialCorrection):
    """IBC before the network and NER after it (docs/methods/tac.md#sampling).

    Tables: ``input_bias``, ``scale`` K and ``offset`` d, each (S, C) or, at full resolution, (S, C, H, W).
    """

    def __init__(self, config: TACConfig) -> None:
        super().__init__(config)
        for name in ("input_bias", "scale", "offset"):
            self.register_table(name)
        self._ner_on = True  # the candidate being fitted (select_ner); NER off leaves K = 1, d = 0 (identity)

    def candidates(self) -> list[dict]:
        """With ``select_ner``: IBC + NER against IBC alone, scored on held-out noise."""
        return [{"ner": True}, {"ner": False}] if self.config.select_ner else [{}]

    def use_candidate(self, settings: dict) -> None:
        self._ner_on = bool(settings.get("ner", True))

    def selection_noise(self) -> tuple[int | None, int]:
        return (self.config.held_out_seed if self.config.select_ner else None), self.config.selection_samples

    def reset_tables(self, steps: Sequence[StepContext], sample_shape: tuple[int, ...]) -> None:
        channels, count = sample_shape[0], len(steps)
        bias_shape = (count, channels) if self.config.ibc_resolution == "channel" else (count, *sample_shape)
        self.input_bias = torch.zeros(bias_shape, dtype=torch.float64)
        scale_shape = (count, channels) if self.config.ner_resolution == "channel" else (count, *sample_shape)
        self.scale = torch.ones(scale_shape, dtype=torch.float64)
        self.offset = torch.zeros(scale_shape, dtype=torch.float64)

    def fit_input_row(self, index: int, x_in: Tensor, x_fp: Tensor) -> None:
        if not self.config.ibc:
            return
        wide = wide_dtype(x_in.device)  # float64 (float32 on MPS, which has no float64)
        difference = x_in.to(wide) - x_fp.to(wide)  # (N, C, H, W)
        dims = (0, 2, 3) if self.config.ibc_resolution == "channel" else (0,)
        self.input_bias[index] = difference.mean(dim=dims)

    def fit_output_row(self, index: int, eps_hat: Tensor, targets: StepTargets, step: StepContext) -> None:
        if not self.config.ner or not self._ner_on:
            return
        target = targets.fp_trajectory if self.config.ner_target == "fp_trajectory" else targets.same_input
        fit = fit_channel_affine(eps_hat, target, relative_weight=self.config.relative_weight,
                                 mask_threshold=self.config.mask_threshold, ridge=self.config.ridge,
                                 offset=self.config.offset, per_element=self.config.ner_resolution == "full")
        self.scale[index], self.offset[index] = fit.scale, fit.offset

    def before_model(self, x: Tensor, step: StepContext) -> Tensor:
        """x̃ = x̂ − b_i."""
        index = self.table_index(step)
        if not self.config.ibc:
            return x
        return x - broadcast_row(self.input_bias[index], x)

    def after_model(self, eps: Tensor, x: Tensor, step: StepContext) -> Tensor:
        """ε̃ = K_i ε̂ + d_i."""
        index = self.table_index(step)
        if not self.config.ner:
            return eps
        eps = eps * broadcast_row(self.scale[index], eps)
        return eps + broadcast_row(self.offset[index], eps) if self.config.offset else eps

    def after_step(self, x_prev: Tensor, step: StepContext) -> Tensor:
        """With ``ibc_apply="input"`` the update used x̃; adding A_i b_i back keeps the bias in the trajectory
        (exact for the linear update, approximate where x_0 clipping acts). A multistep (dpmsolver++ 2M) step also
        reused the previous step's x̂_0, computed from x̃_{i-1}: its share C_i b_{i-1} (C_i = ``coef_prev_x``) is
        added back too (docs/methods/tac.md#multistep-samplers)."""
        index = self.table_index(step)
        if not self.config.ibc or self.config.ibc_apply == "trajectory":
            return x_prev
        restored = x_prev + step.coef_x * broadcast_row(self.input_bias[index], x_prev)
        if step.order > 1 and index > 0:
            restored = restored + step.coef_prev_x * broadcast_row(self.input_bias[index - 1], x_prev)
        return restored


def tac_tables(correction: TACCorrection) -> dict:
    """The fitted rows as JSON-ready lists, step 0 (noisiest) first, for reports and plots."""
    if not correction.fitted:
        raise ValueError("tac_tables needs a fitted TACCorrection")
    return {
        "sampler": correction.table_key.sampler_key, "bits": correction.table_key.bits,
        "input_bias": pixel_means(correction.input_bias).tolist(),
        "scale": pixel_means(correction.scale).tolist(), "offset": pixel_means(correction.offset).tolist(),
        "ibc": correction.config.ibc, "ner": correction.config.ner,
    }
