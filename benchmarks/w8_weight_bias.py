"""Why tadq's 8-bit weights trail a symmetric abs-max quantizer over a sampling trajectory: per-channel mean error.

Why: with the input/output convs in float, tadq's naive W8A16 is 3 dB below optimum-quanto's W8A16 on the digits
(docs/results/digits.md, peers section). This script holds everything else fixed (calibration: 64 FP trajectories ×
25 of 50 DDIM steps × 32 inputs, seed 0; evaluation seed 1000) and varies only the weight grid:

* one-step error of the noise prediction on 512 calibration inputs (seed 12345) held out from bias correction's
  fit (the ranges are calibrated on the whole set, as in every row): mean squared error, the
  per-output-channel mean error (what adds up over the steps), and each input's mean (DC) error;
* PSNR of the sampled images against FP from the same noise;
* ``+bc``: empirical bias correction, each quantized layer's mean output error over up to 512 calibration inputs
  apart from the probe's (seed 7; the 288 others of the digits' 800; on the inputs the quantized network gives it)
  subtracted from its bias, all layers at once;
* ``--gptq``: how many of the default GPTQ base's units reject their own rounding (unit loss above nearest), for
  each (preset, weight grid) of the rows.

Rows are ``PRESET:WEIGHTS[:wonly][:gptq][+bc][+tac]`` with WEIGHTS ``asym_mse`` (tadq's preset), ``asym_minmax``
or ``sym_minmax`` (abs-max, quanto's); ``wonly`` switches every input quantizer off; ``gptq`` starts from the
default Q-Diffusion base (GPTQ onto the FP outputs) instead of naive PTQ; ``tac`` fits TAC-Diffusion's correction
on top (after ``bc``).
One JSON line per row. Run (one thread)::

    python benchmarks/w8_weight_bias.py --rows W8A8:asym_mse:wonly,W8A8:sym_minmax:wonly,W8A8:asym_mse:wonly+bc,\\
W8A8:asym_mse,W8A8:asym_mse+bc,W4A8:asym_mse,W4A8:asym_mse+bc --gptq
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
import torch.nn.functional as F
from arguments import count
from common import probe_calibration
from torch import nn

from tadq import api
from tadq.config import QuantConfig, ReconstructionConfig
from tadq.corrections.tac.config import TACConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.quant import QScheme, preset
from tadq.quant.modules import QuantConv2d, QuantLayer
from tadq.quant.quantizer import Quantizer
from tadq.recipe import Recipe
from tadq.registry import adapter_for

WEIGHT_GRIDS = {"asym_mse": {}, "asym_minmax": {"range_method": "minmax"},
                "sym_minmax": {"range_method": "minmax", "symmetric": True}}


def layers(model: nn.Module) -> list[QuantLayer]:
    return [m for m in model.modules() if isinstance(m, QuantLayer)]


@torch.no_grad()
def bias_correct(model: nn.Module, predict, x: torch.Tensor, t: torch.Tensor, batch: int) -> None:
    """Subtract each weight-quantized layer's mean output error (quantized minus float weight, same input)."""
    targets = [m for m in layers(model) if m.weight_quantizer.enabled]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module: QuantLayer, args: tuple, _output) -> None:
        inputs = args[0]
        if isinstance(module, QuantConv2d):
            error = module.forward(inputs) - module._conv_forward(inputs, module.weight, module.bias)
            error = error.transpose(0, 1).reshape(error.shape[1], -1)
        else:
            error = module.forward(inputs) - F.linear(inputs, module.weight, module.bias)
            error = error.reshape(-1, error.shape[-1]).T
        sums[id(module)] = sums.get(id(module), 0) + error.sum(1)
        counts[id(module)] = counts.get(id(module), 0) + error.shape[1]

    handles = [m.register_forward_hook(hook) for m in targets]
    try:
        for start in range(0, len(x), batch):
            predict(model, x[start:start + batch], t[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()
    for m in targets:
        mean = sums[id(m)] / counts[id(m)]
        bias = m.bias.detach().clone() if m.bias is not None else torch.zeros_like(mean)
        m.bias = nn.Parameter(bias - mean, requires_grad=False)


def probe_and_fit_rows(count: int, probe: int = 512, fit: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the calibration set: ``probe`` rows the one-step error is scored on (seed 12345, as before) and
    up to ``fit`` rows bias correction is fitted on, drawn (seed 7) from the rest only. Both used to be 512 rows of
    their own permutation of the 800, sharing about 330: the ``+bc`` rows' error was scored on its own fit rows."""
    held_out = torch.randperm(count, generator=torch.Generator().manual_seed(12345))[:probe]
    rest = torch.ones(count, dtype=torch.bool)
    rest[held_out] = False
    others = rest.nonzero().flatten()
    if len(others) == 0:
        raise SystemExit(f"the calibration set has {count} inputs: none left to fit bias correction on beside the "
                         f"{probe} probe inputs")
    fit_rows = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(7))[:fit]]
    return held_out, fit_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--rows", default="W8A8:asym_mse:wonly,W8A8:sym_minmax:wonly,W8A8:asym_mse:wonly+bc")
    parser.add_argument("--num-samples", type=count, default=128)
    parser.add_argument("--gptq", action="store_true", help="also count the GPTQ base's rejected units per preset")
    parser.add_argument("--gptq-target-damp", default=None,
                        help="ReconstructionConfig.gptq_target_damp of the gptq rows: a number, or gptq (solve with "
                             "gptq_damp, tadq before 2026-12-03; the numbers of docs/results/digits.md); "
                             "default: the library's")
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    reconstruction = ReconstructionConfig() if args.gptq_target_damp is None else ReconstructionConfig(
        gptq_target_damp=None if args.gptq_target_damp == "gptq" else float(args.gptq_target_damp))
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    if workload.calibration_conditions is not None:
        raise SystemExit("an unconditional model only (the probe calls the denoiser without conditioning)")
    adapter = adapter_for(workload.model)
    sampler, calibration, data = probe_calibration(workload)
    held_out, fit_rows = probe_and_fit_rows(len(data))

    def predict(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return adapter.predict_eps(model, x, t, None)

    def draw(model) -> torch.Tensor:
        return api.sample(model, workload.scheduler, sampler, num_samples=args.num_samples, seed=1000,
                          progress=False).images.clamp(-1, 1)

    fp = draw(workload.model)
    with torch.no_grad():
        target = predict(workload.model, data.x[held_out], data.t[held_out])

    def build(name: str, grid: str, method: str = "naive"):
        config = QuantConfig.from_preset(name, calibration=calibration, method=method, fp_layers="first_last",
                                         reconstruction=reconstruction)
        config = dataclasses.replace(config, weights=dataclasses.replace(preset(name)[0], **WEIGHT_GRIDS[grid]))
        return api.quantize(workload.model, workload.scheduler, config, calibration=data, progress=False)

    for row in args.rows.split(","):
        spec, *extras = row.split("+")
        name, grid, *flags = spec.split(":")
        unknown = set(flags) - {"wonly", "gptq"} | set(extras) - {"bc", "tac"}
        if unknown:
            raise SystemExit(f"unknown row part(s) {sorted(unknown)} in {row!r}")
        qmodel = build(name, grid, method="qdiffusion" if "gptq" in flags else "naive")
        if "wonly" in flags:
            for layer in layers(qmodel.model):
                layer.input_quantizer = Quantizer(QScheme.off(), kind="activation")
        if "bc" in extras:
            bias_correct(qmodel.model, predict, data.x[fit_rows], data.t[fit_rows], 128)
        if "tac" in extras:
            recipe = Recipe.from_quant_config(qmodel.config, corrections=(TACConfig(),))
            qmodel = api.quantize(workload.model, workload.scheduler, recipe, calibration=data, base=qmodel,
                                  progress=False)
        with torch.no_grad():
            error = predict(qmodel.model, data.x[held_out], data.t[held_out]) - target
        print(json.dumps({
            "model": args.model, "row": row, "eps_mse": float(error.pow(2).mean()),
            "channel_mean_error_sq": float(error.mean((0, 2, 3)).pow(2).mean()),
            "input_dc_error_sq": float(error.mean((1, 2, 3)).pow(2).mean()),
            "psnr": round(float(psnr_per_sample(draw(qmodel), fp).mean()), 2)}), flush=True)
    if args.gptq:
        for name, grid in sorted({tuple(row.split("+")[0].split(":")[:2]) for row in args.rows.split(",")}):
            reports = build(name, grid, method="qdiffusion").reconstruction_report
            print(json.dumps({"model": args.model, "preset": name, "weights": grid, "gptq_units": len(reports),
                              "gptq_rejected": sum(r.guard_rejected for r in reports),
                              "learned_over_nearest": [round(r.loss_learned / r.loss_before, 2) for r in reports]}),
                  flush=True)


if __name__ == "__main__":
    main()
