"""``tadq zoo``: (re)train the shipped models (digits and photos DDPMs, the text-to-image digits model, the
class-conditional DiT) and the classifiers behind FD-digits and FD-photos."""

from __future__ import annotations

import importlib
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from tadq.cli.common import ForceForeign, console, fail_cleanly, hold_output, setup, torch_setup

zoo_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="Train the shipped models (digits and photos DDPMs, the text-to-image digits model, "
                           "classifiers).")

SHIPPED = Path(__file__).resolve().parents[1] / "zoo" / "weights"


Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Train again into a folder that already holds a finished model of the same kind (the "
                        "default --out is the shipped model's own folder: retraining it changes every number "
                        "measured on it).")]

# flags several training commands take with the same meaning: one help text each
Steps = Annotated[int, typer.Option(help="Optimiser steps.")]
LearningRate = Annotated[float, typer.Option(help="AdamW peak learning rate.")]
LabelDropout = Annotated[float, typer.Option(help="Probability of the null label (unconditional branch).")]
CheckpointEvery = Annotated[int, typer.Option(help="Steps between resumable checkpoints.")]
Threads = Annotated[int, typer.Option(help="torch CPU threads (the shipped weights used 1).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]

INFO_FILE = "training_info.json"  # written by every trainer when it finishes


def held_layout(folder: Path) -> str | None:
    """The kind of model a trained folder holds: its pipeline class (``model_index.json``), ``classifier`` for a
    classifier's ``model.safetensors``, ``None`` when neither is readable."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        return str(index["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return "classifier" if (folder / "model.safetensors").is_file() else None


def check_not_finished(out: Path, overwrite: bool, layout: str | None = None) -> None:
    """Refuse a folder holding a finished model unless ``--overwrite``: a resumable run leaves a checkpoint (it is
    resumed), a finished one only its weights and ``training_info.json``, which a second run would replace.

    ``--overwrite`` retrains a model of the same ``layout`` (pipeline class, or ``classifier``): writing another
    kind of model into a finished folder replaced its record and some of its files and left the rest (e.g. a
    digits DDPM trained into the text-to-image folder kept its VAE and text encoder beside the new UNet).
    """
    from tadq.fsguard import OutputRefused
    from tadq.zoo.train import CHECKPOINT_NAME

    if not (out / INFO_FILE).is_file() or (out / CHECKPOINT_NAME).is_file():
        return
    if overwrite:
        held = held_layout(out)
        if layout is None or held is None or held == layout:
            return
        raise OutputRefused(f"--out {out} holds a trained {held}, not a {layout}; --overwrite retrains a model in "
                            f"its own folder, and this one would be left mixing both. Choose another --out")
    shipped = out.resolve().parent == SHIPPED.resolve()
    what = "the model tadq ships (every number measured on it would change)" if shipped else "a trained model"
    raise OutputRefused(f"--out {out} already holds {what}: {INFO_FILE} records a finished run. Choose another "
                        "--out, or pass --overwrite to train again into it")


def _train_into(out: Path, force_foreign: bool, build_config: Callable[[], Any],
                train: str, *, verbose: bool, threads: int, mark: bool = True, overwrite: bool = False,
                inputs: tuple[Path, ...] = (), layout: str | None = None) -> Any:
    """What every ``tadq zoo train*`` command does around its trainer (``train``: ``"module:function"``, imported
    once the config holds): logging (``setup``), then, with bad input a one-line error (``fail_cleanly``), validate
    the config (``tadq.zoo.configs``: before torch is imported), set the threads and check ``--out`` before any
    training (a finished model is replaced only with ``--overwrite``), mark the folder as tadq's (so a resume finds
    a folder tadq wrote, not only a checkpoint), and train with the exact command line recorded."""
    from tadq.fsguard import MARKER_FILE, check_output_dir, mark_output

    setup(verbose, threads)
    with fail_cleanly():
        config = build_config()
        torch_setup(threads)
        module, name = train.split(":")
        trainer = getattr(importlib.import_module(module), name)
        check_output_dir(out, kind="training", resume=True, force_foreign=force_foreign, inputs=inputs)
        hold_output(out)
        check_not_finished(out, overwrite, layout)
        # marked while training: a run interrupted before training_info.json (or with only its checkpoint) was
        # refused as foreign on the rerun its help promises; a shipped folder kept free of the marker (mark=False)
        # carries it only until the run finishes, so it keeps its bytes
        unmark = not mark and out.resolve().parent == SHIPPED.resolve()
        mark_output(out, "training")
        # the record says "finished" (check_not_finished) and describes the weights beside it: once this run starts
        # replacing them it describes nothing, and an interruption between the new weights and the new record
        # (--overwrite) left a folder that read as finished, under the old run's seed and settings
        (out / INFO_FILE).unlink(missing_ok=True)
        result = trainer(config, out, command="tadq " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        if unmark:
            (out / MARKER_FILE).unlink(missing_ok=True)
        return result


@zoo_app.command("train")
def train_command(
    out: Path = typer.Option(SHIPPED / "digits-ddpm", help="Output folder (diffusers DDPMPipeline layout)."),
    steps: Steps = 6000,
    batch_size: int = typer.Option(128, help="Images per step."),
    learning_rate: LearningRate = 1e-3,
    seed: int = typer.Option(0, help="Seed of initialisation, batches, timesteps and noise."),
    resolution: int = typer.Option(16, help="Image side: 8, 16 or 32."),
    threads: Threads = 1,
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the digits DDPM; resumes from the checkpoint in --out if interrupted."""
    from tadq.zoo.configs import TrainConfig

    path = _train_into(out, force_foreign, lambda: TrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, resolution=resolution),
        "tadq.zoo.train:train_digits_ddpm", verbose=verbose, threads=threads, mark=False, overwrite=overwrite,
        layout="DDPMPipeline")
    console.print(f"saved {path}")


