"""``tadq quantize``: quantize a diffusers model and save the artefact (integer codes + diffusers layout)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tadq.cli.common import (
    CacheDir,
    DistilledGuidance,
    ForceForeign,
    Labels,
    NullClass,
    check_count_flags,
    check_seed_flags,
    check_steps_fit,
    class_conditions_for,
    console,
    fail_cleanly,
    hold_output,
    note,
    read_prompt_file,
    require_file,
    sampler_kind_flag,
    setup,
    torch_setup,
)
from tadq.cli.sample import Device, Dtype, Threads, Verbose
from tadq.fp_layers import DEFAULT_FP_LAYERS, fp_layer_roles

if TYPE_CHECKING:  # the library (and diffusers, torch with it) is imported by the functions: not for --help
    from tadq.config import QuantConfig
    from tadq.recipe import Recipe

__all__ = ["quantize_command", "QuantFlags", "resolve_config", "resolve_recipe", "check_flags", "parse_settings",
           "calibration_prompts"]

logger = logging.getLogger(__name__)
DEFAULT_PRESET = "W8A8"


@dataclass(frozen=True)
class QuantFlags:
    """Command-line values that override a ``QuantConfig``; ``None`` means "not given, keep the config's value".

    Args:
        preset: weight and activation schemes by preset name (W8A8, W4A8, W4A4, W4A16, W8A16, W8A8-WSYM,
            W4A8-FP8, W8A8-FP8; any with -G<n>: weights in blocks of n).
        method: ``naive``, ``qdiffusion`` or ``tfmq`` (TFMQ-DM on the Q-Diffusion base).
        correct: correction names in application order (``ptqd``, ``tac``, ``ibc``, ``ner``, ``tcec``); replaces
            the recipe's stack.
        sampler: calibration (= deployment) sampler kind.
        steps: calibration sampler steps (kept steps are capped at this).
        eta: calibration sampler η.
        calib_seed: calibration noise seed.
        calib_trajectories: FP trajectories recorded (samples per step are capped at this).
        exclude: fnmatch patterns of layers kept in FP.
        keep_fp_roles: adapter roles kept in FP.
        fp_layers: a key of ``FP_LAYER_PRESETS`` for the roles kept in FP (``None``: ``first_last`` for a recipe
            built from a preset, the file's own for ``--recipe``/``--config``); not with ``keep_fp_roles``.
        split_shortcut: Q-Diffusion shortcut splitting.
        quantize_attention: quantize the attention matmul operands.
        recon_iters: AdaRound iterations per unit (qdiffusion).
        recon_activation_iters: activation-step iterations per unit (qdiffusion).
        recon_rounding: weight rounding of block reconstruction (``adaround``, ``gptq``, ``gptq_adaround``).
    """

    preset: str | None = None
    method: str | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    calib_seed: int | None = None
    calib_trajectories: int | None = None
    exclude: tuple[str, ...] | None = None
    keep_fp_roles: tuple[str, ...] | None = None
    fp_layers: str | None = None
    split_shortcut: bool | None = None
    quantize_attention: bool | None = None
    recon_iters: int | None = None
    recon_activation_iters: int | None = None
    recon_rounding: str | None = None
    correct: tuple[str, ...] | None = None


def _given(**values) -> dict:
    return {key: value for key, value in values.items() if value is not None}


def _kept_roles(flags: QuantFlags, from_file: bool) -> tuple[str, ...] | None:
    """The roles kept in FP that the flags ask for (``None``: leave the file's own)."""
    if flags.fp_layers is not None and flags.keep_fp_roles is not None:
        raise ValueError("give --fp-layers or --keep-fp-role, not both")
    if flags.keep_fp_roles is not None:
        return flags.keep_fp_roles
    if flags.fp_layers is not None:
        return fp_layer_roles(flags.fp_layers)
    return None if from_file else fp_layer_roles(DEFAULT_FP_LAYERS)


def _check_kept_roles(model: Any, flags: QuantFlags) -> None:
    """``--keep-fp-role`` roles that ``model`` has no layer of are refused before calibration (they kept nothing)."""
    from tadq.quant.convert import check_roles_present
    from tadq.registry import adapter_for

    if flags.keep_fp_roles:
        check_roles_present(adapter_for(model).layers(model), flags.keep_fp_roles, "--keep-fp-role")


def _read_config(path: Path) -> QuantConfig:
    from tadq.config import QuantConfig, config_from_dict
    from tadq.safefiles import read_json_file

    require_file(path, "--config", "a QuantConfig JSON file")
    payload = read_json_file(path, "--config", strict_keys=True)
    if not (isinstance(payload, dict) and isinstance(payload.get("type"), str)
            and isinstance(payload.get("data"), dict)):
        raise ValueError(f"--config {path} is not a tadq config: expected an object with \"type\", \"version\" and "
                         "\"data\" (write one with tadq.config.config_to_dict)")
    try:
        config = config_from_dict(payload)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"--config {path}: {error}; compare with tadq.config.config_to_dict(QuantConfig())"
                         ) from error
    if not isinstance(config, QuantConfig):
        raise ValueError(f"--config {path} holds a {type(config).__name__}; expected a QuantConfig")
    return config


def resolve_config(config_file: Path | None, flags: QuantFlags) -> QuantConfig:
    """The config file (or the default preset) with every given flag applied; flags map one-to-one to fields.

    Calibration counts that a flag makes impossible (more kept steps than steps, more samples per step than
    trajectories) are capped rather than rejected, so ``--steps 10`` alone is enough.
    """
    from tadq.config import QuantConfig
    from tadq.quant.qscheme import preset, preset_key

    if config_file is not None:
        config = _read_config(config_file)
    else:
        config = QuantConfig.from_preset(flags.preset or DEFAULT_PRESET)
    calibration = config.calibration
    sampler = dataclasses.replace(calibration.sampler, **_given(kind=flags.sampler, num_steps=flags.steps,
                                                                  eta=flags.eta))
    trajectories = calibration.num_trajectories if flags.calib_trajectories is None else flags.calib_trajectories
    calibration = dataclasses.replace(
        calibration, sampler=sampler, num_trajectories=trajectories,
        num_steps_kept=min(calibration.num_steps_kept, sampler.num_steps),
        samples_per_step=min(calibration.samples_per_step, trajectories), **_given(seed=flags.calib_seed),
    )
    overrides = _given(method=flags.method, exclude=flags.exclude,
                       keep_fp_roles=_kept_roles(flags, from_file=config_file is not None),
                       split_shortcut=flags.split_shortcut, quantize_attention=flags.quantize_attention)
    recon = _given(weight_iters=flags.recon_iters, activation_iters=flags.recon_activation_iters,
                   rounding=flags.recon_rounding)
    if recon:
        overrides["reconstruction"] = dataclasses.replace(config.reconstruction, **recon)
    if flags.preset is not None:
        weights, activations = preset(flags.preset)
        overrides.update(weights=weights, activations=activations, preset_name=preset_key(flags.preset))
    return dataclasses.replace(config, calibration=calibration, **overrides)


METHOD_NAMES = ("naive", "qdiffusion", "tfmq")


def _check_method_name(name: str) -> None:
    if name not in METHOD_NAMES:
        raise ValueError(f"--method must be one of {list(METHOD_NAMES)}, got {name!r}")


def check_flags(recipe_file: Path | None, config_file: Path | None, flags: QuantFlags) -> None:
    """The checks of ``resolve_recipe`` that read no file and need no torch: --recipe with --config, --fp-layers
    with --keep-fp-role or an unknown key, an unknown --method or --preset, --eta out of range (for the --sampler
    when given). `tadq quantize` calls it before it imports torch; ``resolve_recipe`` calls it first."""
    from tadq.names import check_eta, preset_key

    if recipe_file is not None and config_file is not None:
        raise ValueError("give --recipe or --config, not both (a recipe holds everything a QuantConfig does)")
    _kept_roles(flags, from_file=recipe_file is not None or config_file is not None)
    if flags.method is not None:
        _check_method_name(flags.method)
    if flags.preset is not None:
        preset_key(flags.preset)
    if flags.eta is not None:
        check_eta(flags.eta, flags.sampler)


def _method(current: Any, name: str) -> Any:
    """The method config named ``name``, keeping the current reconstruction settings where it has them."""
    from tadq.recipe import NaiveMethod, QDiffusionMethod
    from tadq.tfmq import TFMQMethod

    _check_method_name(name)
    kinds = {"naive": NaiveMethod, "qdiffusion": QDiffusionMethod, "tfmq": TFMQMethod}
    if isinstance(current, kinds[name]):
        return current
    return NaiveMethod() if name == "naive" else kinds[name](reconstruction=current.reconstruction)


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """``--set path=value`` items → {dotted path: JSON value (a bare word stays a string)}."""
    from tadq.utils import unique_keys

    settings: dict[str, Any] = {}
    for item in items or ():
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--set {item!r}: write FIELD.PATH=VALUE, e.g. method.reconstruction.weight_iters=20")
        try:
            value = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError:
            value = text
        except ValueError as error:  # a key given twice in one object: the last would silently win
            raise ValueError(f"--set {item!r}: {error}") from error
        path = path.strip()
        if path in settings and settings[path] != value:  # the last would silently win
            raise ValueError(f"--set {path} given twice with different values ({settings[path]!r}, {value!r}); "
                             "give it once")
        settings[path] = value
    return settings


def resolve_recipe(recipe_file: Path | None, config_file: Path | None, flags: QuantFlags,
                   settings: dict[str, Any] | None = None) -> Recipe:
    """The recipe file (or a ``--config`` QuantConfig, or the default preset) with every flag, then every
    ``--set``, applied; the result validates as a whole (a flag that breaks it fails here, before any work)."""
    from tadq.quant.qscheme import preset, preset_key
    from tadq.recipe import Recipe, load_recipe, override_recipe
    from tadq.recipe_presets import correction_configs

    check_flags(recipe_file, config_file, flags)
    if recipe_file is not None:
        recipe = load_recipe(recipe_file)
    elif config_file is not None:
        recipe = Recipe.from_quant_config(_read_config(config_file))
    else:
        recipe = Recipe.from_preset(flags.preset or DEFAULT_PRESET)
    calibration = recipe.calibration
    sampler = dataclasses.replace(recipe.sampler, **_given(kind=flags.sampler, num_steps=flags.steps, eta=flags.eta))
    trajectories = calibration.num_trajectories if flags.calib_trajectories is None else flags.calib_trajectories
    calibration = dataclasses.replace(
        calibration, sampler=sampler, num_trajectories=trajectories,
        num_steps_kept=min(calibration.num_steps_kept, sampler.num_steps),
        samples_per_step=min(calibration.samples_per_step, trajectories), **_given(seed=flags.calib_seed),
    )
    deployments = (dataclasses.replace(recipe.deployments[0], sampler=sampler), *recipe.deployments[1:])
    from_file = recipe_file is not None or config_file is not None
    changes = _given(exclude=flags.exclude, keep_fp_roles=_kept_roles(flags, from_file),
                     split_shortcut=flags.split_shortcut, quantize_attention=flags.quantize_attention)
    method = recipe.method if flags.method is None else _method(recipe.method, flags.method)
    recon = _given(weight_iters=flags.recon_iters, activation_iters=flags.recon_activation_iters,
                   rounding=flags.recon_rounding)
    if recon:
        if not hasattr(method, "reconstruction") or type(method).__name__ == "NaiveMethod":
            raise ValueError("--recon-iters/--recon-activation-iters/--recon-rounding apply to --method qdiffusion "
                             "or tfmq")
        method = dataclasses.replace(method, reconstruction=dataclasses.replace(method.reconstruction, **recon))
    if flags.preset is not None:
        weights, activations = preset(flags.preset)
        changes.update(weights=weights, activations=activations, preset_name=preset_key(flags.preset))
    if flags.correct is not None:
        changes["corrections"] = correction_configs(flags.correct, calibration.seed)
    recipe = dataclasses.replace(recipe, method=method, calibration=calibration, deployments=deployments,
                                 **changes)
    return override_recipe(recipe, settings or {}, flag="--set")


def with_pipeline_sampler(recipe: Recipe, pipe: Any) -> Recipe:
    """``recipe`` with its calibration and deployment sampler as the pipeline's own call runs it (Flux: its uniform
    σ grid, and the resolution-dependent shift of a ``use_dynamic_shifting`` scheduler); unchanged otherwise
    (another pipeline or sampler, or the grid and shift already given)."""
    from tadq.pipelines.quantized import pipeline_sampler

    sampler = pipeline_sampler(pipe, recipe.sampler)
    if sampler == recipe.sampler:
        return recipe
    note(f"sampler {sampler.key}: the pipeline's own flow grid and shift (recorded in the recipe)")
    calibration = dataclasses.replace(recipe.calibration, sampler=sampler)
    deployments = (dataclasses.replace(recipe.deployments[0], sampler=sampler), *recipe.deployments[1:])
    return dataclasses.replace(recipe, calibration=calibration, deployments=deployments)


def calibration_prompts(model_dir: Path | None, given: list[str] | None, file: Path | None) -> list[str] | None:
    """The calibration prompts (``--calib-prompt`` then the lines of ``--calib-prompts``) of a text-to-image
    pipeline, checked against its tokenizers; ``None`` for a denoiser folder. Refuses prompts for a model that
    takes none and a pipeline without prompts, before anything is loaded."""
    from tadq.pipelines import is_pipeline_folder
    from tadq.pipelines.components import PIPELINE_COMPONENTS, unsupported_pipeline_note
    from tadq.pipelines.prompts import check_prompt_lengths
    from tadq.pipelines.quantized import check_drivable_scheduler

    if model_dir is not None and not model_dir.exists():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    # a prompt file without a prompt is refused even beside --calib-prompt: it is a mistake, not an empty addition
    prompts = list(given or []) + list(read_prompt_file(file, "--calib-prompts"))
    pipeline = model_dir is not None and is_pipeline_folder(model_dir)
    if not pipeline:
        if prompts or file is not None:
            raise ValueError(f"--calib-prompt/--calib-prompts given, but {model_dir or 'the shipped model'} is not a "
                             "text-to-image pipeline (model_index.json of a "
                             f"{' or '.join(sorted(PIPELINE_COMPONENTS))}): {unsupported_pipeline_note(model_dir)}")
        return None
    if not prompts:
        raise ValueError(f"{model_dir} is a text-to-image pipeline: give calibration prompts with --calib-prompt "
                         "(repeat) or --calib-prompts FILE")
    check_prompt_lengths(model_dir, prompts, "calibration prompt")
    check_drivable_scheduler(model_dir)
    return prompts


def _kib(size: int) -> str:
    return f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.2f} MiB"


