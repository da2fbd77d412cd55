"""What ``tadq bench`` measures: a matrix of methods × presets × samplers, as one frozen, validated config.

The bench is the main job (``tadq.experiments.run``) repeated per sampler, so most fields map onto ``RunConfig``;
the matrix
itself (which methods, presets and samplers) is named here, with a full default and a ``quick`` one that finishes
on a 2-core CPU in well under an hour when the base models are already on disk.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tadq.config import DEFAULT_FP_LAYERS, CalibrationConfig, ReconstructionConfig
from tadq.experiments.rows import method_names
from tadq.experiments.run import RunConfig
from tadq.experiments.run_checks import BENCH_SAMPLES, check_method_names
from tadq.quant.qscheme import preset_key
from tadq.sampling import SamplerConfig

__all__ = ["BEST_STACK", "BenchConfig", "default_methods", "matrix", "parse_sampler", "quick_methods",
           "sampler_name"]

# the strongest tadq stack in this release (TAC + TCEC on Q-Diffusion); a name in the method registry
BEST_STACK = "tac+tcec"
_TADQ_METHODS = ("naive", "qdiffusion", "ptqd", "tac", "tcec", BEST_STACK)
_QUICK_METHODS = ("naive", "qdiffusion", "ptqd", "tac", "tcec")
_SAMPLER = re.compile(r"^(?P<kind>ddim|ddpm|euler-ancestral|euler|dpmsolver\+\+|flow-euler)(?P<order>(?<=\+\+)[12])?"
                      r"(?:-eta(?P<eta>[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?"
                      r"(?:-shift(?P<shift>[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?(?P<uniform>-uniform)?"
                      r"(?:@(?P<steps>[0-9]+))?$")
_SAMPLER_NAMES = ("ddim-eta<η> (ddim-eta0, ddim-eta1), ddpm, euler, euler-ancestral, dpmsolver++ (2M; dpmsolver++1 "
                  "for first order), flow-euler (flow-euler-shift<s> to set the shift, -uniform for FluxPipeline's "
                  "σ grid)")


def parse_sampler(text: str, steps: int = 50) -> SamplerConfig:
    """A sampler from its bench name: ``ddim-eta0``, ``ddim-eta1``, ``ddim-eta0.5``, ``ddpm``, ``euler``,
    ``euler-ancestral``, ``dpmsolver++`` (2M; ``dpmsolver++1`` first order), ``flow-euler`` (``flow-euler-shift3``
    sets the shift, a ``-uniform`` suffix FluxPipeline's σ grid); ``@N`` sets the step count (``ddim-eta0@20``,
    ``euler@30``), otherwise ``steps``."""
    match = _SAMPLER.match(text.strip().lower())
    if match is None:
        raise ValueError(f"unknown sampler {text!r}; use {_SAMPLER_NAMES}, optionally with @<steps> "
                         "(ddim-eta0@20, euler@30)")
    kind = match["kind"]
    if match["eta"] is not None and kind != "ddim":
        raise ValueError(f"sampler {text!r}: only ddim takes an eta ({kind}'s noise is fixed by its update rule)")
    if (match["shift"] is not None or match["uniform"] is not None) and kind != "flow-euler":
        raise ValueError(f"sampler {text!r}: only flow-euler takes a shift or a σ grid")
    order = None if match["order"] is None else int(match["order"])
    shift = None if match["shift"] is None else float(match["shift"])
    return SamplerConfig(kind=kind, num_steps=int(match["steps"] or steps), eta=float(match["eta"] or 0.0),
                         order=order, shift=shift, flow_sigmas="uniform" if match["uniform"] else None)


def _number(value: float) -> str:
    """``value`` as ``parse_sampler`` reads it back exactly: every digit of its shortest repr, never an exponent
    (``:g`` rounds to six digits, and ``1e-05`` is not a sampler name), no trailing ``.0``."""
    text = format(Decimal(repr(float(value))), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def sampler_name(sampler: SamplerConfig, with_steps: bool = False) -> str:
    """The bench name of ``sampler`` (inverse of ``parse_sampler``: the name parses back to an equal config)."""
    if sampler.kind == "ddim":
        name = f"ddim-eta{_number(sampler.eta)}"
    elif sampler.kind == "dpmsolver++":
        name = "dpmsolver++" if sampler.order == 2 else f"dpmsolver++{sampler.order}"
    elif sampler.kind == "flow-euler":
        name = "flow-euler" + ("" if sampler.shift is None else f"-shift{_number(sampler.shift)}") \
            + ("" if sampler.flow_sigmas is None else f"-{sampler.flow_sigmas}")
    else:
        name = sampler.kind
    return f"{name}@{sampler.num_steps}" if with_steps else name


def _registered(names: tuple[str, ...]) -> tuple[str, ...]:
    known = method_names()
    return tuple(name for name in names if name in known)


def default_methods() -> tuple[str, ...]:
    """The full matrix's methods, read from the registry: tadq's rows and stacks, the first TFMQ row, every peer."""
    from tadq.experiments.rows.peers import PEERS

    known = method_names()
    tfmq = tuple(name for name in known if name.startswith("tfmq"))[:1]  # the paper's variant, registered first
    return _registered(_TADQ_METHODS) + tfmq + _registered(tuple(PEERS))


def quick_methods() -> tuple[str, ...]:
    """The quick matrix's methods: no peers, no TFMQ (each TFMQ preset is a new reconstruction)."""
    return _registered(_QUICK_METHODS)


