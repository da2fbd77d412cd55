"""What limits naive W8A8 on a model: weights or activations, which range method, which layers' inputs.

Why: issue 19 asks for W8A8 ≥ 38 dB PSNR vs FP on both shipped pixel models; the photos model sits at 35–37 dB
naive and block reconstruction (which only changes weight rounding) does not move it. This script calibrates the
naive W8A8 ranges once and then switches quantizers off to see where the error comes from:

* ``naive``: every weight and input quantizer on (the naive PTQ row);
* ``weights``: only the weight quantizers (inputs in float), ``acts``: only the input quantizers;
* ``act_range=M`` / ``act_range=percentile:P``: the activations' range method M (minmax, percentile, mse) instead
  of the preset's, with percentile P (default 99.99); ``fp=PRESET``: ``FP_LAYER_PRESETS[PRESET]`` kept in float;
  ``roles=R1|R2``: those adapter roles kept in float; ``A+B`` combines two such changes;
* ``--leave-one-out``: naive with one layer's input quantizer off at a time, scored by the mean squared error of the
  noise prediction over held-out calibration inputs (one denoiser call per input, no sampling), ranked; the top
  layers are then sampled with their input quantizers off together (``top-K`` rows).

Calibration as ``photos_attention_diagnose.py`` (DDIM 50, 64 trajectories, 25 of 50 steps × 32 inputs, seed 0);
samples from evaluation seed 1000, PSNR against the FP samples of the same noise. One JSON line per row.

Run (one thread)::

    python benchmarks/w8a8_diagnose.py --model photos --rows naive,weights,acts,act_range=minmax,act_range=percentile
    python benchmarks/w8a8_diagnose.py --model photos --rows naive --leave-one-out --top 1,3,10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from arguments import count, evaluation_seed, preset_name
from common import deployed, evaluation_images, probe_calibration
from torch import nn

from tadq import api
from tadq.config import QuantConfig, fp_layer_roles
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.quant import QScheme, preset
from tadq.quant.modules import QuantLayer
from tadq.quant.quantizer import Quantizer
from tadq.registry import adapter_for


def layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def switch_off(layer: QuantLayer, which: str) -> None:
    setattr(layer, which, Quantizer(QScheme.off(), kind="weight" if which == "weight_quantizer" else "activation"))


NAMED_ROWS = ("naive", "weights", "acts")


def row_changes(row: str, preset_label: str) -> dict:
    """The QuantConfig changes of a ``+``-joined row (``act_range=METHOD[:PCT]``, ``fp=KEY``, ``roles=A|B``)."""
    changes: dict = {}
    for part in row.split("+"):
        key, _, value = part.partition("=")
        if key == "act_range":
            method, _, pct = value.partition(":")
            changes["activations"] = dataclasses.replace(preset(preset_label)[1], range_method=method,
                                                         **({"percentile": float(pct)} if pct else {}))
        elif key == "fp":
            changes["keep_fp_roles"] = fp_layer_roles(value)
        elif key == "roles":
            changes["keep_fp_roles"] = tuple(value.split("|"))
        else:
            raise ValueError(f"unknown row part {part!r} in --rows {row!r}; rows are {', '.join(NAMED_ROWS)} or "
                             "parts act_range=METHOD[:PCT], fp=KEY, roles=A|B joined by +")
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="photos")
    parser.add_argument("--preset", type=preset_name, default="W8A8")
    parser.add_argument("--rows", default="naive,weights,acts")
    parser.add_argument("--num-samples", type=count, default=32)
    parser.add_argument("--eval-seed", type=evaluation_seed, default=1000)
    parser.add_argument("--leave-one-out", action="store_true")
    parser.add_argument("--top", default="1,3,10")
    parser.add_argument("--probe-inputs", type=count, default=64, help="held-out calibration inputs per probe")
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    try:  # every row checked before the calibration data and the FP samples (a bad one failed after them)
        for row in args.rows.split(","):
            if row not in NAMED_ROWS:
                row_changes(row, args.preset)
    except ValueError as error:
        parser.error(str(error))

    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    adapter = adapter_for(workload.model)
    sampler, calibration, data = probe_calibration(workload)

    def draw(model):
        return evaluation_images(workload, model, sampler, args.num_samples, seed=args.eval_seed)

    def build(**changes):
        config = dataclasses.replace(QuantConfig.from_preset(args.preset, calibration=calibration), **changes)
        return api.quantize(workload.model, workload.scheduler, deployed(config, workload), calibration=data,
                            conditions=workload.calibration_conditions)

    def report(row: str, qmodel, start: float, **extra) -> None:
        psnr = float(psnr_per_sample(draw(qmodel), fp).mean())
        print(json.dumps({"model": args.model, "preset": args.preset, "row": row, "psnr": round(psnr, 2),
                          "cpu_s": round(time.process_time() - start, 1), **extra}), flush=True)

    fp = draw(workload.model)
    for row in args.rows.split(","):
        start = time.process_time()
        if row in NAMED_ROWS:
            qmodel = build()
            if row != "naive":
                for layer in layers(qmodel.model).values():
                    switch_off(layer, "input_quantizer" if row == "weights" else "weight_quantizer")
            report(row, qmodel, start)
            continue
        report(row, build(**row_changes(row, args.preset)), start)

    if not args.leave_one_out:
        return
    start = time.process_time()
    qmodel = build()
    probe = torch.Generator().manual_seed(12345)
    index = torch.randperm(len(data), generator=probe)[: args.probe_inputs]
    x, t = data.x[index], data.t[index]
    cond = data.cond.rows(index) if data.cond is not None else None

    def predict(model: nn.Module) -> torch.Tensor:
        return adapter.predict_eps(model, x, t, cond)

    with torch.no_grad():
        target = predict(workload.model)
        base = float((predict(qmodel.model) - target).pow(2).mean())
    scores = {}
    for name, layer in layers(qmodel.model).items():
        kept = layer.input_quantizer
        if not kept.enabled:
            continue
        switch_off(layer, "input_quantizer")
        with torch.no_grad():
            scores[name] = base - float((predict(qmodel.model) - target).pow(2).mean())
        layer.input_quantizer = kept
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    for name, gain in ranked[:15]:
        print(json.dumps({"layer": name, "mse_gain_share": round(gain / base, 4)}), flush=True)
    for k in (int(x) for x in args.top.split(",")):
        trial = build()
        for name, _ in ranked[:k]:
            switch_off(layers(trial.model)[name], "input_quantizer")
        report(f"top-{k}-inputs-fp", trial, start, layers=[name for name, _ in ranked[:k]])


if __name__ == "__main__":
    main()