def quantize_command(
    out: Annotated[Path, typer.Option(help="Artefact folder to write (written whole, or not at all).")],
    model_dir: Annotated[Path | None, typer.Argument(help="Diffusers model folder (default: shipped DDPM).")] = None,
    preset_name: Annotated[str | None, typer.Option(
        "--preset", help="W8A8, W4A8, W4A4, W4A16, W8A16, W8A8-WSYM (symmetric 8-bit weights: no "
        "offset correction on the integer backends, docs/backends.md) or W4A8-FP8 / W8A8-FP8 (FP8 E4M3 activations, "
        "a simulation on the fake backend; docs/methods/notation.md); any of them with -G<n> (W4A8-G128): one "
        f"weight step per block of n weights of a row (fake backend only); default {DEFAULT_PRESET}.")] = None,
    method: Annotated[str | None, typer.Option(help="naive, qdiffusion or tfmq (default: the recipe's, else naive).")
                      ] = None,
    correct: Annotated[list[str] | None, typer.Option(
        help="Corrections in application order, e.g. tac,tcec (ptqd, tac, ibc, ner, tcec); fitted for the sampler. "
             "Repeat or comma-separate: --correct tac --correct tcec is tac,tcec.")
    ] = None,
    recipe_file: Annotated[Path | None, typer.Option(
        "--recipe", help="Recipe JSON (docs/recipes.md; recipes/ has the README's rows); the flags override it.")
    ] = None,
    set_fields: Annotated[list[str] | None, typer.Option(
        "--set", help="Override one recipe field, FIELD.PATH=JSON (e.g. method.reconstruction.weight_iters=20, "
                      "corrections.0.num_samples=64); repeat. Applied last.")] = None,
    sampler: Annotated[str | None, typer.Option(
        help="Deployment sampler (calibrated on and corrections fitted for): ddim, ddpm, euler, euler-ancestral, "
             "dpmsolver++ (2M) or flow-euler (flow-matching models).", callback=sampler_kind_flag)] = None,
    steps: Annotated[int | None, typer.Option(help="Deployment sampler steps (recipe's, else 50).")] = None,
    eta: Annotated[float | None, typer.Option(help="Deployment DDIM eta (recipe's, else 0).")] = None,
    calib_seed: Annotated[int | None, typer.Option(help="Calibration noise seed (0).")] = None,
    calib_trajectories: Annotated[int | None, typer.Option(help="FP trajectories recorded (256).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(
        help="Classifier-free guidance of the deployment: calibration trajectories are sampled and corrections "
             "fitted at it (text-to-image pipelines; same as --set deployments.0.guidance_scale=G).")] = None,
    distilled_guidance: DistilledGuidance = None,
    calib_prompt: Annotated[list[str] | None, typer.Option(
        "--calib-prompt", help="Calibration prompt of a text-to-image pipeline (repeat; trajectory i gets prompt i "
                               "mod the count). Keep them apart from the prompts you evaluate with.")] = None,
    calib_prompts: Annotated[Path | None, typer.Option(
        "--calib-prompts", help="Text file of calibration prompts, one per line (blank lines skipped).")] = None,
    labels: Labels = None,
    null_class: NullClass = None,
    exclude: Annotated[list[str] | None, typer.Option(help="fnmatch pattern of layers kept in FP (repeat).")] = None,
    keep_fp_role: Annotated[list[str] | None, typer.Option(
        help="Adapter role kept in FP (repeat; replaces --fp-layers).")] = None,
    fp_layers: Annotated[str | None, typer.Option(
        help="Layers kept in FP, a key of FP_LAYER_PRESETS: first_last (input and output convs; the default for a "
             "recipe built from --preset), none (every conv/linear quantized) or first_last_time (+ the "
             "time-embedding MLP). Default for --recipe/--config: theirs.")] = None,
    split_shortcut: Annotated[bool | None, typer.Option(
        "--split-shortcut/--no-split-shortcut", help="Q-Diffusion shortcut splitting (default off).")] = None,
    quantize_attention: Annotated[bool | None, typer.Option(
        "--quantize-attention/--no-quantize-attention", help="Quantize attention q, k, v, softmax (default off).")
    ] = None,
    recon_iters: Annotated[int | None, typer.Option(
        help="AdaRound iterations per unit (qdiffusion with adaround rounding; 1000).")] = None,
    recon_activation_iters: Annotated[int | None, typer.Option(
        help="Activation-step iterations per unit (qdiffusion; 0: none, the default).")] = None,
    recon_rounding: Annotated[str | None, typer.Option(
        help="Weight rounding of block reconstruction (qdiffusion): gptq (inverse-Hessian compensation onto the FP "
             "layer outputs, no iterations; the default), adaround (learned, about 5x more CPU) or "
             "gptq_adaround.")] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="QuantConfig JSON (config_to_dict format; older form of --recipe); flags override it.")
    ] = None,
    cache_dir: CacheDir = Path(".cache/tadq"),
    checkpoint: Annotated[Path | None, typer.Option(
        help="Reconstruction checkpoint file (qdiffusion): written after every unit, resumed from.")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing tadq artefact in --out (never a folder tadq did not write; see --force-foreign).")
    ] = False,
    force_foreign: ForceForeign = False,
    seed: Annotated[int, typer.Option(help="Seed of torch's global generator (calibration uses --calib-seed).")] = 0,
    threads: Threads = 0,
    device: Device = "cpu",
    dtype: Dtype = "float32",
    verbose: Verbose = False,
) -> None:
    """Quantize a model as a recipe says (calibrated on its own FP trajectories, corrections fitted for the
    deployment sampler) and save the artefact with its recipe; prints artefact vs FP size."""
    from tadq.fsguard import check_output_dir, check_output_file, check_writable_dir
    from tadq.zoo.paths import shipped_model_path

    setup(verbose, threads)
    with fail_cleanly():
        check_count_flags(steps=steps, calib_trajectories=calib_trajectories)
        # the range every --seed takes: -1 went to torch.manual_seed as is, 2**64 failed there in "Overflow when
        # unpacking long long" after the recipe was resolved; refused before torch is imported
        check_seed_flags(seed=seed, calib_seed=calib_seed)
        flags = QuantFlags(preset=preset_name, method=method, sampler=sampler, steps=steps, eta=eta,
                           calib_seed=calib_seed, calib_trajectories=calib_trajectories,
                           exclude=tuple(exclude) if exclude else None,
                           keep_fp_roles=tuple(keep_fp_role) if keep_fp_role else None,
                           fp_layers=None if fp_layers is None else fp_layers.strip().lower(),
                           split_shortcut=split_shortcut, quantize_attention=quantize_attention,
                           recon_iters=recon_iters, recon_activation_iters=recon_activation_iters,
                           recon_rounding=None if recon_rounding is None else recon_rounding.strip().lower(),
                           # every --correct, in order: a single-valued option kept only the last one given, so
                           # --correct tac --correct tcec quantized with TCEC alone, without a word
                           correct=None if correct is None else tuple(c.strip().lower() for given in correct
                                                                      for c in given.split(",") if c.strip()))
        settings = parse_settings(set_fields)
        check_flags(recipe_file, config_file, flags)  # resolve_recipe checks them again, after reading the files
        torch_device, torch_dtype = torch_setup(threads, device, dtype)
        import torch

        from tadq.api import check_method_dtype, quantize
        from tadq.experiments.workload import decoder_component
        from tadq.io import is_quantized_artefact, save_quantized
        from tadq.io.save import check_copyable_components
        from tadq.models import load_pipeline_parts, load_scheduler
        from tadq.pipelines.components import DISTILLED_GUIDANCE_PIPELINES, read_model_index
        from tadq.sampling import command_sampler_kind

        source = model_dir if model_dir is not None else shipped_model_path()
        if model_dir is not None and is_quantized_artefact(model_dir):  # it said "unet holds no safetensors weights"
            raise ValueError(f"{model_dir} is a tadq artefact (already quantized: tadq_config.json); quantize the FP "
                             "model folder it was made from (--recipe ARTEFACT/tadq_recipe.json repeats its recipe)")
        if sampler is None and recipe_file is None and config_file is None and not any(
                "sampler" in path for path in settings):  # the preset's DDIM cannot drive a flow-matching model
            kind = command_sampler_kind(load_scheduler(source))
            if kind != "ddim":  # the presets' sampler, which command_sampler_kind keeps for a discrete schedule
                note(f"sampler {kind}: {source} is a flow-matching model (--sampler to choose another)")
                flags = dataclasses.replace(flags, sampler=kind)
        recipe = resolve_recipe(recipe_file, config_file, flags, settings)
        if source.exists():  # the folder's own error otherwise, from the loader
            check_steps_fit(source, recipe.sampler.num_steps,
                            "--steps" if steps is not None else "the recipe's sampler steps")
        given_scale = settings.get("deployments.0.guidance_scale")  # the flag would silently win over it
        if guidance_scale is not None and given_scale is not None and given_scale != guidance_scale:
            raise ValueError(f"--guidance-scale {guidance_scale:g} and --set deployments.0.guidance_scale="
                             f"{given_scale} disagree; give one")
        if guidance_scale is not None:
            deployment = dataclasses.replace(recipe.deployments[0], guidance_scale=guidance_scale)
            recipe = dataclasses.replace(recipe, deployments=(deployment, *recipe.deployments[1:]))
        check_method_dtype(recipe.quant_config(), torch_dtype, recipe)  # --dtype bfloat16 --method qdiffusion:
        # refused before the model is loaded
        prompts = calibration_prompts(model_dir, calib_prompt, calib_prompts)
        if prompts is not None:  # before the pipeline's components are read
            from tadq.pipelines.quantized import check_sampler_family

            check_sampler_family(model_dir, recipe.sampler)
        # every path first: a refused --out or an unwritable cache must not cost a whole quantization
        check_output_dir(out, kind="artefact", overwrite=overwrite, force_foreign=force_foreign, inputs=[source])
        check_writable_dir(cache_dir, "--cache-dir", inputs=[source], force_foreign=force_foreign)
        if cache_dir.resolve() == out.resolve() or out.resolve() in cache_dir.resolve().parents:
            # the cache would create --out before the save, which then finds a folder without tadq's marker
            raise ValueError(f"--cache-dir {cache_dir} lies in --out {out}, which the artefact replaces whole; "
                             "choose a cache folder outside it")
        if checkpoint is not None:
            check_output_file(checkpoint, what="--checkpoint", inputs=[source, out], force_foreign=force_foreign)
        hold_output(out)
        if model_dir is not None and (model_dir / "model_index.json").is_file():  # its components are copied
            check_copyable_components(model_dir)
        if distilled_guidance is None:  # the recipe's (--recipe of a Flux artefact, --set deployments.0...)
            distilled_guidance = recipe.deployments[0].distilled_guidance
        distilled_model = prompts is not None and read_model_index(model_dir)["_class_name"] in \
            DISTILLED_GUIDANCE_PIPELINES  # Flux: samples without classifier-free guidance, embeds its own scale
        if distilled_guidance is not None and not distilled_model:
            raise ValueError(f"--distilled-guidance (or the recipe's deployments.0.distilled_guidance) is the scale "
                             f"a Flux transformer embeds; {source} is not a FluxPipeline folder (use "
                             "--guidance-scale, classifier-free guidance)")
        if prompts is not None and (labels is not None or null_class is not None):
            raise ValueError(f"--labels/--null-class are for class-conditional models; {model_dir} is a "
                             "text-to-image pipeline, conditioned by --calib-prompt")
        if prompts is not None:
            from tadq.pipelines.quantized import check_pipeline_guidance

            check_pipeline_guidance(recipe.guidance_scale)  # [0, 1): not what diffusers means by it
            unused = len(prompts) - recipe.calibration.num_trajectories
            if unused > 0:
                logger.warning("%d calibration prompts for %d calibration trajectories (trajectory i gets prompt i "
                               "mod the count): the last %d prompts are not used; raise --calib-trajectories to "
                               "use them", len(prompts), recipe.calibration.num_trajectories, unused)
        torch.manual_seed(seed)
        if prompts is None:
            model, scheduler = load_pipeline_parts(model_dir)
            _check_kept_roles(model, flags)
            given_scale = guidance_scale if guidance_scale is not None else (
                recipe.guidance_scale if recipe.guidance_scale != 1.0 else None)  # None: the model's default
            setting = class_conditions_for(model, source, "quantize", labels=labels, null_class=null_class,
                                           guidance_scale=given_scale)
            conditions = None
            if setting is not None:  # calibrated and fitted on labels from the calibration seed, at its guidance
                conditions = setting.source
                deployment = dataclasses.replace(recipe.deployments[0], guidance_scale=setting.guidance_scale,
                                                 null_class=setting.null_class)
                recipe = dataclasses.replace(recipe, deployments=(deployment, *recipe.deployments[1:]))
                note(f"class-conditional {type(model).__name__}: labels {setting.labels} of "
                                  f"{setting.num_classes}, null class {setting.null_class}, guidance "
                                  f"{setting.guidance_scale:g}"
                     + (f", {setting.guidance_origin}" if setting.guidance_origin else "")
                     + " (recorded in the artefact's recipe)")
            qmodel = quantize(model, scheduler, recipe, cache_dir=cache_dir, checkpoint=checkpoint,
                              device=torch_device, dtype=torch_dtype, conditions=conditions)
            # a class-conditional or latent pipeline (DiT + VAE, LDM + VQ-VAE) keeps its other components, so the
            # artefact's samples can be decoded (an unconditional latent model's decoder was left behind, and its
            # artefact's latents were written as images)
            pipeline = model_dir is not None and (model_dir / "model_index.json").is_file() and (
                setting is not None or decoder_component(model_dir) is not None)
            size = save_quantized(qmodel.to("cpu"), out, scheduler, overwrite=overwrite, force_foreign=force_foreign,
                                  pipeline_source=model_dir if pipeline else None)
        else:
            from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline
            from tadq.pipelines.components import pipeline_denoiser
            from tadq.pipelines.prompts import prompt_encoder_for

            if recipe.guidance_scale == 1.0 and not distilled_model:
                logger.warning("calibrating %s without classifier-free guidance (the recipe's deployment guidance "
                               "is 1.0); text-to-image pipelines are usually sampled at 5-8: --set "
                               "deployments.0.guidance_scale=7.5", model_dir)
            pipe = load_fp_pipeline(model_dir)
            _check_kept_roles(pipeline_denoiser(pipe), flags)
            recipe = with_pipeline_sampler(recipe, pipe)
            conditions = PromptConditions(prompt_encoder_for(pipe, distilled_guidance=distilled_guidance), prompts)
            distilled = getattr(conditions.encoder, "distilled_guidance", None)
            if distilled is not None:  # Flux: the embedded scale the tables are fitted at, kept with them
                deployment = dataclasses.replace(recipe.deployments[0], distilled_guidance=distilled)
                recipe = dataclasses.replace(recipe, deployments=(deployment, *recipe.deployments[1:]))
            qmodel = quantize(pipeline_denoiser(pipe), pipe.scheduler, recipe, cache_dir=cache_dir,
                              checkpoint=checkpoint, device=torch_device, dtype=torch_dtype, conditions=conditions)
            size = save_pipeline(qmodel.to("cpu"), model_dir, out, overwrite=overwrite, force_foreign=force_foreign)
    quantized = sum(plan.quantized for plan in qmodel.plans)
    stack = "" if recipe.corrections else ", no corrections"
    console.print(f"saved {out}: {recipe.describe()}{stack} ({recipe.sampler.key}), {quantized} of "
                  f"{len(qmodel.plans)} layers quantized")
    console.print(f"artefact {_kib(size.weights_bytes)} (header {_kib(size.header_bytes)}) vs FP "
                  f"{_kib(size.fp_bytes)}: {size.ratio:.3f}x")
