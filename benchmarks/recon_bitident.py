"""Is a pure speed-up of block reconstruction bit-identical? Old implementation (a git revision) against this tree.

Why: a change meant only to save time must leave every weight and step exactly as before; this runs the
reconstruction module of ``--rev`` and the current one on the same naive W4A8 digits model and calibration
data, compares every state-dict tensor with ``torch.equal`` and prints both CPU times. Run:

    python benchmarks/recon_bitident.py --rev 373e14f --weight-iters 100 --activation-iters 40 --loss-reduction sum

(``--loss-reduction sum`` when the old revision predates ``ReconstructionConfig.loss_reduction``.)
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from arguments import count, count_or_zero

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.models import load_pipeline_parts
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig


def load_revision(rev: str):
    """The reconstruction module as it was at ``rev`` (imported under its own name beside the current one)."""
    source = subprocess.run(["git", "show", f"{rev}:src/tadq/calibration/reconstruction.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "reconstruction_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reconstruction_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reconstruction_at_rev"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True)
    parser.add_argument("--weight-iters", type=count_or_zero, default=100)
    parser.add_argument("--activation-iters", type=count_or_zero, default=40)
    parser.add_argument("--loss-reduction", default="sum")
    parser.add_argument("--threads", type=count, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = load_revision(args.rev)
    model, scheduler = load_pipeline_parts(None)
    calibration = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=10), num_trajectories=64,
                                    num_steps_kept=10, samples_per_step=32)
    calib = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration, progress=False)
    config = ReconstructionConfig(weight_iters=args.weight_iters, activation_iters=args.activation_iters,
                                  loss_reduction=args.loss_reduction)
    states = []
    for name, function in ((args.rev, old.reconstruct), ("this tree", reconstruct)):
        qmodel = api.quantize(model, scheduler, QuantConfig.from_preset("W4A8", calibration=calibration),
                              calibration=calib, progress=False)
        start = time.process_time()
        function(qmodel.model, model, qmodel.adapter, calib, config, progress=False)
        print(f"{name}: {time.process_time() - start:.1f} CPU s")
        states.append(qmodel.model.state_dict())
    before, after = states
    print("bit-identical:", all(torch.equal(before[k], after[k]) for k in before), f"({len(before)} tensors)")


if __name__ == "__main__":
    main()
