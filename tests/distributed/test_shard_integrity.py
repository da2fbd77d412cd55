"""Sharded sampling: rank independence (1/2/3 gloo ranks forked from this process), resume, stale
and damaged chunks, conditional runs with guidance, an artefact with corrections, paired metrics, the CLI's refusals.

Ranks are forked (``torch.multiprocessing``, ``start_method="fork"``) with the variables torchrun sets, as
``_interrupted_worker.py`` does, so they skip the interpreter start-up of a torchrun launch. Everything is tiny
(8x8 digits, 2 steps, N <= 8).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from diffusers import DDPMScheduler, UNet2DModel
from tests.conftest import build_tiny_unet
from tests.distributed.tiny_runs import save_tiny_model
from typer.testing import CliRunner

from tadq.api import sample as tadq_sample
from tadq.cli.app import app
from tadq.distributed import (
    ChunkRange,
    ShardedRun,
    StaleRunError,
    World,
    distributed_world,
    sample_sharded,
    sharded_metrics,
)
from tadq.distributed.store import _read_chunk_file
from tadq.sampling import ClassLabels, RandomClassLabels, SamplerConfig

SAMPLER = SamplerConfig("ddim", num_steps=2, eta=0.5)  # stochastic: the step noises must line up too
runner = CliRunner()


def _scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


# -- forked gloo ranks ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, job: Callable[[World], None]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed_world("cpu") as world:
        assert world.distributed and world.world_size == world_size
        job(world)


def run_ranks(world_size: int, job: Callable[[World], None]) -> None:
    """``job(world)`` on ``world_size`` forked gloo ranks; an exception in any rank fails the test."""
    if world_size == 1:
        job(World())
        return
    mp.start_processes(_rank_main, args=(world_size, _free_port(), job), nprocs=world_size, start_method="fork")


def _chunks(run_dir: Path) -> dict[str, dict]:
    return {path.name: _read_chunk_file(path) for path in sorted((run_dir / "chunks").glob("*.safetensors"))}


def _assert_same_chunks(got_dir: Path, expected_dir: Path) -> None:
    got, expected = _chunks(got_dir), _chunks(expected_dir)
    assert sorted(got) == sorted(expected)
    for name, payload in expected.items():
        assert got[name]["key"] == payload["key"], name
        assert (got[name]["start"], got[name]["stop"]) == (payload["start"], payload["stop"])
        for field in ("images", "states"):
            if field in payload:
                assert torch.equal(got[name][field], payload[field]), (name, field)


def _stat(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run_dir / "chunks").glob("*.safetensors")}


# -- rank independence --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP reference: 8 samples in chunks of 4 (another layout than the candidates'), trajectories recorded."""
    out = tmp_path_factory.mktemp("redteam-reference")
    torch.set_num_threads(1)
    sample_sharded(build_tiny_unet(1), _scheduler(), SAMPLER, num_samples=8, seed=5, out_dir=out, batch_size=4,
                   record_trajectory=True, progress=False)
    return out


def _candidate_job(out_dir: Path, reference_dir: Path, num_samples: int, chunk_size: int,
                   written: Path | None = None) -> Callable[[World], None]:
    def job(world: World) -> None:
        torch.set_num_threads(1)
        report = sample_sharded(build_tiny_unet(0), _scheduler(), SAMPLER, num_samples=num_samples, seed=5,
                                out_dir=out_dir, batch_size=2, chunk_size=chunk_size, record_trajectory=True,
                                world=world, progress=False)
        if written is not None:
            (written / f"rank{world.rank}.json").write_text(json.dumps([[c.start, c.stop] for c in report.computed]))
        metrics = sharded_metrics(report.run, reference=ShardedRun.open(reference_dir), world=world)
        (out_dir / f"metrics-rank{world.rank}.json").write_text(json.dumps(metrics.to_dict()))

    return job