@zoo_app.command("train-classifier")
def train_classifier_command(
    out: Path = typer.Option(SHIPPED / "digits-classifier", help="Output folder."),
    epochs: int = typer.Option(30, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed."),
    resolution: int = typer.Option(16, help="Image side: 8, 16 or 32."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the digit classifier whose penultimate features define FD-digits."""
    from tadq.zoo.configs import ClassifierTrainConfig

    info = _train_into(out, force_foreign, lambda: ClassifierTrainConfig(
        epochs=epochs, seed=seed, resolution=resolution), "tadq.metrics.classifier:train_digit_classifier",
        verbose=verbose, threads=threads,
        mark=False, overwrite=overwrite, layout="classifier")
    console.print(f"saved {out}: held-out accuracy {info.get('heldout_accuracy')}")


@zoo_app.command("train-photos")
def train_photos_command(
    out: Path = typer.Option(SHIPPED / "photos-ddpm", help="Output folder (diffusers DDPMPipeline layout)."),
    steps: Steps = 2000,
    batch_size: int = typer.Option(32, help="Patches per step."),
    learning_rate: LearningRate = 1e-3,
    label_dropout: LabelDropout = 0.15,
    checkpoint_every: CheckpointEvery = 250,
    seed: int = typer.Option(0, help="Seed of initialisation, batches, timesteps, noise and label dropout."),
    threads: Threads = 1,
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the class-conditional photos DDPM; resumes from the checkpoint in --out if interrupted."""
    from tadq.zoo.configs import PhotosTrainConfig

    path = _train_into(out, force_foreign, lambda: PhotosTrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, label_dropout=label_dropout,
        checkpoint_every=checkpoint_every), "tadq.zoo.photos_model:train_photos_ddpm", verbose=verbose,
        threads=threads, overwrite=overwrite, layout="DDPMPipeline")
    console.print(f"saved {path}")


@zoo_app.command("train-photo-classifier")
def train_photo_classifier_command(
    out: Path = typer.Option(SHIPPED / "photo-classifier", help="Output folder."),
    epochs: int = typer.Option(12, help="Training epochs."),
    seed: int = typer.Option(0, help="Seed."),
    threads: int = typer.Option(1, help="torch CPU threads."),
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the photo classifier whose penultimate features define FD-photos."""
    from tadq.zoo.configs import PhotoClassifierTrainConfig

    info = _train_into(out, force_foreign, lambda: PhotoClassifierTrainConfig(epochs=epochs, seed=seed),
                       "tadq.metrics.photo_classifier:train_photo_classifier", verbose=verbose, threads=threads,
                       mark=False, overwrite=overwrite, layout="classifier")
    console.print(f"saved {out}: held-out accuracy {info.get('heldout_accuracy')} "
                  f"(chance {info.get('chance_accuracy'):.3f})")


@zoo_app.command("train-t2i")
def train_t2i_command(
    out: Path = typer.Option(SHIPPED / "digits-t2i", help="Output folder (diffusers StableDiffusionPipeline layout)."),
    steps: int = typer.Option(2000, help="Optimiser steps of stage 2 (UNet + text encoder)."),
    batch_size: int = typer.Option(64, help="Latents per step in stage 2."),
    learning_rate: float = typer.Option(1e-3, help="AdamW peak learning rate of stage 2."),
    vae_steps: int = typer.Option(400, help="Optimiser steps of stage 1 (the VAE)."),
    prompt_dropout: float = typer.Option(0.1, help="Probability a training prompt is replaced by \"\"."),
    freeze_text_encoder: bool = typer.Option(False, "--freeze-text-encoder",
                                             help="Keep the text encoder at its random initialisation."),
    checkpoint_every: int = typer.Option(500, help="Steps between resumable checkpoints of stage 2."),
    seed: int = typer.Option(0, help="Seed of initialisation, batches, timesteps, noise and prompt choice."),
    threads: Threads = 1,
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the text-to-image digits model (VAE, then UNet + text encoder); an interrupted run resumes."""
    from tadq.zoo.configs import T2ITrainConfig

    path = _train_into(out, force_foreign, lambda: T2ITrainConfig(
        steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed, vae_steps=vae_steps,
        prompt_dropout=prompt_dropout, train_text_encoder=not freeze_text_encoder,
        checkpoint_every=checkpoint_every), "tadq.zoo.t2i:train_t2i", verbose=verbose, threads=threads,
        overwrite=overwrite, layout="StableDiffusionPipeline")
    console.print(f"saved {path}")


@zoo_app.command("train-dit")
def train_dit_command(
    out: Path = typer.Option(SHIPPED / "digits-dit", help="Output folder (diffusers DiTPipeline layout)."),
    steps: Steps = 6000,
    batch_size: int = typer.Option(128, help="Latents per step."),
    learning_rate: LearningRate = 5e-4,
    label_dropout: LabelDropout = 0.1,
    checkpoint_every: CheckpointEvery = 500,
    seed: int = typer.Option(0, help="Seed of initialisation, batches, timesteps, noise and label dropout."),
    threads: Threads = 1,
    verbose: Verbose = False,
    force_foreign: ForceForeign = False,
    overwrite: Overwrite = False,
) -> None:
    """Train the class-conditional digits DiT in the shipped VAE's latent space; resumes if interrupted."""
    from tadq.zoo.configs import DiTTrainConfig
    from tadq.zoo.paths import shipped_t2i_path

    def config() -> DiTTrainConfig:
        built = DiTTrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                               label_dropout=label_dropout, checkpoint_every=checkpoint_every)
        from tadq.zoo.dit import check_shipped_vae  # torch: after the flags were checked

        check_shipped_vae()  # before --out is created
        return built

    # it reads the text-to-image model's VAE: --out may not be, hold or lie inside that folder
    path = _train_into(out, force_foreign, config, "tadq.zoo.dit:train_digits_dit", verbose=verbose, threads=threads,
                       overwrite=overwrite, inputs=(shipped_t2i_path(),), layout="DiTPipeline")
    console.print(f"saved {path}")
