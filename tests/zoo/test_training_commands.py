"""The model-training commands (``tadq zoo train*``) and their Python entry points.

Determinism (also across an interruption and resume), interruption safety (no half-written or mixed folder that
loads, a resumable checkpoint), bad inputs refused before any training, and that the written folders load with
diffusers and with ``tadq.models.load_pipeline_parts``. Everything is tiny and written under ``tmp_path``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from tests.full_disk import full_disk_write_text
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.zoo import configs as zoo_configs
from tadq.zoo import data as zoo_data
from tadq.zoo import paths as zoo_paths
from tadq.zoo import train as zoo_train
from tadq.zoo.train import CHECKPOINT_NAME, TrainConfig


class _Interrupt(KeyboardInterrupt):
    """Stands in for SIGINT (Ctrl-C) at a chosen point."""


class _TrainingStarted(AssertionError):
    pass


def _few_digits(count: int = 48):
    real = zoo_data.load_digits_split

    def load(config=None):
        split = real(config)
        split.train_images, split.train_labels = split.train_images[:count], split.train_labels[:count]
        return split

    return load


def _weights(folder: Path) -> dict[str, bytes]:
    """Every file of a model folder but the timing/provenance records and the marker."""
    skip = {"training_info.json", "vae_stage.json", "tadq_output.json"}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def _invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    return result, " ".join(result.output.split())


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------------
# tadq zoo train (digits DDPM): determinism, resume after an interruption, load with diffusers and tadq
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_digits_cli(monkeypatch):
    """`tadq zoo train` with 48 digits and checkpoints every step (the CLI has no --checkpoint-every)."""
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    monkeypatch.setattr(zoo_configs, "TrainConfig",  # where the command reads it, before torch is imported
                        lambda **kw: TrainConfig(**{"checkpoint_every": 1, "warmup_steps": 1, **kw}))
    return ["zoo", "train", "--steps", "3", "--batch-size", "4", "--resolution", "8", "--seed", "3"]


def test_digits_cli_same_seed_same_bytes_and_loads_with_diffusers_and_tadq(tmp_path, tiny_digits_cli):
    from diffusers import DDPMPipeline

    from tadq.models import load_pipeline_parts

    for name in ("a", "b"):
        result, out = _invoke([*tiny_digits_cli, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, out
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert not (tmp_path / "a" / CHECKPOINT_NAME).exists()
    pipe = DDPMPipeline.from_pretrained(tmp_path / "a")
    assert pipe.unet.config.sample_size == 8
    model, scheduler = load_pipeline_parts(tmp_path / "a")
    assert scheduler.config.num_train_timesteps == 1000 and not model.training


def _interrupt_after_the_second_checkpoint(monkeypatch):
    """Ctrl-C right after the second checkpoint is saved; returns the real ``save_checkpoint``."""
    real_save, calls = zoo_train.save_checkpoint, [0]

    def save_then_interrupt(path, state):
        real_save(path, state)
        calls[0] += 1
        if calls[0] == 2:
            raise _Interrupt

    monkeypatch.setattr(zoo_train, "save_checkpoint", save_then_interrupt)
    return real_save


def test_digits_cli_interrupted_after_a_checkpoint_resumes_to_the_uninterrupted_bytes(
        tmp_path, monkeypatch, tiny_digits_cli):
    """Ctrl-C after the step-2 checkpoint of `tadq zoo train`; the help says the rerun resumes from it."""
    result, out = _invoke([*tiny_digits_cli, "--out", str(tmp_path / "straight")])
    assert result.exit_code == 0, out

    real_save = _interrupt_after_the_second_checkpoint(monkeypatch)
    resumed = tmp_path / "resumed"
    _invoke([*tiny_digits_cli, "--out", str(resumed)])
    assert (resumed / CHECKPOINT_NAME).is_file()
    assert not (resumed / "model_index.json").exists()  # nothing that loads as a model yet
    monkeypatch.setattr(zoo_train, "save_checkpoint", real_save)

    result, out = _invoke([*tiny_digits_cli, "--out", str(resumed)])
    assert result.exit_code == 0, f"the documented resume was refused: {out}"
    assert _weights(resumed) == _weights(tmp_path / "straight")


def test_digits_python_interrupted_run_resumes_to_the_uninterrupted_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=1, resolution=8, seed=5)
    zoo_train.train_digits_ddpm(config, tmp_path / "straight")
    real_save = _interrupt_after_the_second_checkpoint(monkeypatch)
    with pytest.raises(_Interrupt):
        zoo_train.train_digits_ddpm(TrainConfig(**{**vars(config), "steps": 9}), tmp_path / "resumed")
    monkeypatch.setattr(zoo_train, "save_checkpoint", real_save)
    zoo_train.train_digits_ddpm(config, tmp_path / "resumed")  # resumed with other steps: the 4-step run
    assert _weights(tmp_path / "resumed") == _weights(tmp_path / "straight")


def test_digits_resume_with_a_changed_setting_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    config = TrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2, resolution=8)
    real_save = zoo_train.save_checkpoint

    def save_then_interrupt(path, state):
        real_save(path, state)
        raise _Interrupt

    monkeypatch.setattr(zoo_train, "save_checkpoint", save_then_interrupt)
    with pytest.raises(_Interrupt):
        zoo_train.train_digits_ddpm(config, tmp_path)
    monkeypatch.setattr(zoo_train, "save_checkpoint", real_save)
    for change in ({"learning_rate": 2e-3}, {"seed": 1}, {"batch_size": 3}, {"resolution": 16}):
        with pytest.raises(ValueError, match="different TrainConfig"):
            zoo_train.train_digits_ddpm(TrainConfig(**{**vars(config), **change}), tmp_path)
    assert not (tmp_path / "model_index.json").exists()


# --------------------------------------------------------------------------------------------------------------
# bad inputs: refused with exit code 2 before any training and before anything is created
# --------------------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    ("train", ["--steps", "0"]), ("train", ["--steps", "-1"]), ("train", ["--batch-size", "0"]),
    ("train", ["--learning-rate", "nan"]), ("train", ["--learning-rate", "-1e-3"]),
    ("train", ["--learning-rate", "inf"]), ("train", ["--threads", "-1"]), ("train", ["--resolution", "7"]),
    ("train-classifier", ["--epochs", "0"]), ("train-classifier", ["--resolution", "12"]),
    ("train-classifier", ["--threads", "-2"]),
    ("train-photos", ["--steps", "0"]), ("train-photos", ["--label-dropout", "-0.1"]),
    ("train-photos", ["--label-dropout", "1.5"]), ("train-photos", ["--label-dropout", "nan"]),
    ("train-photos", ["--checkpoint-every", "0"]), ("train-photos", ["--learning-rate", "nan"]),
    ("train-photos", ["--batch-size", "-3"]),
    ("train-photo-classifier", ["--epochs", "-1"]), ("train-photo-classifier", ["--threads", "-1"]),
    ("train-t2i", ["--steps", "0"]), ("train-t2i", ["--vae-steps", "0"]), ("train-t2i", ["--batch-size", "0"]),
    ("train-t2i", ["--prompt-dropout", "1.5"]), ("train-t2i", ["--prompt-dropout", "nan"]),
    ("train-t2i", ["--learning-rate", "nan"]), ("train-t2i", ["--checkpoint-every", "-5"]),
    ("train-dit", ["--steps", "-1"]), ("train-dit", ["--label-dropout", "2"]),
    ("train-dit", ["--label-dropout", "nan"]), ("train-dit", ["--learning-rate", "0"]),
]


@pytest.fixture
def no_training(monkeypatch):
    """Every trainer raises if reached: a bad input must be refused before it."""
    import tadq.metrics.classifier as classifier
    import tadq.metrics.photo_classifier as photo_classifier
    import tadq.zoo.dit as dit
    import tadq.zoo.photos_model as photos_model
    import tadq.zoo.t2i as t2i

    def boom(*args, **kwargs):
        raise _TrainingStarted("training started")

    for module, name in ((zoo_train, "train_digits_ddpm"), (classifier, "train_digit_classifier"),
                         (photos_model, "train_photos_ddpm"), (photo_classifier, "train_photo_classifier"),
                         (t2i, "train_t2i"), (dit, "train_digits_dit")):
        monkeypatch.setattr(module, name, boom)


@pytest.mark.parametrize(("command", "bad"), BAD_INPUTS, ids=[f"{c}{' '.join(b)}" for c, b in BAD_INPUTS])
def test_bad_input_is_refused_before_training(tmp_path, no_training, command, bad):
    out = tmp_path / "new"
    result, text = _invoke(["zoo", command, "--out", str(out), *bad])
    assert not isinstance(result.exception, _TrainingStarted), f"{bad} reached training"
    assert result.exit_code == 2, text
    assert not out.exists()


COMMANDS = ["train", "train-classifier", "train-photos", "train-photo-classifier", "train-t2i", "train-dit"]


@pytest.mark.parametrize("command", COMMANDS)
def test_out_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path, no_training, command):
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"mine")
    result, text = _invoke(["zoo", command, "--out", str(a_file), "--overwrite"])
    assert result.exit_code == 2 and "file" in text, text
    assert a_file.read_bytes() == b"mine"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result, text = _invoke(["zoo", command, "--out", str(foreign), "--overwrite"])
    assert result.exit_code == 2 and "tadq did not write" in text, text
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(("field", "value"), [("lr", math.inf), ("noise_std", math.nan)])
def test_python_classifier_configs_refuse_non_finite_numbers(field, value):
    """The classifiers' Python entry points: lr=inf trains (AdamW accepts it) and saves a classifier of NaN weights;
    noise_std=nan trains on NaN images and saves a chance-level classifier. The configs must refuse both, as the
    DDPM configs do (check_learning_rates)."""
    from tadq.metrics.classifier import ClassifierTrainConfig
    from tadq.metrics.photo_classifier import PhotoClassifierTrainConfig

    for config_class in (ClassifierTrainConfig, PhotoClassifierTrainConfig):
        with pytest.raises(ValueError):
            config_class(**{field: value})


def test_t2i_seed_that_overflows_stage_two_is_refused_before_stage_one_trains(tmp_path, monkeypatch):
    """Stage 2 seeds with seed + 1 and seed + 2: seed 2**64 - 1 is a valid torch seed, seed + 1 is not, so the
    VAE trains (and is saved) before the run fails."""
    import tadq.zoo.t2i as t2i

    def boom(*args, **kwargs):
        raise _TrainingStarted("stage 1 started")

    monkeypatch.setattr(t2i, "_train_vae", boom)
    with pytest.raises(ValueError):
        t2i.train_t2i(t2i.T2ITrainConfig(seed=2**64 - 1, vae_steps=1, steps=1), tmp_path)


# --------------------------------------------------------------------------------------------------------------
# train-classifier: determinism and an interruption while saving
# --------------------------------------------------------------------------------------------------------------

def _interrupting_before_the_info(write_json):
    """``write_json`` (a trainer's ``atomic_write_json``) that raises ``_Interrupt`` instead of writing the run's
    training_info.json: a run cut after its weights were saved, before its record."""
    def write(document, path):
        if Path(path).name == "training_info.json":
            raise _Interrupt
        return write_json(document, path)

    return write


def test_classifier_cli_interrupted_while_saving_can_be_rerun_into_its_own_folder(tmp_path, monkeypatch):
    import tadq.metrics.classifier as classifier

    monkeypatch.setattr(classifier, "load_digits_split", _few_digits(64))
    args = ["zoo", "train-classifier", "--epochs", "1", "--resolution", "8", "--seed", "2"]
    result, text = _invoke([*args, "--out", str(tmp_path / "straight")])
    assert result.exit_code == 0, text
    result, text = _invoke([*args, "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, text
    assert _weights(tmp_path / "straight") == _weights(tmp_path / "again")  # same seed, same bytes

    real = classifier.atomic_write_json
    monkeypatch.setattr(classifier, "atomic_write_json", _interrupting_before_the_info(real))
    cut = tmp_path / "cut"
    _invoke([*args, "--out", str(cut)])
    assert (cut / "model.safetensors").is_file() and not (cut / "training_info.json").exists()
    monkeypatch.setattr(classifier, "atomic_write_json", real)
    result, text = _invoke([*args, "--out", str(cut)])
    assert result.exit_code == 0, f"rerunning into the folder the interrupted run created was refused: {text}"
    assert _weights(cut) == _weights(tmp_path / "straight")


@pytest.mark.parametrize("shipped", [False, True], ids=["folder", "shipped-folder"])
@pytest.mark.parametrize("command", ["train", "train-classifier"])
def test_an_interrupted_overwrite_does_not_leave_the_new_weights_under_the_old_record(tmp_path, monkeypatch,
                                                                                      command, shipped):
    """`--overwrite --seed 3` into a finished seed-2 folder, interrupted once the new weights were saved but before
    its training_info.json: the folder held the new weights under the old run's record, so it read as finished
    (a rerun without --overwrite was refused) and said seed 2 for seed-3 weights. A shipped folder (kept free of
    tadq's marker) must still be taken as tadq's on that rerun, and carry no marker once a run finishes."""
    import tadq.cli.zoo as cli_zoo
    import tadq.metrics.classifier as classifier
    from tadq.fsguard import MARKER_FILE

    if shipped:
        monkeypatch.setattr(cli_zoo, "SHIPPED", tmp_path)

    monkeypatch.setattr(classifier, "load_digits_split", _few_digits(64))
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    monkeypatch.setattr(zoo_configs, "TrainConfig",  # a run shorter than its checkpoint interval: no checkpoint
                        lambda **kw: TrainConfig(**{"checkpoint_every": 100, "warmup_steps": 1, **kw}))
    module = zoo_train if command == "train" else classifier
    args = ["zoo", command, "--resolution", "8"] + (
        ["--steps", "2", "--batch-size", "4"] if command == "train" else ["--epochs", "1"])
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    for folder, seed in ((out, "2"), (fresh, "3")):
        result, text = _invoke([*args, "--seed", seed, "--out", str(folder)])
        assert result.exit_code == 0, text
    assert _weights(out) != _weights(fresh)
    real = module.atomic_write_json
    monkeypatch.setattr(module, "atomic_write_json", _interrupting_before_the_info(real))
    _invoke([*args, "--seed", "3", "--out", str(out), "--overwrite"])
    monkeypatch.setattr(module, "atomic_write_json", real)
    record = out / "training_info.json"
    assert _weights(out) == _weights(fresh)  # the interruption came after the new weights were written
    assert not record.exists() or json.loads(record.read_text())["config"]["seed"] == 3, \
        "the seed-3 weights sit under the seed-2 run's training_info.json, a folder that reads as finished"
    result, text = _invoke([*args, "--seed", "3", "--out", str(out)])
    assert result.exit_code == 0, f"rerunning the interrupted command without --overwrite was refused: {text}"
    assert _weights(out) == _weights(fresh)
    assert (out / MARKER_FILE).exists() != shipped


# --------------------------------------------------------------------------------------------------------------
# train-photos: tiny CLI run loads with diffusers and tadq; same bytes
# --------------------------------------------------------------------------------------------------------------

def test_photos_cli_tiny_run_loads_and_repeats(tmp_path):
    from diffusers import DDPMPipeline

    from tadq.models import load_pipeline_parts

    args = ["zoo", "train-photos", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1"]
    for name in ("a", "b"):
        result, text = _invoke([*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, text
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    DDPMPipeline.from_pretrained(tmp_path / "a")
    model, _ = load_pipeline_parts(tmp_path / "a")
    assert model.config.num_class_embeds == 9
    # a second run without --overwrite is refused (a finished model is there)
    result, text = _invoke([*args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--overwrite" in text, text


# --------------------------------------------------------------------------------------------------------------
# train-t2i: changed settings on resume, and an interrupted --overwrite
# --------------------------------------------------------------------------------------------------------------

def _tiny_t2i(**changes):
    from tadq.zoo.t2i import T2ITrainConfig

    return T2ITrainConfig(**{"vae_steps": 2, "vae_batch_size": 4, "vae_channels": (8, 16), "steps": 2,
                             "batch_size": 4, "warmup_steps": 1, "unet_channels": (8, 16), "text_hidden": 8,
                             "checkpoint_every": 1, **changes})


def _interrupt_unet_at(monkeypatch, call: int):
    from diffusers import UNet2DConditionModel

    calls, forward = [0], UNet2DConditionModel.forward

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise _Interrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", failing)
    return lambda: monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


@pytest.fixture
def few_t2i_digits(monkeypatch):
    import tadq.zoo.t2i as t2i

    monkeypatch.setattr(t2i, "load_digits_split", _few_digits(32))


def test_t2i_resume_with_changed_vae_settings_is_refused_before_the_vae_is_retrained(
        tmp_path, monkeypatch, few_t2i_digits):
    from tadq.zoo.t2i import train_t2i

    restore = _interrupt_unet_at(monkeypatch, 2)  # after the step-1 checkpoint
    with pytest.raises(_Interrupt):
        train_t2i(_tiny_t2i(steps=3), tmp_path)
    restore()
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    stage_one = {p: (tmp_path / p).read_bytes()
                 for p in ("vae/diffusion_pytorch_model.safetensors", "vae/config.json", "vae_stage.json")}
    with pytest.raises(ValueError, match="different"):
        train_t2i(_tiny_t2i(steps=3, vae_steps=3), tmp_path)
    changed = [p for p, raw in stage_one.items() if (tmp_path / p).read_bytes() != raw]
    assert not changed, f"the refused resume first retrained and overwrote stage 1: {changed}"


def test_t2i_interrupted_retrain_does_not_leave_a_folder_that_loads_with_mixed_parts(
        tmp_path, monkeypatch, few_t2i_digits):
    """`tadq zoo train-t2i --overwrite --seed 1` into a finished folder, interrupted in stage 2: stage 1 has
    already replaced vae/, while unet/, text_encoder/, model_index.json and training_info.json are the old run's."""
    from diffusers import StableDiffusionPipeline

    from tadq.zoo.t2i import train_t2i

    train_t2i(_tiny_t2i(), tmp_path, command="first")
    old_vae = (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    restore = _interrupt_unet_at(monkeypatch, 1)
    with pytest.raises(_Interrupt):
        train_t2i(_tiny_t2i(seed=1), tmp_path)
    restore()
    try:
        StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False, local_files_only=True)
    except Exception:
        return  # refusing to load a half-replaced folder is fine
    new_vae = (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    info = json.loads((tmp_path / "training_info.json").read_text())
    assert new_vae == old_vae, ("the interrupted folder loads as a pipeline whose VAE is the new run's (seed 1) "
                                f"while its UNet/text encoder and training_info.json (seed {info['seed']}) are the "
                                "old run's")


# --------------------------------------------------------------------------------------------------------------
# train-dit: the input model (the shipped t2i VAE's folder) as --out
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def t2i_copy(tmp_path, monkeypatch):
    """A copy of the shipped t2i folder standing in for it, so nothing shipped can be touched."""
    import tadq.zoo.dit as dit
    import tadq.zoo.t2i as t2i
    from tadq.zoo.dit import DiTTrainConfig

    shipped = t2i.shipped_t2i_path()
    if not (shipped / "vae").is_dir():
        pytest.skip("shipped t2i model not in this checkout")
    copy = tmp_path / "digits-t2i"
    shutil.copytree(shipped, copy)
    monkeypatch.setattr(t2i, "shipped_t2i_path", lambda: copy)
    monkeypatch.setattr(zoo_paths, "shipped_t2i_path", lambda: copy)  # the command's, read before torch
    monkeypatch.setattr(dit, "load_digits_split", _few_digits(32))
    monkeypatch.setattr(zoo_configs, "DiTTrainConfig", lambda **kw: DiTTrainConfig(
        **{"warmup_steps": 1, "heads": 2, "head_dim": 8, "layers": 1, **kw}))
    return copy


def test_train_dit_writes_a_folder_diffusers_and_tadq_load(tmp_path, t2i_copy):
    from diffusers import DiTPipeline

    from tadq.models import load_pipeline_parts

    args = ["zoo", "train-dit", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "1"]
    for name in ("a", "b"):
        result, text = _invoke([*args, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, text
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    DiTPipeline.from_pretrained(tmp_path / "a", low_cpu_mem_usage=False)
    model, scheduler = load_pipeline_parts(tmp_path / "a")
    assert not scheduler.config.clip_sample


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_train_dit_refuses_out_that_is_or_lies_inside_its_input_model(t2i_copy, where):
    """--force-foreign's help: without it, a folder that is, holds or lies inside the input model is refused.
    train-dit reads the t2i model's VAE, yet `--out <t2i folder> --overwrite` replaces its model_index.json by a
    DiTPipeline's (and leaves its unet/ and text_encoder/ beside the DiT)."""
    before = _weights(t2i_copy)
    out = t2i_copy if where == "itself" else t2i_copy / "dit"
    result, text = _invoke(["zoo", "train-dit", "--out", str(out), "--overwrite", "--steps", "1",
                            "--batch-size", "2"])
    assert result.exit_code == 2, f"training into the input model's folder was accepted: {text}"
    assert _weights(t2i_copy) == before


def test_a_full_disk_while_writing_training_info_keeps_the_earlier_one(tmp_path, monkeypatch):
    """training_info.json was written in place: a full disk (or a kill) left half a JSON document where the earlier
    run's was, a folder no tool could read its provenance from."""
    import errno
    import json
    import os

    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1, resolution=8, seed=5)
    zoo_train.train_digits_ddpm(config, tmp_path)
    before = (tmp_path / "training_info.json").read_text()

    monkeypatch.setattr(Path, "write_text", full_disk_write_text)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        zoo_train.train_digits_ddpm(config, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "training_info.json").read_text() == before and json.loads(before)["config"]


# --------------------------------------------------------------------------------------------------------------
# --overwrite retrains a model in its own folder, not another kind of model into it
# --------------------------------------------------------------------------------------------------------------

FINISHED_LAYOUTS = {  # a finished folder's files (beside its training_info.json) and the commands that wrote it
    "DDPMPipeline": ({"model_index.json": '{"_class_name": "DDPMPipeline"}'}, {"train", "train-photos"}),
    "StableDiffusionPipeline": ({"model_index.json": '{"_class_name": "StableDiffusionPipeline"}'}, {"train-t2i"}),
    "classifier": ({"model.safetensors": "", "config.json": "{}"}, {"train-classifier", "train-photo-classifier"}),
}


@pytest.mark.parametrize("held", sorted(FINISHED_LAYOUTS))
def test_overwrite_refuses_a_finished_folder_of_another_kind_of_model(tmp_path, no_training, held):
    """`tadq zoo train --out <the text-to-image folder> --overwrite` replaced its model_index.json, unet/ and
    training_info.json and kept its vae/, text_encoder/ and tokenizer/: a folder mixing two models."""
    from tadq.fsguard import mark_output

    files, own_commands = FINISHED_LAYOUTS[held]
    for command in COMMANDS:
        out = tmp_path / f"{held}-{command}"
        out.mkdir()
        mark_output(out, "training")
        for name, text in {**files, "training_info.json": '{"command": "earlier"}'}.items():
            (out / name).write_text(text)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        result, text = _invoke(["zoo", command, "--out", str(out), "--overwrite"])
        if command in own_commands:
            assert isinstance(result.exception, _TrainingStarted), f"{command} into its own kind: {text}"
            continue
        assert result.exit_code == 2, f"{command} --overwrite into a finished {held}: {text}"
        assert held in text and "--out" in text, text
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("field", ["unet_channels", "vae_channels"])
def test_t2i_widths_the_group_norm_cannot_split_are_refused_before_stage_one(tmp_path, monkeypatch, field):
    """unet_channels=(12, 24) trained and saved the VAE (stage 1, minutes at the defaults) before the UNet's
    group norm refused 12 channels."""
    import tadq.zoo.t2i as t2i

    def boom(*args, **kwargs):
        raise _TrainingStarted("stage 1 started")

    monkeypatch.setattr(t2i, "_train_vae", boom)
    with pytest.raises(ValueError, match=field):
        t2i.train_t2i(_tiny_t2i(**{field: (12, 24)}), tmp_path)


def test_digits_run_interrupted_while_writing_its_record_leaves_no_half_record(tmp_path, monkeypatch):
    """training_info.json was written in place: Ctrl-C in the middle left a truncated record, which marks the
    folder as a finished run (and, in the shipped folder without a marker, makes it unreadable as tadq's)."""
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    config = TrainConfig(steps=2, batch_size=2, warmup_steps=1, checkpoint_every=1, resolution=8)
    real_write = Path.write_text

    def half_then_interrupt(self, text, *args, **kwargs):
        if text.lstrip().startswith("{") and '"final_batch_loss"' in text:  # the training record
            real_write(self, text[: len(text) // 2], *args, **kwargs)
            raise _Interrupt
        return real_write(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_then_interrupt)
    with pytest.raises(_Interrupt):
        zoo_train.train_digits_ddpm(config, tmp_path)
    monkeypatch.setattr(Path, "write_text", real_write)
    record = tmp_path / "training_info.json"
    assert not record.exists() or json.loads(record.read_text())["final_batch_loss"] is not None


# --------------------------------------------------------------------------------------------------------------
# progress=False: the training bars had no switch (only the CLI's --quiet hides them now, and the caller's setting)
# --------------------------------------------------------------------------------------------------------------

def test_digits_training_bar_follows_the_callers_progress_setting(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(zoo_train, "load_digits_split", _few_digits())
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=1, resolution=8, seed=5)
    zoo_train.train_digits_ddpm(config, tmp_path / "hidden", progress=False)
    assert "train digits DDPM" not in capfd.readouterr().err
    zoo_train.train_digits_ddpm(config, tmp_path / "shown")
    assert "train digits DDPM" in capfd.readouterr().err


def test_classifier_training_bar_follows_the_callers_progress_setting(tmp_path, monkeypatch, capfd):
    import tadq.metrics.classifier as classifier

    monkeypatch.setattr(classifier, "load_digits_split", _few_digits(16))
    config = classifier.ClassifierTrainConfig(epochs=1, batch_size=8, resolution=8)
    classifier.train_digit_classifier(config, tmp_path / "hidden", progress=False)
    assert "train digits classifier" not in capfd.readouterr().err
    classifier.train_digit_classifier(config, tmp_path / "shown")
    assert "train digits classifier" in capfd.readouterr().err