@pytest.mark.parametrize(("num_samples", "chunk_size", "world_sizes"), [
    (7, 3, (2, 3)),  # chunk size not dividing N, not a multiple of the batch size
    (2, 1, (3,)),  # fewer samples than ranks: rank 2 samples nothing and measures nothing
])
def test_world_sizes_give_bit_identical_chunks_and_metrics(tmp_path: Path, reference_run: Path, num_samples: int,
                                                           chunk_size: int, world_sizes: tuple[int, ...]) -> None:
    single = tmp_path / "one"
    run_ranks(1, _candidate_job(single, reference_run, num_samples, chunk_size))
    expected_metrics = json.loads((single / "metrics-rank0.json").read_text())
    assert expected_metrics["num_samples"] == num_samples and expected_metrics["psnr"] is not None
    for world_size in world_sizes:
        out, written = tmp_path / f"ranks{world_size}", tmp_path / f"written{world_size}"
        written.mkdir()
        run_ranks(world_size, _candidate_job(out, reference_run, num_samples, chunk_size, written))
        _assert_same_chunks(out, single)
        # every chunk was written by exactly one rank (no two ranks clobber a file), no temp file is left behind
        drawn = [tuple(c) for r in range(world_size) for c in json.loads((written / f"rank{r}.json").read_text())]
        assert sorted(drawn) == [(c.start, c.stop) for c in ShardedRun.open(out).chunks]
        assert not list((out / "chunks").glob(".*"))
        for rank in range(world_size):  # every rank returns rank 0's metrics, equal to the single process's
            assert json.loads((out / f"metrics-rank{rank}.json").read_text()) == expected_metrics
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and manifest["settings"]["world_size"] == world_size


def test_guided_class_conditional_run_is_rank_independent(tmp_path: Path) -> None:
    model = build_tiny_unet(num_class_embeds=4)
    options = {"num_samples": 5, "seed": 3, "batch_size": 2, "chunk_size": 2, "progress": False,
               "conditions": RandomClassLabels(3, null_class=3), "guidance_scale": 2.0}

    def job(out: Path) -> Callable[[World], None]:
        return lambda world: sample_sharded(model, _scheduler(), SAMPLER, out_dir=out, world=world, **options)

    run_ranks(1, job(tmp_path / "one"))
    run_ranks(2, job(tmp_path / "two"))
    _assert_same_chunks(tmp_path / "two", tmp_path / "one")
    key = json.loads((tmp_path / "two" / "manifest.json").read_text())["key"]
    assert key["conditioning"] == {"conditions": "random-labels-3-null3", "guidance_scale": 2.0}
    # another guidance scale or other labels in the same folder are refused, nothing rewritten
    before = _stat(tmp_path / "two")
    for change in ({"guidance_scale": 3.0}, {"conditions": RandomClassLabels(4, null_class=4)}):
        with pytest.raises(StaleRunError, match="conditioning"):
            sample_sharded(model, _scheduler(), SAMPLER, out_dir=tmp_path / "two", **(options | change))
    assert _stat(tmp_path / "two") == before


def test_single_rank_crash_resumed_by_three_ranks(tmp_path: Path) -> None:
    out, fresh = tmp_path / "run", tmp_path / "fresh"
    options = {"num_samples": 7, "seed": 2, "batch_size": 2, "chunk_size": 2, "record_trajectory": True,
               "progress": False}

    class Preempted(Exception):
        pass

    def die(chunk: ChunkRange) -> None:
        raise Preempted(chunk)

    with pytest.raises(Preempted):
        sample_sharded(build_tiny_unet(), _scheduler(), SAMPLER, out_dir=out, on_chunk_written=die, **options)
    survivors = _stat(out)
    assert list(survivors) == ["0000000-0000002.safetensors"]
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # a larger batch size capped at the chunk size is the same key: allowed, and the same samples
    run_ranks(3, lambda world: sample_sharded(build_tiny_unet(), _scheduler(), SAMPLER, out_dir=out, world=world,
                                              **(options | {"batch_size": 8})))
    after = _stat(out)
    assert {name: after[name] for name in survivors} == survivors  # reused, not rewritten
    sample_sharded(build_tiny_unet(), _scheduler(), SAMPLER, out_dir=fresh, **options)
    _assert_same_chunks(out, fresh)
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_artefact_with_corrections_two_ranks_match_one(tmp_path: Path) -> None:
    from tadq import NaiveMethod, Recipe, api
    from tadq.calibration import collect_calibration_set
    from tadq.cli.sample import load_denoiser
    from tadq.config import CalibrationConfig
    from tadq.corrections import TACConfig
    from tadq.recipe import Deployment
    from tadq.registry import adapter_for

    sampler = SamplerConfig("ddim", num_steps=2)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=2,
                                    batch_size=4)
    model, scheduler = build_tiny_unet(), _scheduler()
    data = collect_calibration_set(model, adapter_for(model), scheduler.config, calibration, progress=False)
    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=calibration,
                                corrections=(TACConfig(num_samples=4),), deployments=(Deployment(sampler),))
    api.quantize(model, scheduler, recipe, calibration=data, progress=False).save_pretrained(tmp_path / "art",
                                                                                            scheduler)

    def job(out: Path) -> Callable[[World], None]:
        def run(world: World) -> None:
            denoiser, loaded_scheduler, label = load_denoiser(tmp_path / "art")
            assert len(denoiser.corrections) == 1
            sample_sharded(denoiser, loaded_scheduler, sampler, num_samples=5, seed=9, out_dir=out, batch_size=2,
                           world=world, label=label, progress=False)
        return run

    run_ranks(1, job(tmp_path / "one"))
    run_ranks(2, job(tmp_path / "two"))
    _assert_same_chunks(tmp_path / "two", tmp_path / "one")
    # the corrected artefact is another model than the FP network: its chunks are not reused for it
    with pytest.raises(StaleRunError, match="model_fingerprint"):
        sample_sharded(model, scheduler, sampler, num_samples=5, seed=9, out_dir=tmp_path / "one", batch_size=2,
                       progress=False)


