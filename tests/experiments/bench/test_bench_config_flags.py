"""``tadq bench`` carries ``--recon-rounding`` and ``--fp-layers`` to every row and into its regenerating command."""

from __future__ import annotations

from tadq.config import ReconstructionConfig
from tadq.experiments.bench import BenchConfig
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=10)


def test_fp_layers_and_rounding_reach_the_run_and_the_command():
    default = BenchConfig(methods=("naive",), presets=("W8A8",), samplers=(SAMPLER,))
    assert default.run_config(SAMPLER).fp_layers == "first_last"
    assert "--fp-layers" not in default.command() and "--recon-rounding" not in default.command()
    old = BenchConfig(methods=("naive", "qdiffusion"), presets=("W8A8",), samplers=(SAMPLER,), fp_layers="none",
                      reconstruction=ReconstructionConfig(rounding="adaround", activation_iters=400))
    run = old.run_config(SAMPLER)
    assert run.fp_layers == "none" and run.reconstruction.rounding == "adaround"
    command = old.command()
    assert "--fp-layers none" in command and "--recon-rounding adaround" in command
    assert "--recon-activation-iters 400" in command