@dataclass(frozen=True)
class BenchConfig:
    """The bench matrix and how each cell is measured.

    Args:
        model: a local diffusers folder, or ``None`` for the shipped digits DDPM.
        methods: row names of ``tadq.experiments.rows`` (default: the full matrix, ``default_methods()``).
        presets: quantization presets (each method gets one row per preset, or a "not supported" row).
        samplers: deployment samplers; each gets its own calibration data, base models and table.
        num_samples: samples per row (FD-digits needs about 1000; PSNR/SSIM vs FP far fewer).
        eval_seed: evaluation noise seed shared by FP and every row.
        calibration: calibration settings; its ``sampler`` is replaced by each bench sampler, and
            ``num_steps_kept`` is clipped to that sampler's steps.
        reconstruction: block-reconstruction settings of the Q-Diffusion-based rows.
        fp_layers: layers every row keeps in floating point (``tadq.config.FP_LAYER_PRESETS``; ``tadq run``'s).
        batch_size: sampling batch.
        out_dir: bench folder: ``<out>/<sampler key>/`` per sampler, ``report.html|md|json`` at the top.
        models_dir: where quantized base models are kept and reused (default ``<out>/models``); base keys include
            the calibration data, so one folder serves every sampler (``runs/main/models`` reuses ``tadq run``'s).
        cache_dir: calibration-data cache.
        grid_samples: samples shown per grid panel.
        threads: torch CPU threads the bench ran with (0 = torch's default); recorded in the regenerating command.
        quick: whether this is the ``--quick`` matrix (said in the report; the command spells every flag out).
        device: where every model runs (``cpu``, ``cuda``, ``cuda:N``, ``mps``).
        dtype: compute dtype of the FP model (float32, bfloat16, float16).
        guidance_scale: classifier-free guidance of a conditional model (``None``: the model's default, as
            ``tadq run``).
        calibration_prompts, evaluation_prompts, negative_prompt: a text-to-image folder's disjoint prompt sets and
            unconditional branch (``tadq run``'s; the shipped t2i model brings its own).
        prompt_files: the files the two prompt sets were read from (calibration, evaluation), named in the
            regenerating command.
        distilled_guidance: the scale a Flux transformer embeds (``None``: the pipeline's default).
        labels, null_class: a class-conditional model's label mode and "no class" label (``tadq run``'s
            ``--labels``/``--null-class``; ``None``: the model's default).
        force_foreign: whether the bench was told to write into folders tadq did not write (``--force-foreign``);
            the regenerating command repeats it, or its rerun would be refused where the first run was allowed.
    """

    model: str | None = None
    methods: tuple[str, ...] = field(default_factory=default_methods)
    presets: tuple[str, ...] = ("W8A8", "W4A8", "W4A4", "W4A16")
    samplers: tuple[SamplerConfig, ...] = (SamplerConfig(kind="ddim", num_steps=50, eta=0.0),
                                           SamplerConfig(kind="ddim", num_steps=50, eta=1.0))
    num_samples: int = 1000
    eval_seed: int = 1000
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    fp_layers: str = DEFAULT_FP_LAYERS
    batch_size: int = 250
    out_dir: str = "runs/bench"
    models_dir: str | None = None
    cache_dir: str = ".cache/tadq"
    grid_samples: int = 64
    threads: int = 0
    quick: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    guidance_scale: float | None = None
    calibration_prompts: tuple[str, ...] = ()
    evaluation_prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    prompt_files: tuple[str | None, str | None] = (None, None)
    distilled_guidance: float | None = None
    labels: str | None = None
    null_class: int | None = None
    force_foreign: bool = False

    def __post_init__(self) -> None:
        if not self.methods or not self.presets or not self.samplers:
            raise ValueError("the bench matrix needs at least one method, one preset and one sampler")
        # each name as the preset table spells it (ValueError naming the presets): rows, files and the measured best
        # rows are keyed by it, and " w4a8" passed the check, stored as given
        object.__setattr__(self, "presets", tuple(preset_key(name) for name in self.presets))
        check_method_names(self.methods, method_names())
        keys = [s.key for s in self.samplers]
        if len(set(keys)) != len(keys):
            raise ValueError(f"samplers repeat: {keys}")
        if len(set(self.methods)) != len(self.methods) or len(set(self.presets)) != len(self.presets):
            raise ValueError("methods and presets must not repeat")
        if self.models_dir and Path(self.models_dir).resolve() == Path(self.out_dir).resolve():
            # the bench marks the folder as its own first: each base model was quantized, then refused when saved
            # into a 'bench' folder, and its rows reported as "not supported"
            raise ValueError(f"models_dir {self.models_dir!r} is the bench folder itself; leave it unset (the "
                             f"default, {Path(self.out_dir) / 'models'}) or give a folder of its own")
        for sampler in self.samplers:
            self.run_config(sampler)  # every per-sampler RunConfig must be valid before anything runs

    @property
    def models_folder(self) -> Path:
        return Path(self.models_dir) if self.models_dir else Path(self.out_dir) / "models"

    def sampler_dir(self, sampler: SamplerConfig) -> Path:
        return Path(self.out_dir) / sampler.key

    def run_config(self, sampler: SamplerConfig) -> RunConfig:
        """The main job's config for one sampler of the matrix (calibrated on that sampler, as run.py requires)."""
        calibration = dataclasses.replace(self.calibration, sampler=sampler,
                                          num_steps_kept=min(self.calibration.num_steps_kept, sampler.num_steps))
        return RunConfig(model=self.model, presets=self.presets, methods=self.methods,
                         reconstruction=self.reconstruction, num_samples=self.num_samples, sampler=sampler,
                         eval_seed=self.eval_seed, calibration=calibration, batch_size=self.batch_size,
                         out_dir=str(self.sampler_dir(sampler)), cache_dir=self.cache_dir,
                         grid_samples=self.grid_samples, device=self.device, dtype=self.dtype,
                         fp_layers=self.fp_layers, guidance_scale=self.guidance_scale,
                         calibration_prompts=self.calibration_prompts, evaluation_prompts=self.evaluation_prompts,
                         negative_prompt=self.negative_prompt, distilled_guidance=self.distilled_guidance,
                         labels=self.labels, null_class=self.null_class)

    def command(self) -> str:
        """The ``tadq bench`` command line that reproduces this config (and so regenerates its report)."""
        steps = {s.num_steps for s in self.samplers}
        same_steps = len(steps) == 1
        # --quick only sets defaults, all spelled out below, but the report says which matrix it is: keep saying it
        args = ["tadq", "bench", *(["--quick"] if self.quick else [])]
        if self.model:
            args += ["--model", self.model]
        args += ["--methods", ",".join(self.methods), "--presets", ",".join(self.presets),
                 "--samplers", ",".join(sampler_name(s, not same_steps) for s in self.samplers)]
        if same_steps:
            args += ["--steps", str(steps.pop())]
        args += ["--num-samples", str(self.num_samples), "--seed", str(self.eval_seed),
                 "--calib-seed", str(self.calibration.seed),
                 "--calib-trajectories", str(self.calibration.num_trajectories)]
        recon, default = self.reconstruction, ReconstructionConfig()
        for flag, name in (("--recon-iters", "weight_iters"), ("--recon-activation-iters", "activation_iters"),
                           ("--recon-batch-size", "batch_size")):
            if getattr(recon, name) != getattr(default, name):
                args += [flag, str(getattr(recon, name))]
        if recon.rounding != default.rounding:
            args += ["--recon-rounding", recon.rounding]
        if recon.gptq_target_damp != default.gptq_target_damp:  # None solved W* with gptq_damp: name that value
            args += ["--recon-gptq-target-damp", repr(recon.fp_output_damp)]
        if recon.gptq_target_prior != default.gptq_target_prior:
            args += ["--recon-gptq-target-prior", recon.gptq_target_prior]
        if self.fp_layers != DEFAULT_FP_LAYERS:
            args += ["--fp-layers", self.fp_layers]
        if self.batch_size != 250:
            args += ["--batch-size", str(self.batch_size)]
        args += ["--out", self.out_dir]
        if self.models_dir:
            args += ["--models-dir", self.models_dir]
        if self.cache_dir != ".cache/tadq":
            args += ["--cache-dir", self.cache_dir]
        if self.threads:
            args += ["--threads", str(self.threads)]
        if self.device != "cpu" or self.dtype != "float32":
            args += ["--device", self.device, "--dtype", self.dtype]
        if self.guidance_scale is not None:
            args += ["--guidance-scale", repr(self.guidance_scale)]
        for flag, file in zip(("--calib-prompts", "--eval-prompts"), self.prompt_files, strict=True):
            if file is not None:
                args += [flag, file]
        if self.negative_prompt:
            args += ["--negative-prompt", self.negative_prompt]
        if self.distilled_guidance is not None:
            args += ["--distilled-guidance", repr(self.distilled_guidance)]
        if self.labels is not None:
            args += ["--labels", self.labels]
        if self.null_class is not None:
            args += ["--null-class", str(self.null_class)]
        if self.force_foreign:
            args.append("--force-foreign")
        return shlex.join(args)


def matrix(name: str) -> dict[str, object]:
    """The named matrix's ``BenchConfig`` fields: ``default`` (every method, preset, η = 0 and η = 1, 1000
    samples) or ``quick`` (naive, Q-Diffusion, PTQD, TAC, TCEC × W8A8, W4A8 × DDIM η = 0, 256 samples)."""
    if name == "default":
        return {"methods": default_methods(), "presets": ("W8A8", "W4A8", "W4A4", "W4A16"),
                "samplers": (SamplerConfig(kind="ddim", num_steps=50, eta=0.0),
                             SamplerConfig(kind="ddim", num_steps=50, eta=1.0)),
                "num_samples": BENCH_SAMPLES["default"]}
    if name == "quick":
        return {"methods": quick_methods(), "presets": ("W8A8", "W4A8"),
                "samplers": (SamplerConfig(kind="ddim", num_steps=50, eta=0.0),),
                "num_samples": BENCH_SAMPLES["quick"], "quick": True}
    raise ValueError(f"unknown bench matrix {name!r}; choose 'default' or 'quick'")