# -- damaged, foreign and missing chunks --------------------------------------------------------------------------
def _small(out: Path, **kwargs):
    options = {"num_samples": 6, "seed": 3, "batch_size": 2, "progress": False} | kwargs
    return sample_sharded(build_tiny_unet(), _scheduler(), SAMPLER, out_dir=out, **options)


def test_damaged_foreign_renamed_and_deleted_chunks(tmp_path: Path) -> None:
    base = tmp_path / "base"
    expected = _small(base).run.read()
    _small(tmp_path / "other-seed", seed=4)
    name = "0000002-0000004.safetensors"

    def copy(tag: str) -> Path:
        shutil.copytree(base, tmp_path / tag)
        return tmp_path / tag

    truncated = copy("truncated")
    (truncated / "chunks" / name).write_bytes((base / "chunks" / name).read_bytes()[:200])
    with pytest.raises(ValueError, match=name):  # read after completion names the damaged file
        ShardedRun.open(truncated).read()
    assert _small(truncated).computed == (ChunkRange(2, 4),)  # a resume redoes it
    assert torch.equal(ShardedRun.open(truncated).read(), expected)

    foreign = copy("foreign")  # same name, another seed's samples
    shutil.copy(tmp_path / "other-seed" / "chunks" / name, foreign / "chunks" / name)
    before = _stat(foreign)
    with pytest.raises(StaleRunError, match=f"{name}.*seed"):
        _small(foreign)
    with pytest.raises(StaleRunError, match=name):
        ShardedRun.open(foreign).read()
    assert _stat(foreign) == before

    renamed = copy("renamed")  # this run's chunk 0..1 under the name of 2..3
    shutil.copy(base / "chunks" / "0000000-0000002.safetensors", renamed / "chunks" / name)
    with pytest.raises(StaleRunError, match=f"{name} does not hold samples 2..3"):
        _small(renamed)

    deleted = copy("deleted")
    (deleted / "chunks" / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        ShardedRun.open(deleted)
    assert _small(deleted).computed == (ChunkRange(2, 4),)
    assert torch.equal(ShardedRun.open(deleted).read(), expected)


@pytest.mark.parametrize(("change", "field"), [
    ({"chunk_size": 3}, "chunk_size"),
    ({"batch_size": 1}, "batch_size"),
    ({"sampler": SamplerConfig("ddim", num_steps=2, eta=0.0)}, "sampler"),
    ({"device_type": "cuda"}, "device_type"),
])
def test_resume_with_other_settings_is_refused_untouched(tmp_path: Path, change: dict, field: str) -> None:
    _small(tmp_path)
    before = _stat(tmp_path)
    manifest = (tmp_path / "manifest.json").read_text()
    if "device_type" in change:  # a run made on another device type: simulated by its manifest
        edited = json.loads(manifest)
        edited["key"]["device_type"] = "cuda"
        (tmp_path / "manifest.json").write_text(json.dumps(edited))
        change = {}
    sampler = change.pop("sampler", SAMPLER)
    with pytest.raises(StaleRunError, match=field):
        sample_sharded(build_tiny_unet(), _scheduler(), sampler, out_dir=tmp_path,
                       **({"num_samples": 6, "seed": 3, "batch_size": 2, "progress": False} | change))
    assert _stat(tmp_path) == before


def test_resume_with_another_thread_count_is_refused_and_the_record_kept(tmp_path: Path) -> None:
    """The thread count is not in the run key (README: --threads is in no cache key), and the manifest's record of
    it was overwritten by each attempt: a CPU run resumed with another count mixed chunks whose last bits differ."""
    own = torch.get_num_threads()
    other = 1 if own != 1 else 2
    _small(tmp_path, num_samples=4)

    def manifest_threads() -> int:
        return json.loads((tmp_path / "manifest.json").read_text())["settings"]["threads"]

    assert manifest_threads() == own
    before = _stat(tmp_path)
    torch.set_num_threads(other)
    try:
        with pytest.raises(StaleRunError, match=f"2 finished chunk.*sampled with {own} torch threads, this run has "
                                                f"{other}"):
            _small(tmp_path, num_samples=6)  # would sample chunk 4..5 beside the two of the first attempt
        assert _stat(tmp_path) == before
        assert _small(tmp_path, num_samples=4).computed == ()  # finished: read, nothing sampled
        assert manifest_threads() == own  # and the record stays that of its chunks
    finally:
        torch.set_num_threads(own)
    assert _small(tmp_path, num_samples=6).computed == (ChunkRange(4, 6),)


# -- defects found and fixed ------------------------------------------------------------------------------------------
CLI_FLAGS = ["--num-samples", "4", "--steps", "2", "--batch-size", "2", "--threads", "1"]


@pytest.fixture
def saved_model(tmp_path: Path) -> Path:
    return save_tiny_model(tmp_path / "model", 0)


def test_refused_rerun_leaves_the_other_runs_metrics_alone(tmp_path: Path, saved_model: Path) -> None:
    """A rerun with another seed is refused as another configuration, but the CLI deleted the finished run's
    metrics.json before the check (cli/sample_sharded.py unlinks it before sample_sharded checks the manifest)."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    metrics = (out / "metrics.json").read_text()
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "8", "--out-dir", str(out)])
    assert result.exit_code == 2 and "another configuration" in result.output
    assert (out / "metrics.json").is_file(), "the refused run deleted the finished run's metrics.json"
    assert (out / "metrics.json").read_text() == metrics


def test_paired_metrics_refuse_a_reference_drawn_with_other_labels(tmp_path: Path) -> None:
    """check_reference compares seed, sampler and shape, but not the run key's conditioning: a reference sampled
    with other class labels (or another guidance scale) gives agreement/PSNR/SSIM of unrelated pairs."""
    options = {"num_samples": 4, "seed": 3, "batch_size": 2, "progress": False, "guidance_scale": 2.0}
    reference = sample_sharded(build_tiny_unet(1, num_class_embeds=4), _scheduler(), SAMPLER, out_dir=tmp_path / "r",
                               conditions=ClassLabels((0, 0, 0, 0), null_class=3), **options).run
    candidate = sample_sharded(build_tiny_unet(0, num_class_embeds=4), _scheduler(), SAMPLER, out_dir=tmp_path / "c",
                               conditions=RandomClassLabels(3, null_class=3), **options).run
    assert reference.key["conditioning"] != candidate.key["conditioning"]
    with pytest.raises(ValueError, match="condition"):
        sharded_metrics(candidate, reference=reference)


def _dropout_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, dropout=0.5)


def test_model_left_in_training_mode_samples_by_seed_and_index(tmp_path: Path) -> None:
    """nn.Module starts in training mode. tadq.sample samples under eval_mode; sample_sharded does not, so dropout is
    on, every sample depends on the global RNG (not on (seed, index)) and two identical runs differ."""
    model = _dropout_unet()
    assert model.training
    first = sample_sharded(model, _scheduler(), SAMPLER, num_samples=4, seed=3, out_dir=tmp_path / "a",
                           batch_size=2, progress=False).run.read()
    second = sample_sharded(model, _scheduler(), SAMPLER, num_samples=4, seed=3, out_dir=tmp_path / "b",
                            batch_size=2, progress=False).run.read()
    alone = tadq_sample(model, _scheduler(), SAMPLER, num_samples=4, seed=3, batch_size=2, progress=False).images
    assert torch.equal(first, second), "the same (seed, index) gave other samples"
    assert torch.equal(first, alone), "sample_sharded differs from tadq.sample for the same seed and batching"


def test_bfloat16_model_is_sampled_like_tadq_sample(tmp_path: Path) -> None:
    """sample_sharded calls the loop without the model's dtype: a bfloat16 model fails with a RuntimeError from
    conv2d (float32 states, bfloat16 weights) after the manifest is written; tadq.sample samples it."""
    model = build_tiny_unet().to(torch.bfloat16)
    alone = tadq_sample(model, _scheduler(), SAMPLER, num_samples=3, seed=3, batch_size=2, progress=False).images
    run = sample_sharded(model, _scheduler(), SAMPLER, num_samples=3, seed=3, out_dir=tmp_path, batch_size=2,
                         progress=False).run
    assert torch.equal(run.read(), alone)


def test_edited_manifest_is_a_clean_error_naming_it(tmp_path: Path, saved_model: Path) -> None:
    """A manifest.json whose "key" was removed (edited by hand) crashes with a bare KeyError traceback (exit 1), as
    --out-dir and as --reference-dir; one that is not JSON, given as --reference-dir, gives a JSON message that does
    not name the file. Expected: a one-line error naming manifest.json (exit 2)."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--out-dir", str(out),
                                 "--no-metrics"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["key"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for args in (["--out-dir", str(out), "--no-metrics"],
                 ["--out-dir", str(tmp_path / "other"), "--reference-dir", str(out)]):
        result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, *args])
        assert result.exit_code == 2 and "manifest.json" in result.output, (args, result.output, result.exception)
    (out / "manifest.json").write_text("{damaged")
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--out-dir", str(tmp_path / "x"),
                                 "--reference-dir", str(out)])
    assert result.exit_code == 2 and "manifest.json" in result.output, result.output


