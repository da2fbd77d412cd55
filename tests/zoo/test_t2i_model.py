"""The text-to-image digits model: a tiny training run gives a StableDiffusionPipeline folder that loads offline and
is the same bytes for the same seed; stage 1 is kept when stage 2 is interrupted; the shipped folder generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the text-to-image model needs transformers (CLIP)")
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from tadq.zoo.t2i import T2ITrainConfig, load_t2i_pipeline, shipped_t2i_path, train_t2i
from tadq.zoo.train import CHECKPOINT_NAME

TINY = T2ITrainConfig(vae_steps=2, vae_batch_size=4, vae_channels=(8, 16), steps=2, batch_size=4, warmup_steps=1,
                      unet_channels=(8, 16), text_hidden=8, checkpoint_every=1)


def _weights(folder: Path) -> dict[str, bytes]:
    """Every weight, config and tokenizer file of a pipeline folder (not the timing record)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("training_info.json", "vae_stage.json")}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    first, second = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    train_t2i(TINY, first, command="test")
    train_t2i(TINY, second, command="test")
    return first, second


def test_tiny_run_loads_offline_as_a_stable_diffusion_pipeline(tiny_runs: tuple[Path, Path]) -> None:
    folder = tiny_runs[0]
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.tokenizer.model_max_length == 16 == pipe.text_encoder.config.max_position_embeddings
    info = json.loads((folder / "training_info.json").read_text())
    stage = info["vae"]
    assert pipe.vae.config.scaling_factor == pytest.approx(stage["scaling_factor"]) and stage["scaling_factor"] > 0
    assert info["seed"] == 0 and info["unet_text"]["steps"] == 2 and "transformers" in info["versions"]
    assert not (folder / CHECKPOINT_NAME).exists()
    image = pipe("the digit 7", num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 1, 16, 16) and torch.isfinite(image).all()


def test_same_seed_gives_the_same_bytes(tiny_runs: tuple[Path, Path]) -> None:
    first, second = (_weights(folder) for folder in tiny_runs)
    assert any(name.endswith(".safetensors") for name in first)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []


def test_a_finished_vae_stage_is_reused_and_the_run_equals_the_uninterrupted_one(
        tiny_runs: tuple[Path, Path], tmp_path: Path) -> None:
    """Stage 1 is saved before stage 2 starts; a rerun reuses it (a different VAE config would not)."""
    source = tiny_runs[0]
    for name in ("vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae_stage.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((source / name).read_bytes())
    stage = json.loads((tmp_path / "vae_stage.json").read_text())
    stage["wall_time_s"] = -1.0  # a marker: a retrained VAE would write its own stage record
    (tmp_path / "vae_stage.json").write_text(json.dumps(stage))
    train_t2i(TINY, tmp_path, command="test")
    assert json.loads((tmp_path / "training_info.json").read_text())["vae"]["wall_time_s"] == -1.0
    assert _weights(tmp_path) == _weights(source)


def test_shipped_model_loads_and_generates_a_one_step_digit() -> None:
    path = shipped_t2i_path()
    assert path.is_dir(), f"{path} is missing: train it with tadq zoo train-t2i"
    pipe = load_t2i_pipeline()
    out = pipe(["a handwritten seven", "the digit 3"], num_inference_steps=1, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all() and 0.0 <= float(out.min())
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert size < 8 * 2**20, f"the shipped model is {size / 2**20:.1f} MiB; it ships inside the wheel"


class _Interrupt(Exception):
    pass


def test_an_interrupted_stage_two_resumes_to_the_uninterrupted_run(
        tiny_runs: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed at the third UNet call of a 3-step run (after the step-2 checkpoint), then rerun with 2 steps."""
    from diffusers import UNet2DConditionModel

    calls, forward = [0], UNet2DConditionModel.forward

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise _Interrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", failing)
    with pytest.raises(_Interrupt):
        train_t2i(T2ITrainConfig(**{**vars(TINY), "steps": 3}), tmp_path)
    monkeypatch.setattr(UNet2DConditionModel, "forward", forward)
    assert (tmp_path / CHECKPOINT_NAME).is_file() and (tmp_path / "vae_stage.json").is_file()
    train_t2i(TINY, tmp_path, command="test")
    assert _weights(tmp_path) == _weights(tiny_runs[0])


def test_train_t2i_command_refuses_a_folder_tadq_did_not_write(tmp_path: Path) -> None:
    """The fsguard check runs before any training: a foreign file is left alone and the exit code says why."""
    from typer.testing import CliRunner

    from tadq.cli.app import app

    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["zoo", "train-t2i", "--out", str(tmp_path), "--steps", "1"])
    assert result.exit_code == 2 and "tadq did not write" in " ".join(result.output.split())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
