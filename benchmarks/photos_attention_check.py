"""Photos W8A8: naive vs naive + quantized attention matmuls vs naive + split shortcuts (32 samples, null label).

Why: the Q-Diffusion row falls below naive PTQ on the photos model; this isolates its two extra quantizers. The
attention row is shown with both P granularities (docs/methods/qdiffusion.md#attention: the per-tensor P cost the
7 dB; per-operand split in photos_attention_diagnose.py).
Run: python benchmarks/photos_attention_check.py (one thread, a few minutes).
"""

import argparse
import json
import time

import torch
from arguments import count, evaluation_seed
from common import deployed, evaluation_images, probe_calibration

from tadq import api
from tadq.config import QuantConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample

ROWS = [("naive", {}),
        ("naive+attn", {"quantize_attention": True}),  # P per query row: QuantConfig's default since issue 19
        ("naive+attn(per_tensor P)", {"quantize_attention": True, "softmax_granularity": "per_tensor"}),  # before
        ("naive+split", {"split_shortcut": True})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=count, default=32)
    parser.add_argument("--eval-seed", type=evaluation_seed, default=1000)
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    num_samples, eval_seed = args.num_samples, args.eval_seed
    torch.set_num_threads(args.threads)
    workload = load_workload("photos")
    sampler, calibration, data = probe_calibration(workload)

    def draw(model):
        return evaluation_images(workload, model, sampler, num_samples, seed=eval_seed)

    fp = draw(workload.model)
    for name, changes in ROWS:
        t0 = time.time()
        config = QuantConfig.from_preset("W8A8", calibration=calibration, **changes)
        qmodel = api.quantize(workload.model, workload.scheduler, deployed(config, workload), calibration=data,
                              conditions=workload.calibration_conditions)
        psnr = float(psnr_per_sample(draw(qmodel), fp).mean())
        print(json.dumps({"row": name, "psnr": psnr, "s": time.time() - t0}), flush=True)


if __name__ == "__main__":
    main()