def test_reference_of_other_noise_is_refused_before_any_chunk(tmp_path: Path, saved_model: Path) -> None:
    """--reference-dir with another seed is only checked by sharded_metrics, after every chunk was sampled (hours at
    50 000 samples); --reference-dir that is not a run is refused before anything is written, this should be too."""
    reference = tmp_path / "reference"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir",
                                 str(reference), "--no-metrics"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "8", "--out-dir", str(out),
                                 "--reference-dir", str(reference)])
    assert result.exit_code == 2 and "same noise" in result.output
    assert not list(out.glob("chunks/*.safetensors")), "the whole run was sampled before the reference was refused"


def _damaged_reference_copies(tmp_path: Path, reference: Path) -> dict[str, Path]:
    """Copies of a finished run: a flipped byte in a chunk, a chunk of another seed, manifest key fields edited."""
    foreign = tmp_path / "foreign-seed"
    sample_sharded(build_tiny_unet(0), _scheduler(), SamplerConfig("ddim", num_steps=2, eta=0.0), num_samples=4,
                   seed=8, out_dir=foreign, batch_size=2, progress=False)
    name = "0000002-0000004.safetensors"
    copies = {}
    for tag in ("flipped", "foreign", "no-chunk-size", "no-record-trajectory", "no-model-fingerprint"):
        copies[tag] = shutil.copytree(reference, tmp_path / tag)
    chunk = copies["flipped"] / "chunks" / name
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF  # inside the image bytes: the header still parses
    chunk.write_bytes(bytes(data))
    shutil.copy(foreign / "chunks" / name, copies["foreign"] / "chunks" / name)
    for tag, field in (("no-chunk-size", "chunk_size"), ("no-record-trajectory", "record_trajectory"),
                       ("no-model-fingerprint", "model_fingerprint")):
        manifest = json.loads((copies[tag] / "manifest.json").read_text())
        del manifest["key"][field]
        (copies[tag] / "manifest.json").write_text(json.dumps(manifest))
    return copies


