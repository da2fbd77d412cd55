"""Single-step ε error of naive PTQ and Q-Diffusion, int8 vs FP8 activations, split into weight and activation parts.

Why: at W8A8-FP8 Q-Diffusion's sampled PSNR is level with or below naive PTQ's, where at W8A8 it is 6 dB above. This
measures, on held-out inputs of FP trajectories (calibration seed 1, so not the inputs reconstruction fitted), the
mean squared ε error against FP of each quantized network with everything quantized (``all``), with its activation
quantizers bypassed (``weights``: what block reconstruction changes) and, for naive PTQ, with its weight quantizers
bypassed (``activations``). Reconstruction bakes its weights onto the grid, so bypassing a Q-Diffusion network's
weight quantizers changes nothing and is not reported. Errors are given for the noisier half of the 50 DDIM steps
(``early``) and the rest (``late``). Rows are ``PRESET:METHOD``, METHOD naive or qdiffusion, optionally with
``+split`` (split shortcuts) and ``+attn`` (quantized attention): ``tadq run``'s Q-Diffusion row is ``+split+attn``.

Calibration as ``w8a8_diagnose.py`` (64 FP trajectories, 25 of 50 DDIM steps × 32 inputs, seed 0); input/output
convs in float, the default Q-Diffusion base (GPTQ rounding, no activation phase). One JSON line per row. Run (one
thread, about 2 minutes a naive row and 4 a Q-Diffusion row)::

    python benchmarks/fp8_error_budget.py --rows W8A8:naive,W8A8:qdiffusion,W8A8:qdiffusion+split+attn
    python benchmarks/fp8_error_budget.py --rows W8A8-FP8:naive,W8A8-FP8:qdiffusion,W8A8-FP8:qdiffusion+split+attn
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from arguments import count

from tadq import api
from tadq.calibration import CalibrationSet, collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.experiments.workload import load_workload
from tadq.quant.quantizer import Quantizer, bypassing
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig


def parse_row(row: str) -> tuple[str, str, dict[str, bool]]:
    """``PRESET:METHOD[+split][+attn]`` → (preset, method, QuantConfig structure overrides)."""
    name, _, method = row.partition(":")
    base, *extras = method.split("+")
    if base not in ("naive", "qdiffusion") or not set(extras) <= {"split", "attn"}:
        raise SystemExit(f"row {row!r}: expected PRESET:naive or PRESET:qdiffusion, optionally +split and +attn")
    return name.upper(), base, {"split_shortcut": "split" in extras, "quantize_attention": "attn" in extras}


@torch.no_grad()
def predict(adapter, model: torch.nn.Module, inputs: CalibrationSet, batch: int = 100) -> torch.Tensor:
    """ε of ``model`` on every (x, t) of ``inputs`` (an unconditional model: the shipped digits)."""
    parts = [adapter.predict_eps(model, inputs.x[start:start + batch], inputs.t[start:start + batch], None)
             for start in range(0, len(inputs), batch)]
    return torch.cat(parts)


def error(eps: torch.Tensor, fp: torch.Tensor, early: torch.Tensor) -> dict[str, float]:
    """Mean squared error against FP over the noisier half of the steps and over the rest."""
    squared = (eps - fp).pow(2).flatten(1).mean(1)
    return {"early": float(f"{squared[early].mean():.3e}"), "late": float(f"{squared[~early].mean():.3e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="W8A8:naive,W8A8:qdiffusion,W8A8-FP8:naive,W8A8-FP8:qdiffusion")
    parser.add_argument("--cache-dir", default=".cache/tadq")
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    rows = [parse_row(row) for row in args.rows.split(",")]
    torch.set_num_threads(args.threads)
    workload = load_workload("digits")
    adapter = adapter_for(workload.model)
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=64, num_steps_kept=25, samples_per_step=32,
                                    seed=0)
    data, held_out = (collect_calibration_set(workload.model, adapter, workload.scheduler.config,
                                              dataclasses.replace(calibration, seed=seed), cache_dir=args.cache_dir)
                      for seed in (0, 1))
    fp = predict(adapter, workload.model, held_out)
    early = held_out.step_index < sampler.num_steps // 2
    for name, method, structure in rows:
        config = QuantConfig.from_preset(name, calibration=calibration, method=method, fp_layers="first_last",
                                         **structure)
        qmodel = api.quantize(workload.model, workload.scheduler, config, calibration=data, progress=False)
        quantizers = [m for m in qmodel.model.modules() if isinstance(m, Quantizer) and m.enabled]
        result = {"preset": name, "method": method, **structure,
                  "all": error(predict(adapter, qmodel.model, held_out), fp, early)}
        with bypassing([q for q in quantizers if q.kind == "activation"]):
            result["weights"] = error(predict(adapter, qmodel.model, held_out), fp, early)
        if method == "naive":
            with bypassing([q for q in quantizers if q.kind == "weight"]):
                result["activations"] = error(predict(adapter, qmodel.model, held_out), fp, early)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
