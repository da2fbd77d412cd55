"""Which attention operand costs the photos model 7 dB: naive PTQ plus one attention operand at a time; P's numbers.

Why: issue 19. ``photos_attention_check.py`` showed that quantizing the attention matmuls (q, k, v and the softmax
output P, ``quantize_attention=True``) costs 7 dB at W8A8 on the photos model and nothing on the digits model. This
splits that row into its operands (only q/k, only v, only P quantized, the others left in float) and records how
the per-tensor P grid (and, for comparison, a per-row grid) meets the probabilities it rounds: the share of entries
below one step, the probability mass rounded to zero or clipped per query row, and the per-tensor calibrated
maximum against each row's own maximum.

Each row calibrates the same way as ``photos_attention_check.py`` (DDIM 50, 64 calibration trajectories, 25 of 50
steps × 32 inputs, seed 0) and draws 32 samples from evaluation seed 1000 (PSNR against the FP samples of the same
noise). Ranges are calibrated on FP activations with every quantizer passing through (``Calibrate``), so switching
an operand's quantizer off afterwards is the same as never having quantized it.

Run (one thread; one to three CPU minutes per row on the photos model, the commands of
docs/methods/qdiffusion.md#measured):

    python benchmarks/photos_attention_diagnose.py --model photos --preset W8A8 \
        --rows attn:per_tensor,attn-p:per_tensor,attn-qk:per_tensor,attn-v:per_tensor,attn:unit --stats
    python benchmarks/photos_attention_diagnose.py --model digits --preset W4A8 \
        --rows naive,attn:per_tensor,attn:per_row

A row ``attn:MODE`` sets ``QuantConfig.softmax_granularity=MODE`` (docs/methods/qdiffusion.md#attention); ``attn``
alone uses the config default. ``attn:unit`` is a comparison only this script builds: the per-tensor grid with its
range fixed to P's full range [0, 1] (Δ = 1/(2^b − 1), zero point 0) instead of calibrated. One JSON line per row
(and one per attention module with ``--stats``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from arguments import count, evaluation_seed, preset_name
from common import deployed, evaluation_images, probe_calibration
from torch import Tensor, nn

from tadq import api
from tadq.config import QuantConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.quant import QScheme
from tadq.quant.attention import QuantAttnProcessor
from tadq.quant.quantizer import Quantizer

OPERANDS = {"qk": ("q_quantizer", "k_quantizer"), "v": ("v_quantizer",), "p": ("softmax_quantizer",)}
"""Which attention quantizers a row ``attn-X`` keeps; every other attention quantizer is switched off."""


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "processor", None),
                                                                        QuantAttnProcessor)}


def keep_only(model: nn.Module, kept: tuple[str, ...]) -> None:
    """Switch off (float pass-through) every attention operand quantizer not in ``kept``."""
    for attn in _attention_modules(model).values():
        for name in ("q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer"):
            if name not in kept:
                setattr(attn, name, Quantizer(QScheme.off(), kind="activation"))


@dataclasses.dataclass
class PStats:
    """Running sums over every softmax output one attention module produced while sampling (float64 counts)."""

    step: float = 0.0
    bits: int = 8
    entries: float = 0.0
    rows: float = 0.0
    below_half_step: float = 0.0
    below_step: float = 0.0
    mass_to_zero: float = 0.0
    mass_clipped: float = 0.0
    rows_clipped: float = 0.0
    row_max_sum: float = 0.0
    observed_max: float = 0.0
    l1_error: float = 0.0
    l1_error_row_grid: float = 0.0
    mass_to_zero_row_grid: float = 0.0
    tokens: int = 0
    heads: int = 0

    def add(self, probs: Tensor, quantized: Tensor) -> None:
        levels = 2 ** self.bits - 1
        top = self.step * levels
        p = probs.detach().double()
        self.tokens, self.heads = p.shape[-1], p.shape[1]
        self.entries += p.numel()
        self.rows += p.numel() / p.shape[-1]
        self.below_half_step += float((p < self.step / 2).sum())
        self.below_step += float((p < self.step).sum())
        self.mass_to_zero += float(p.masked_fill(p >= self.step / 2, 0).sum())
        excess = (p - top).clamp(min=0)
        self.mass_clipped += float(excess.sum())
        self.rows_clipped += float((excess.amax(dim=-1) > 0).sum())
        row_max = p.amax(dim=-1, keepdim=True)
        self.row_max_sum += float(row_max.sum())
        self.observed_max = max(self.observed_max, float(row_max.max()))
        self.l1_error += float((quantized.detach().double() - p).abs().sum())
        row_step = row_max / levels  # a per-row grid for comparison: Δ_i = max_j P_ij / (2^b − 1)
        row_grid = torch.round(p / row_step) * row_step
        self.l1_error_row_grid += float((row_grid - p).abs().sum())
        self.mass_to_zero_row_grid += float(p.masked_fill(p >= row_step / 2, 0).sum())

    def summary(self) -> dict[str, float]:
        rows = max(self.rows, 1.0)
        return {
            "tokens": self.tokens, "heads": self.heads, "step": self.step,
            "calibrated_max": self.step * (2 ** self.bits - 1), "observed_max": self.observed_max,
            "mean_row_max": self.row_max_sum / rows, "uniform_row_value": 1.0 / max(self.tokens, 1),
            "frac_below_step": self.below_step / max(self.entries, 1.0),
            "frac_rounded_to_zero": self.below_half_step / max(self.entries, 1.0),
            "row_mass_rounded_to_zero": self.mass_to_zero / rows, "row_mass_clipped": self.mass_clipped / rows,
            "frac_rows_clipped": self.rows_clipped / rows, "row_l1_error": self.l1_error / rows,
            "row_l1_error_per_row_grid": self.l1_error_row_grid / rows,
            "row_mass_rounded_to_zero_per_row_grid": self.mass_to_zero_row_grid / rows,
        }


def record_p_stats(model: nn.Module) -> tuple[dict[str, PStats], list]:
    """Hook every attention module's softmax quantizer; returns the per-module stats and the hook handles."""
    stats: dict[str, PStats] = {}
    handles = []
    for name, attn in _attention_modules(model).items():
        quantizer = attn.softmax_quantizer
        if not quantizer.enabled or quantizer.scheme.dynamic:  # a per-row grid has no single step to report
            continue
        entry = stats[name] = PStats(step=float(quantizer.scale.reshape(-1)[0]), bits=quantizer.scheme.bits)

        def hook(module, inputs, output, entry=entry):
            entry.add(inputs[0], output)

        handles.append(quantizer.register_forward_hook(hook))
    return stats, handles