def test_damaged_reference_is_refused_before_any_chunk(tmp_path: Path, saved_model: Path) -> None:
    """A --reference-dir whose chunk was damaged or replaced by another run's was only read by the metrics, after
    the whole new run had been sampled; a manifest whose key lost chunk_size or model_fingerprint crashed with a
    KeyError traceback (exit 1), one without record_trajectory was refused only after sampling. Expected: one
    error line naming the file (exit 2) before any chunk is written."""
    reference = tmp_path / "reference"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir",
                                 str(reference), "--no-metrics"])
    assert result.exit_code == 0, result.output
    named = {"flipped": "0000002-0000004", "foreign": "0000002-0000004", "no-chunk-size": "manifest.json",
             "no-record-trajectory": "manifest.json", "no-model-fingerprint": "manifest.json"}
    for tag, damaged in _damaged_reference_copies(tmp_path, reference).items():
        out = tmp_path / f"out-{tag}"
        result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir",
                                     str(out), "--reference-dir", str(damaged)])
        assert result.exit_code == 2 and named[tag] in result.output, (tag, result.output, result.exception)
        assert not list(out.glob("chunks/*.safetensors")), f"{tag}: the run was sampled before the refusal"


def test_reference_with_labels_is_refused_before_any_chunk(tmp_path: Path, saved_model: Path) -> None:
    """check_reference_noise compared seed, sampler and shape but not the run key's conditioning: a reference drawn
    with class labels and guidance (tadq.distributed.sample_sharded) passed it, and the unconditional run was
    refused by check_reference only once every chunk had been sampled."""
    from tadq.cli.sample import deployment_sampler

    sampler = deployment_sampler(saved_model, None, 2, None)  # what CLI_FLAGS sample with
    reference = tmp_path / "reference"
    sample_sharded(build_tiny_unet(1, num_class_embeds=4), _scheduler(), sampler, num_samples=4, seed=7,
                   out_dir=reference, batch_size=2, progress=False, conditions=ClassLabels((0, 1, 2, 0), null_class=3),
                   guidance_scale=2.0)
    out = tmp_path / "out"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir", str(out),
                                 "--reference-dir", str(reference)])
    assert result.exit_code == 2 and "conditioning" in result.output, result.output
    assert not list(out.glob("chunks/*.safetensors")), "the whole run was sampled before the reference was refused"


