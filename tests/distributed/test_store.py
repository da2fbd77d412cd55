"""Resume and stale-chunk detection of ``sample_sharded`` in one process: reuse only chunks of the same run key."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from tests.conftest import build_tiny_unet

from tadq.distributed import ChunkRange, ShardedRun, StaleRunError, model_fingerprint, sample_sharded
from tadq.safefiles import load_checked
from tadq.sampling import SamplerConfig
from tadq.utils import _host_tag


def load_samples(path):
    """samples.safetensors as one dict: its tensors and its JSON metadata."""
    tensors, meta = load_checked(path, "samples")
    return {**meta, **tensors}


SAMPLER = SamplerConfig("ddim", num_steps=2)


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def _sample(out_dir: Path, *, model=None, seed: int = 3, num_samples: int = 6, batch_size: int = 2, **kwargs):
    model = model if model is not None else build_tiny_unet()
    return sample_sharded(model, _scheduler(), SAMPLER, num_samples=num_samples, seed=seed, out_dir=out_dir,
                          batch_size=batch_size, progress=False, **kwargs)


def _mtimes(out_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (out_dir / "chunks").glob("*.safetensors")}


def test_rerun_reuses_every_chunk_without_touching_it(tmp_path: Path) -> None:
    first = _sample(tmp_path)
    assert len(first.computed) == 3 and first.reused == ()
    before = _mtimes(tmp_path)
    second = _sample(tmp_path)
    assert second.computed == () and second.reused == first.run.chunks
    assert _mtimes(tmp_path) == before
    assert json.loads((tmp_path / "manifest.json").read_text())["complete"]
    assert torch.equal(load_samples(tmp_path / "samples.safetensors")["images"], first.run.read())


@pytest.mark.parametrize(("change", "field"), [
    ({"seed": 4}, "seed"),
    ({"model": "other"}, "model_fingerprint"),
    ({"batch_size": 1}, "batch_size"),
    ({"record_trajectory": True}, "record_trajectory"),
])
def test_another_configuration_in_out_dir_raises(tmp_path: Path, change: dict, field: str) -> None:
    _sample(tmp_path)
    before = _mtimes(tmp_path)
    if change.get("model") == "other":
        change = {"model": build_tiny_unet(seed=1)}
    with pytest.raises(StaleRunError, match=field):
        _sample(tmp_path, **change)
    assert _mtimes(tmp_path) == before


def test_foreign_chunk_without_manifest_raises(tmp_path: Path) -> None:
    _sample(tmp_path / "other", seed=4)
    _sample(tmp_path / "run", num_samples=2)
    (tmp_path / "run" / "manifest.json").unlink()
    foreign = tmp_path / "other" / "chunks" / "0000002-0000004.safetensors"
    (tmp_path / "run" / "chunks" / foreign.name).write_bytes(foreign.read_bytes())
    with pytest.raises(StaleRunError, match="0000002-0000004.safetensors.*seed"):
        _sample(tmp_path / "run")


def test_more_samples_reuse_the_finished_chunks(tmp_path: Path) -> None:
    small = _sample(tmp_path, num_samples=4)
    large = _sample(tmp_path, num_samples=9)
    assert large.reused == small.run.chunks and ChunkRange(8, 9) in large.computed
    assert torch.equal(large.run.read(0, 4), small.run.read())
    assert torch.equal(large.run.read(), _sample(tmp_path / "fresh", num_samples=9).run.read())


def test_unreadable_chunk_and_temp_files_are_redone(tmp_path: Path) -> None:
    first = _sample(tmp_path)
    (tmp_path / "chunks" / "0000002-0000004.safetensors").write_bytes(b"not a torch file")
    (tmp_path / "chunks" / _temp_name("0000004-0000006.safetensors", _ended_pid())).write_bytes(b"half written")
    (tmp_path / _temp_name("samples.safetensors", _ended_pid())).write_bytes(b"half written")
    second = _sample(tmp_path)
    assert second.computed == (ChunkRange(2, 4),)
    assert not list((tmp_path / "chunks").glob("*.tmp")) and not list(tmp_path.glob("*.tmp"))
    assert torch.equal(second.run.read(), first.run.read())


def _temp_name(final: str, pid: int) -> str:
    """The name ``tadq.utils``' atomic writes give the temp file of ``final`` in process ``pid`` of this host."""
    return f".{final}.{pid}-{_host_tag()}-k3x9q2zw.tmp"


def _ended_pid() -> int:
    """The id of a process that has ended (a writer killed in the middle of a chunk)."""
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_temp_file_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    """A second run into the same folder (or a rank of another node) may be writing a chunk: its temp file used to
    be deleted by the first run's cleanup, and its rename into place then failed."""
    _sample(tmp_path)
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = [_temp_name("0000000-0000002.safetensors", writer.pid),
                 f".0000002-0000004.safetensors.{writer.pid}-{'0' * 8}-k3x9q2zw.tmp"]  # another host's: unknowable
        for name in names:
            (tmp_path / "chunks" / name).write_bytes(b"being written")
        _sample(tmp_path)
        assert sorted(path.name for path in (tmp_path / "chunks").glob("*.tmp")) == sorted(names)
    finally:
        writer.kill()
        writer.wait()


def test_read_crosses_chunk_boundaries(tmp_path: Path) -> None:
    run = _sample(tmp_path, record_trajectory=True).run
    images, states = run.read(), run.read(states=True)
    assert states.shape == (SAMPLER.num_steps + 1, 6, 1, 8, 8) and torch.equal(states[-1], images)
    assert torch.equal(run.read(1, 5), images[1:5]) and torch.equal(run.read(3, 4, states=True), states[:, 3:4])
    with pytest.raises(ValueError, match="outside"):
        run.read(4, 7)


def test_open_refuses_unfinished_and_foreign_folders(tmp_path: Path) -> None:
    _sample(tmp_path)
    (tmp_path / "chunks" / "0000004-0000006.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="misses 1 of 3 chunks"):
        ShardedRun.open(tmp_path)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ShardedRun.open(tmp_path / "chunks")


def test_model_fingerprint_follows_weights_and_settings() -> None:
    model = build_tiny_unet()
    assert model_fingerprint(model) == model_fingerprint(copy.deepcopy(model))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.conv_in.weight[0, 0, 0, 0] += 1e-6
    assert model_fingerprint(changed) != model_fingerprint(model)
    assert model_fingerprint(copy.deepcopy(model).train()) != model_fingerprint(model)


def test_a_run_resumes_across_the_models_training_mode(tmp_path: Path) -> None:
    """The key fingerprinted each module's training flag, so a run started with a model left in training mode was
    refused with the same model in eval mode (and back), though sampling always runs in eval mode. The key now holds
    the model as it samples: an eval-mode model's key is what it was, so existing eval-mode runs still resume."""
    model = build_tiny_unet().train()
    first = _sample(tmp_path, model=model)
    assert all(module.training for module in model.modules())  # given back in its own mode
    key = json.loads((tmp_path / "manifest.json").read_text())["key"]
    assert key["model_fingerprint"] == model_fingerprint(copy.deepcopy(model).eval())
    second = _sample(tmp_path, model=copy.deepcopy(model).eval())
    assert second.computed == () and second.reused == first.run.chunks
    third = _sample(tmp_path, model=model)
    assert third.computed == () and third.reused == first.run.chunks


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_samples": 0}, "num_samples"), ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_arguments_raise_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _sample(tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()