def fix_unit_range(model: nn.Module) -> None:
    """Give every per-tensor P quantizer the range [0, 1]: Δ = 1/(2^b − 1), z = 0, whatever calibration chose."""
    for attn in _attention_modules(model).values():
        quantizer = attn.softmax_quantizer
        if quantizer.enabled and not quantizer.scheme.dynamic:
            quantizer.set_range(torch.zeros(1), torch.ones(1))


def parse_row(row: str) -> tuple[dict, tuple[str, ...] | None]:
    """``naive`` / ``attn`` / ``attn:MODE`` / ``attn-qk`` / ``attn-v`` / ``attn-p`` → (config changes, kept)."""
    if row == "naive":
        return {}, None
    base, _, mode = row.partition(":")
    changes: dict = {"quantize_attention": True}
    if mode:  # ``unit`` is a per-tensor P whose range this script then fixes to [0, 1]
        changes["softmax_granularity"] = "per_tensor" if mode == "unit" else mode
    if base == "attn":
        return changes, None
    operand = base.removeprefix("attn-")
    if operand not in OPERANDS:
        raise ValueError(f"unknown row {row!r}")
    return changes, OPERANDS[operand]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="photos")
    parser.add_argument("--preset", type=preset_name, default="W8A8")
    parser.add_argument("--rows", default="naive,attn:per_tensor,attn:per_row")
    parser.add_argument("--num-samples", type=count, default=32)
    parser.add_argument("--eval-seed", type=evaluation_seed, default=1000)
    parser.add_argument("--stats", action="store_true", help="record P's distribution in every row quantizing P")
    args = parser.parse_args()
    try:  # every row checked before the calibration data and the FP samples
        parsed = [(row, *parse_row(row)) for row in args.rows.split(",")]
        for _, changes, _ in parsed:
            QuantConfig.from_preset(args.preset, **changes)
    except ValueError as error:
        parser.error(str(error))

    torch.set_num_threads(1)
    workload = load_workload(args.model)
    sampler, calibration, data = probe_calibration(workload)

    def draw(model):
        return evaluation_images(workload, model, sampler, args.num_samples, seed=args.eval_seed)

    fp = draw(workload.model)
    for row, changes, kept in parsed:
        start = time.process_time()
        config = QuantConfig.from_preset(args.preset, calibration=calibration, **changes)
        qmodel = api.quantize(workload.model, workload.scheduler, deployed(config, workload), calibration=data,
                              conditions=workload.calibration_conditions)
        if kept is not None:
            keep_only(qmodel.model, kept)
        if row.endswith(":unit"):
            fix_unit_range(qmodel.model)
        stats, handles = record_p_stats(qmodel.model) if args.stats else ({}, [])
        psnr = float(psnr_per_sample(draw(qmodel), fp).mean())
        for handle in handles:
            handle.remove()
        print(json.dumps({"model": args.model, "preset": args.preset, "row": row,
                          "softmax_granularity": ("unit" if row.endswith(":unit") else config.softmax_granularity)
                          if config.quantize_attention else None,
                          "psnr": round(psnr, 2), "cpu_s": round(time.process_time() - start, 1)}), flush=True)
        for name, entry in stats.items():
            print(json.dumps({"row": row, "module": name, **{k: (round(v, 6) if isinstance(v, float) else v)
                                                            for k, v in entry.summary().items()}}), flush=True)


if __name__ == "__main__":
    main()