def test_chunk_file_under_a_non_canonical_name_does_not_block_the_resume(tmp_path: Path) -> None:
    """pending_chunks parses any ``\\d+-\\d+.safetensors`` name, so 0-2.safetensors (a copy of chunk 0..1 under
    another spelling, the canonical file missing) counts chunk 0..1 as done; nobody samples it, ShardedRun.open
    then reports it missing and says "rerun", and every rerun fails the same way."""
    expected = _small(tmp_path / "fresh").run.read()
    out = tmp_path / "run"
    _small(out)
    chunks = out / "chunks"
    (chunks / "0000000-0000002.safetensors").rename(chunks / "0-2.safetensors")
    try:
        report = _small(out)
    except (StaleRunError, FileNotFoundError) as error:
        assert "0-2.safetensors" in str(error), f"the error does not name the stray file: {error}"
        return
    assert ChunkRange(0, 2) in report.computed and torch.equal(report.run.read(), expected)


def test_ranks_with_different_models_are_refused_on_every_rank(tmp_path: Path) -> None:
    def job(world: World) -> None:
        with pytest.raises(ValueError, match="rank 1 loaded another model"):
            sample_sharded(build_tiny_unet(world.rank), _scheduler(), SAMPLER, num_samples=4, seed=1,
                           out_dir=tmp_path / "x", batch_size=2, world=world, progress=False)

    run_ranks(2, job)
    assert not (tmp_path / "x").exists()


def test_a_run_that_failed_before_any_chunk_does_not_lock_its_folder(tmp_path: Path, saved_model: Path) -> None:
    """sample_sharded writes manifest.json before anything checks the seed range (or the conditions against the
    model, or the dtype); the attempt fails at the first noise draw with no chunk on disk, and the corrected command
    is then refused as "another configuration" (seed: found 4294967296) until the user deletes the folder."""
    out = tmp_path / "run"
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", str(2**32), "--out-dir",
                                 str(out), "--no-metrics"])
    assert result.exit_code == 2 and "seed" in result.output
    assert not list(out.glob("chunks/*.safetensors"))
    result = runner.invoke(app, ["sample-sharded", str(saved_model), *CLI_FLAGS, "--seed", "7", "--out-dir", str(out),
                                 "--no-metrics"])
    assert result.exit_code == 0, result.output
    # the same through the API: a class-conditional model first sampled without its labels
    model = build_tiny_unet(num_class_embeds=4)
    with pytest.raises(ValueError, match="is conditional"):
        sample_sharded(model, _scheduler(), SAMPLER, num_samples=2, seed=3, out_dir=tmp_path / "c", progress=False)
    sample_sharded(model, _scheduler(), SAMPLER, num_samples=2, seed=3, out_dir=tmp_path / "c", progress=False,
                   conditions=RandomClassLabels(3, null_class=3))
