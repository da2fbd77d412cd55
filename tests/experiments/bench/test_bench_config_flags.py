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


def test_a_gptq_target_damp_other_than_the_default_is_named_in_the_command():
    """A config whose W* was solved with gptq_damp (None: the behaviour before gptq_target_damp) regenerates with that
    damping spelled out, so the command reproduces it whatever the default is."""
    default = ReconstructionConfig()
    older = BenchConfig(methods=("qdiffusion",), presets=("W8A8",), samplers=(SAMPLER,),
                        reconstruction=ReconstructionConfig(gptq_target_damp=None))
    if default.gptq_target_damp is None:
        assert "--recon-gptq-target-damp" not in older.command()
    else:
        assert f"--recon-gptq-target-damp {default.gptq_damp!r}" in older.command()
    tuned = BenchConfig(methods=("qdiffusion",), presets=("W8A8",), samplers=(SAMPLER,),
                        reconstruction=ReconstructionConfig(gptq_target_damp=3e-5))
    assert "--recon-gptq-target-damp 3e-05" in tuned.command()


def test_a_gptq_target_prior_other_than_the_default_is_named_in_the_command_and_parsed_back():
    """A bench of the zero-prior W* (tadq before gptq_target_prior) regenerates with the prior spelled out, and the
    flag it writes is one ``tadq bench`` reads back into the same reconstruction."""
    from tadq.cli.bench import _reconstruction

    zero = BenchConfig(methods=("qdiffusion",), presets=("W8A8",), samplers=(SAMPLER,),
                       reconstruction=ReconstructionConfig(gptq_target_prior="zero"))
    assert "--recon-gptq-target-prior zero" in zero.command()
    assert "--recon-gptq-target-prior" not in BenchConfig(methods=("qdiffusion",), presets=("W8A8",),
                                                          samplers=(SAMPLER,)).command()
    assert _reconstruction(None, None, None, gptq_target_prior="zero") == zero.reconstruction
