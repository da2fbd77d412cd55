"""Which reconstruction units make one Q-Diffusion artefact worse than another of the same model and config.

Why: the t2i Q-Diffusion W4A8 row moves by 2.6 dB between two calibration sets that differ only in the last float
bits (docs/results/t2i.md, "The same command on another CPU kind"). Copying the second artefact's tensors of one
unit (or a group of units) into the first and sampling again names the units that carry the difference; the guided ε
error on a calibration set, split into its per-step per-channel mean (a bias that the DDIM steps sum coherently) and
the rest, says what kind of error they carry. Run::

    python benchmarks/unit_swap.py LOW_ARTEFACT HIGH_ARTEFACT --model t2i --num-samples 32 \\
        --calibration .cache/tadq/calibration-<key>.safetensors

The FP reference and every swap use the evaluation seed (1000) and prompts of ``tadq run``; the final x_0 MSE
is in latent space (no VAE decode), the quantity ``results.md`` reports as "final x_0 MSE".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from arguments import count
from torch import Tensor, nn

import tadq
from tadq.calibration.data import CalibrationSet
from tadq.experiments.workload import load_workload
from tadq.registry import adapter_for
from tadq.safefiles import load_checked
from tadq.sampling import SamplerConfig


def _final_mse(workload, denoiser: nn.Module, reference: Tensor, num_samples: int) -> float:
    """Final x_0 MSE of ``denoiser`` against the FP samples ``reference`` (same seed, prompts and guidance)."""
    result = tadq.sample(denoiser, workload.scheduler, SamplerConfig(kind="ddim", num_steps=50, eta=0.0),
                         num_samples=num_samples, seed=1000, batch_size=num_samples, progress=False,
                         conditions=workload.evaluation_conditions, guidance_scale=workload.guidance_scale)
    return float((result.images - reference).pow(2).mean())


def _with_units(base: dict[str, Tensor], donor: dict[str, Tensor], units: list[str]) -> dict[str, Tensor]:
    """``base`` with every tensor of ``units`` taken from ``donor``."""
    prefixes = tuple(f"{unit}." for unit in units)
    return {name: donor[name] if name.startswith(prefixes) else value for name, value in base.items()}


def _guided_eps_error(workload, model: nn.Module, reference: nn.Module, calibration: CalibrationSet) -> Tensor:
    """Guided ε (uncond + s·(cond − uncond)) of ``model`` minus the FP model's, on the set's conditional rows."""
    adapter = adapter_for(reference)

    def guided(network: nn.Module) -> Tensor:
        with torch.no_grad():
            eps = torch.cat([adapter.predict_eps(network, calibration.x[i:i + 400], calibration.t[i:i + 400],
                                                 calibration.cond.rows(slice(i, i + 400)))
                             for i in range(0, len(calibration), 400)])
        half = len(calibration) // 2  # [conditional | unconditional], as CalibrationSet stacks them
        return eps[half:] + workload.guidance_scale * (eps[:half] - eps[half:])

    return guided(model) - guided(reference)


def _report_bias(workload, name: str, model: nn.Module, calibration: CalibrationSet) -> None:
    error = _guided_eps_error(workload, model.eval(), workload.model.eval(), calibration)
    steps = calibration.step_index[: len(error)]
    means = torch.stack([error[steps == s].mean((0, 2, 3)) for s in steps.unique()])  # (steps, channels)
    print(f"{name}: guided eps MSE {float(error.pow(2).mean()):.3e}, of it per-step channel means "
          f"{float(means.pow(2).mean()):.3e}; channel means over the steps "
          f"{[round(v, 4) for v in means.mean(0).tolist()]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("low", type=Path, help="the worse artefact (its units are replaced)")
    parser.add_argument("high", type=Path, help="the better artefact (the donor)")
    parser.add_argument("--model", default="t2i")
    parser.add_argument("--num-samples", type=count, default=32)
    parser.add_argument("--calibration", type=Path, default=None, help="a calibration cache file for the ε bias")
    parser.add_argument("--bias-unit", default="conv_out", help="the unit whose swap the ε bias is also shown for")
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workload = load_workload(args.model)
    low, _ = tadq.load(args.low)
    high, _ = tadq.load(args.high)
    base = {name: value.clone() for name, value in low.model.state_dict().items()}
    donor = high.model.state_dict()
    if set(base) != set(donor):
        raise SystemExit("the artefacts do not hold the same tensors (another model or config)")
    fp = tadq.sample(workload.model, workload.scheduler, SamplerConfig(kind="ddim", num_steps=50, eta=0.0),
                     num_samples=args.num_samples, seed=1000, batch_size=args.num_samples, progress=False,
                     conditions=workload.evaluation_conditions, guidance_scale=workload.guidance_scale).images
    units = adapter_for(workload.model).blocks(workload.model)
    rows = [("none", []), ("all", units)] + [(unit, [unit]) for unit in units]
    for name, chosen in rows:
        low.model.load_state_dict(_with_units(base, donor, chosen))
        print(f"{_final_mse(workload, low, fp, args.num_samples):.4e}  high's {name}", flush=True)
    if args.calibration is not None:
        _, meta = load_checked(args.calibration, "calibration cache")
        calibration = CalibrationSet.load(args.calibration, meta["key"])
        for name, chosen in (("low", []), ("high", units), (f"low + high's {args.bias_unit}", [args.bias_unit])):
            low.model.load_state_dict(_with_units(base, donor, chosen))
            _report_bias(workload, name, low.model, calibration)


if __name__ == "__main__":
    main()
