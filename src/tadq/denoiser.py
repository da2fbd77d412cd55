"""``QuantizedDenoiser``: a fake-quantized model plus the config and layer plan that produced it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from tadq.config import QuantConfig
from tadq.corrections.stack import CorrectionStack
from tadq.guidance_ranges import BranchRanges
from tadq.quant.convert import LayerPlan
from tadq.sampling import Conditioning, StepAware, StepContext

if TYPE_CHECKING:
    from tadq.io.save import ArtefactSize

__all__ = ["QuantizedDenoiser"]


class QuantizedDenoiser(nn.Module):
    """Callable as ``denoiser(x, t, cond) -> prediction`` (what ``tadq.sample`` takes); step-aware through
    ``set_step`` when a correction (TFMQ) holds per-step state of the network.

    Args:
        model: the converted (fake-quant) diffusers model.
        adapter: its ``ModelAdapter``.
        config: the ``QuantConfig`` used.
        plans: per-layer decisions (the quantization map).

    Attributes:
        corrections: timestep-aware corrections applied by ``tadq.sample`` in order (empty by default; saved in
            ``corrections.safetensors``).
    """

    def __init__(self, model: nn.Module, adapter, config: QuantConfig, plans: list[LayerPlan]) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.config = config
        self.plans = plans
        self.reconstruction_report: list = []  # per-unit losses before/after reconstruction (qdiffusion)
        self.corrections = CorrectionStack()
        # the unconditional guidance branch's own activation ranges (QuantConfig.branch_ranges); in the state dict
        self.branch_ranges = BranchRanges.for_model(model) if getattr(config, "branch_ranges", False) else None

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        marks = None if cond is None else cond.unconditional_rows
        if self.branch_ranges is None or marks is None:
            return self._predict(x, t, cond)
        cond = cond.without_markers()
        flags = [bool(flag) for flag in marks.tolist()]  # one read back to the host (marks: on the model's device)
        if not any(flags):
            return self._predict(x, t, cond)
        if all(flags):
            with self.branch_ranges.active(self.model):
                return self._predict(x, t, cond)
        # a guided batch: each branch's rows with its own ranges (two calls, the same rows in all)
        rows_u, rows_c = (torch.tensor([i for i, flag in enumerate(flags) if flag == branch], dtype=torch.long,
                                       device=marks.device) for branch in (True, False))
        with self.branch_ranges.active(self.model):
            out_u = self._predict(x[rows_u], t[rows_u], cond.rows(rows_u))
        out_c = self._predict(x[rows_c], t[rows_c], cond.rows(rows_c))
        out = out_c.new_empty((x.shape[0], *out_c.shape[1:]))
        out[rows_u], out[rows_c] = out_u, out_c
        return out

    def _predict(self, x: Tensor, t: Tensor, cond: Conditioning | None) -> Tensor:
        cache = getattr(self.adapter, "inference_cache", None)  # optional: e.g. the cross-attention K/V memo
        if cache is None:
            return self.adapter.predict_eps(self.model, x, t, cond)
        with cache(self.model):  # the memo checks itself that it is inference (no grad, eval, fixed weights)
            return self.adapter.predict_eps(self.model, x, t, cond)

    def set_step(self, step: StepContext | None) -> None:
        """Tell the step-aware corrections (TFMQ's per-step ranges and cache) which sampler step the next call
        belongs to; ``None`` clears it. The sampling walker calls this around every denoiser call."""
        for member in self.corrections:
            if isinstance(member, StepAware):
                member.set_step(step)

    @contextlib.contextmanager
    def at_first_step(self) -> Iterator[None]:
        """Run the network outside a sampler for its shapes alone (MAC and output-position probes): step-aware
        corrections serve their first step's tables instead of refusing a call with no step."""
        with contextlib.ExitStack() as steps:
            for member in self.corrections:
                if isinstance(member, StepAware) and hasattr(member, "at_step"):
                    steps.enter_context(member.at_step(0))
            yield

    def correction_hooks(self) -> tuple:
        """The corrections as sampling hooks, after checking they were fitted for this model's bit label (each
        hook checks the sampler and guidance scale of its step)."""
        self.corrections.check_model(self.config.label)
        return tuple(self.corrections)

    def quantization_map(self) -> dict[str, dict]:
        """Layer name → role, schemes, and the reason a layer stayed in FP."""
        return {plan.name: plan.to_json() for plan in self.plans}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.adapter.sample_shape(self.model)

    def save_pretrained(self, directory: str | Path, scheduler=None, *, overwrite: bool = False) -> ArtefactSize:
        """Save as integer codes + diffusers layout (see ``tadq.io``); returns the measured ``ArtefactSize``.

        Pass the model's training scheduler so ``tadq.load`` can return it for sampling.
        """
        from tadq.io.save import save_quantized  # the writer does not import this module (the reader does)

        return save_quantized(self, directory, scheduler, overwrite=overwrite)
