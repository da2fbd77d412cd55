"""Photos W8A8: naive vs naive + quantized attention matmuls vs naive + split shortcuts (32 samples, null label).

Why: the Q-Diffusion row falls below naive PTQ on the photos model; this isolates its two extra quantizers. The
attention row is shown with both P granularities (docs/methods/qdiffusion.md#attention: the per-tensor P cost the
7 dB; per-operand split in photos_attention_diagnose.py).
Run: python benchmarks/photos_attention_check.py (one thread, a few minutes).
"""

import json
import time

import torch

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.experiments.workload import load_workload
from tadq.metrics import psnr_per_sample
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

ROWS = [("naive", {}),
        ("naive+attn", {"quantize_attention": True}),  # P per query row: QuantConfig's default since issue 19
        ("naive+attn(per_tensor P)", {"quantize_attention": True, "softmax_granularity": "per_tensor"}),  # before
        ("naive+split", {"split_shortcut": True})]


def main(num_samples: int = 32, eval_seed: int = 1000) -> None:
    torch.set_num_threads(1)
    workload = load_workload("photos")
    sampler = SamplerConfig(kind="ddim", num_steps=50)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=64, num_steps_kept=25, samples_per_step=32,
                                    seed=0)
    data = collect_calibration_set(workload.model, adapter_for(workload.model), workload.scheduler.config,
                                   calibration, cache_dir=".cache/tadq", conditions=workload.calibration_conditions)

    def draw(model):
        return api.sample(model, workload.scheduler, sampler, num_samples=num_samples, seed=eval_seed,
                          conditions=workload.evaluation_conditions, progress=False).images.clamp(-1, 1)

    fp = draw(workload.model)
    for name, changes in ROWS:
        t0 = time.time()
        config = QuantConfig.from_preset("W8A8", calibration=calibration, **changes)
        qmodel = api.quantize(workload.model, workload.scheduler, config, calibration=data,
                              conditions=workload.calibration_conditions)
        psnr = float(psnr_per_sample(draw(qmodel), fp).mean())
        print(json.dumps({"row": name, "psnr": psnr, "s": time.time() - t0}), flush=True)


if __name__ == "__main__":
    main()
