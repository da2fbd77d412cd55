"""Caches tadq keeps between runs and between fits: a changed input never reuses an entry computed from the old one,
and a damaged entry is never trusted."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import nn

import tadq.experiments.rows.base as rows_base
from tadq.calibration import collect_calibration_set, model_fingerprint
from tadq.calibration.data import CalibrationSet
from tadq.config import CalibrationConfig
from tadq.corrections.fp_cache import FPTrajectory, FPTrajectoryCache, trajectory_key
from tadq.experiments.rows.base import BaseModels
from tadq.experiments.run import RunConfig, cell_key, load_cell, run_main_job
from tadq.registry import adapter_for
from tadq.safefiles import DamagedFileError
from tadq.sampling import SamplerConfig, SamplingPlan

SAMPLER = SamplerConfig(kind="ddim", num_steps=2)
CALIBRATION = CalibrationConfig(sampler=SAMPLER, num_trajectories=2, num_steps_kept=2, samples_per_step=2, seed=0,
                                batch_size=2)


def _collect(model, scheduler, cache_dir) -> CalibrationSet:
    return collect_calibration_set(model, adapter_for(model), scheduler.config, CALIBRATION, cache_dir=cache_dir,
                                   progress=False)


def _with_config(model: UNet2DModel, **changes) -> UNet2DModel:
    """The same weights under an edited config (what a user's edited ``config.json`` loads)."""
    public = {key: value for key, value in model.config.items() if not key.startswith("_")}
    edited = UNet2DModel.from_config({**public, **changes}).eval()
    edited.load_state_dict(model.state_dict())
    return edited


@pytest.mark.parametrize("changes", [{"sample_size": 16}, {"norm_eps": 1e-3}, {"flip_sin_to_cos": False},
                                     {"center_input_sample": True}])
def test_calibration_cache_is_not_reused_after_the_model_config_changes(tmp_path, tiny_unet, ddpm_scheduler,
                                                                       changes):
    """The fingerprint hashed the weights alone: the 8×8 set of the old config came back for a 16×16 model, and
    another normalisation epsilon or time embedding reused the old states."""
    first = _collect(tiny_unet, ddpm_scheduler, tmp_path)
    edited = _with_config(tiny_unet, **changes)
    assert model_fingerprint(edited) != model_fingerprint(tiny_unet)
    second = _collect(edited, ddpm_scheduler, tmp_path)
    assert len(list(tmp_path.glob("calibration-*.safetensors"))) == 2
    assert second.key != first.key
    assert second.x.shape[-1] == edited.config.sample_size
    if "sample_size" not in changes:  # same noise, same shapes: the edited forward moved the recorded states
        assert not torch.equal(second.eps, first.eps)


def test_sharded_run_key_follows_a_setting_only_the_config_holds(tiny_unet):
    """``center_input_sample`` is read by the UNet's forward from its config and held by no module attribute: the
    sharded-sampling fingerprint (classes, attributes, tensors) did not see it, so a resume mixed in old chunks."""
    from tadq.distributed import model_fingerprint as run_fingerprint

    edited = _with_config(tiny_unet, center_input_sample=True)
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([500])
    assert not torch.equal(edited(x, t).sample, tiny_unet(x, t).sample)
    assert run_fingerprint(edited) != run_fingerprint(tiny_unet)
    assert run_fingerprint(_with_config(tiny_unet)) == run_fingerprint(tiny_unet)


def test_model_fingerprint_follows_freeu():
    """FreeU changes the forward without touching weights or config: a UNet with FreeU on reused the calibration
    data cached for the same UNet without it (a cached quantize differed from a fresh one by 0.08)."""
    from tests.conftest import build_tiny_sd_unet

    plain, freeu = build_tiny_sd_unet(), build_tiny_sd_unet()
    assert model_fingerprint(plain) == model_fingerprint(freeu)
    freeu.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    other = build_tiny_sd_unet()
    other.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.5)
    assert len({model_fingerprint(plain), model_fingerprint(freeu), model_fingerprint(other)}) == 3
    freeu.disable_freeu()  # off again: the key of the model that never had it (existing caches stay valid)
    assert model_fingerprint(freeu) == model_fingerprint(plain)


def test_model_fingerprint_does_not_depend_on_where_the_model_was_loaded_from(tmp_path, tiny_unet):
    """Only the public config counts (not ``_name_or_path`` or the diffusers version): the same model from two
    folders reuses one cache entry."""
    for name in ("a", "b"):
        tiny_unet.save_pretrained(tmp_path / name)
    loaded = [UNet2DModel.from_pretrained(tmp_path / name) for name in ("a", "b")]
    assert model_fingerprint(loaded[0]) == model_fingerprint(loaded[1]) == model_fingerprint(tiny_unet)
    assert model_fingerprint(tiny_unet.to(torch.float64)) != model_fingerprint(loaded[0])


def test_cache_that_cannot_be_written_leaves_the_data_right(tmp_path, tiny_unet, ddpm_scheduler, monkeypatch, caplog):
    """A read-only (or full) cache folder raised PermissionError after the whole FP run; the data is right, so the
    run goes on and says that nothing was cached."""
    reference = _collect(tiny_unet, ddpm_scheduler, None)

    def refuse(self, path, fields=None):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(CalibrationSet, "save", refuse)
    with caplog.at_level(logging.WARNING, logger="tadq.calibration.data"):
        calib = _collect(tiny_unet, ddpm_scheduler, tmp_path / "read-only")
    assert torch.equal(calib.x, reference.x) and torch.equal(calib.eps, reference.eps)
    assert "could not write the calibration cache" in caplog.text and "Permission denied" in caplog.text


def test_cache_on_a_full_disk_leaves_the_data_right(tmp_path, tiny_unet, ddpm_scheduler, monkeypatch, caplog):
    """safetensors reports a full disk with its own SafetensorError, not an OSError: the cache's fallback (go on
    without caching) did not catch it, and the run died after the whole FP run."""
    from tests.full_disk import full_disk_save_file

    import tadq.safefiles as safefiles

    reference = _collect(tiny_unet, ddpm_scheduler, None)
    monkeypatch.setattr(safefiles, "save_file", full_disk_save_file)
    with caplog.at_level(logging.WARNING, logger="tadq.calibration.data"):
        calib = _collect(tiny_unet, ddpm_scheduler, tmp_path)
    assert torch.equal(calib.x, reference.x) and torch.equal(calib.eps, reference.eps)
    assert "could not write the calibration cache" in caplog.text and "No space left" in caplog.text
    assert list(tmp_path.iterdir()) == []  # neither a cache file nor a half-written temp file


def test_temp_file_of_a_killed_cache_write_is_removed_by_the_next_one(tmp_path, tiny_unet, ddpm_scheduler):
    """A run killed while writing a calibration cache left its temp file (the size of the cache) for good."""
    import subprocess
    import sys

    from tadq.utils import _host_tag

    ended = subprocess.Popen([sys.executable, "-c", ""])
    ended.wait()
    tmp_path.mkdir(exist_ok=True)
    left = tmp_path / f".calibration-0123abcd.safetensors.{ended.pid}-{_host_tag()}-k3x9q2zw.tmp"
    left.write_bytes(b"half written")
    _collect(tiny_unet, ddpm_scheduler, tmp_path)
    assert not left.exists() and len(list(tmp_path.glob("calibration-*.safetensors"))) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_calibration_cache_is_refused_not_loaded(tmp_path, tiny_unet, ddpm_scheduler, damage):
    _collect(tiny_unet, ddpm_scheduler, tmp_path)
    (path,) = tmp_path.glob("calibration-*.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x01  # inside the last tensor's bytes
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="delete it"):
        _collect(tiny_unet, ddpm_scheduler, tmp_path)


# -- the FP trajectories kept between correction fits -----------------------------------------------------------------


def _trajectory(value: float) -> FPTrajectory:
    return FPTrajectory((torch.full((2,), value),) * 2, (torch.full((2,), value),))


def test_fp_trajectories_are_dropped_when_weights_are_written_through_data():
    """``param.data.copy_`` (diffusers' ``EMAModel.copy_to``) does not move the version counter, and two
    ``param.data = new`` can land on the first storage's address again: the old weights' walk was reused."""
    model = nn.Linear(64, 64)
    cache = FPTrajectoryCache(model)
    cache.put("walk", _trajectory(1.0))
    model.weight.data.copy_(torch.randn(64, 64))
    assert cache.get("walk") is None
    cache.put("walk", _trajectory(2.0))
    for _ in range(3):  # the allocator hands the freed block back: address and version match the first ones
        model.weight.data = torch.randn(64, 64)
        assert cache.get("walk") is None
        cache.put("walk", _trajectory(3.0))
    model.weight.data = model.weight.data.clone()  # the same values elsewhere: the walk is still the right one
    assert cache.get("walk") is not None


def test_device_checksum_is_exact_and_sees_moved_values():
    """What a GPU network's fingerprint is made of (run here on the CPU: the same integer arithmetic)."""
    from tadq.corrections.fp_cache import _device_checksum

    values = torch.randn(1000)
    assert torch.equal(_device_checksum(values), _device_checksum(values.clone()))
    assert not torch.equal(_device_checksum(values), _device_checksum(values.flip(0)))
    bits = values.view(torch.int32).to(torch.int64)
    assert _device_checksum(values)[0].item() == int(bits.sum())  # the sum of the bit patterns, nothing lost


def test_trajectory_key_of_a_plan_follows_the_schedule_and_clipping():
    """``SamplingPlan.key`` ("ddim-2-eta0.0") names the grid only: walks under clip_sample or another timestep
    spacing shared an entry."""
    def key(plan):
        return trajectory_key(plan, 2, 1.0, 0, 2, 2, (1, 8, 8), "cpu", torch.float32, None)

    plain = SamplingPlan.build(DDPMScheduler(), SAMPLER)
    unclipped = SamplingPlan.build(DDPMScheduler(), dataclasses.replace(SAMPLER, clip_sample=False))
    trailing = SamplingPlan.build(DDPMScheduler(timestep_spacing="trailing"), SAMPLER)
    assert plain.key == unclipped.key == trailing.key
    assert len({key(plain), key(unclipped), key(trailing)}) == 3
    assert key(plain) == key(SamplingPlan.build(DDPMScheduler(), SAMPLER))


# -- tadq run: cells and the quantized base models kept on disk -----------------------------------------------------


def _run_config(model_dir, out, **kw) -> RunConfig:
    return RunConfig(model=str(model_dir), presets=("W8A8",), methods=("naive",), num_samples=2, sampler=SAMPLER,
                     eval_seed=1, calibration=CALIBRATION, batch_size=2, out_dir=str(out),
                     cache_dir=str(out / "cache"), grid_samples=2, **kw)


def test_run_recomputes_cells_and_models_after_the_model_config_changes(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    first = run_main_job(_run_config(tiny_model_dir, out))
    config_file = tiny_model_dir / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": 16}))
    second = run_main_job(_run_config(tiny_model_dir, out))
    shapes = sorted(tuple(load_cell(path)["images"].shape[-2:]) for path in (out / "cells").glob("*.safetensors"))
    assert shapes == [(8, 8), (8, 8), (16, 16), (16, 16)]  # both rows sampled again, at the new size
    assert len(list((out / "models").glob("naive-W8A8-*/tadq_config.json"))) == 2
    assert len(list((out / "cache").glob("calibration-*.safetensors"))) == 2
    assert first["rows"][1]["final_mse"] != second["rows"][1]["final_mse"]


def test_cell_key_names_the_device_type(tmp_path, tiny_model_dir, monkeypatch):
    """A CUDA run's cells (its FP row included) are not a CPU run's: the kernels differ in the last bits."""
    import tadq.experiments.run as run_module

    config = _run_config(tiny_model_dir, tmp_path)
    variant = rows_base.Variant("FP", "W32A32", None, {"method": "fp"})
    on_cpu = cell_key("fingerprint", config, variant)
    monkeypatch.setattr(run_module, "resolve_device", lambda device: torch.device("cuda", 0))
    assert cell_key("fingerprint", config, variant) != on_cpu


def test_cell_key_follows_the_batch_the_samples_run_in(tmp_path, tiny_model_dir):
    """The key held the --batch-size as given, so 250 and 256 at 64 samples (one batch of 64 either way) recomputed
    every cell; a batch that splits the samples differently still gets cells of its own."""
    variant = rows_base.Variant("naive PTQ", "W8A8", "W8A8", {"method": "naive"})

    def key(batch_size: int, num_samples: int = 64) -> str:
        config = dataclasses.replace(_run_config(tiny_model_dir, tmp_path), num_samples=num_samples,
                                     batch_size=batch_size)
        return cell_key("fingerprint", config, variant)

    assert key(250) == key(256) == key(64)
    assert key(32) != key(64) and key(250, num_samples=256) != key(256, num_samples=256)


def test_a_damaged_kept_base_model_is_rebuilt_not_loaded(tmp_path, tiny_unet, ddpm_scheduler, caplog):
    from tadq.experiments.rows.recipes import recipes_for_row

    calibration = _collect(tiny_unet, ddpm_scheduler, None)
    spec = recipes_for_row("naive", "W8A8", _run_config("unused", tmp_path)).base()
    bases = BaseModels(tiny_unet, ddpm_scheduler, calibration, model_fingerprint(tiny_unet), tmp_path / "models")
    built = bases.get(spec)
    (weights,) = (tmp_path / "models").glob("naive-W8A8-*/tadq_weights.safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tadq.experiments.rows.base"):
        rebuilt = bases.get(spec)
    assert "cannot be used" in caplog.text and "building it again" in caplog.text
    for (name, a), (_, b) in zip(built.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert isinstance(BaseModels(tiny_unet, ddpm_scheduler, calibration, model_fingerprint(tiny_unet),
                                 tmp_path / "models").get(spec), type(built))  # the rewritten folder loads


def test_base_model_key_holds_svdquant_settings_the_quant_config_does_not(tmp_path, tiny_unet, ddpm_scheduler):
    """SVDQuant's α grid, search samples and seed are not in its ``QuantConfig``: a base built with other ones was
    read back from the first one's folder."""
    from tadq.experiments.rows.recipes import recipes_for_row
    from tadq.svdquant import SVDQuantMethod

    calibration = _collect(tiny_unet, ddpm_scheduler, None)
    bases = BaseModels(tiny_unet, ddpm_scheduler, calibration, model_fingerprint(tiny_unet), tmp_path / "models")
    naive = bases.get(recipes_for_row("naive", "W8A8", _run_config("unused", tmp_path)).base())
    recipe = recipes_for_row("svdquant", "W4A4", _run_config("unused", tmp_path)).base()
    built: list[str] = []

    def build(label: str):
        return lambda: built.append(label) or naive  # any network: the test is about which folder is read

    bases.get(recipe, build=build("default"))
    bases.get(recipe, build=build("again"))
    bases.get(dataclasses.replace(recipe, method=SVDQuantMethod(alpha_grid=(0.5,))), build=build("other grid"))
    assert built == ["default", "other grid"]


def test_cell_components_follow_the_vae_config(tiny_unet, ddpm_scheduler):
    """Decoding divides by the VAE's ``scaling_factor`` (config, not weights): a folder whose VAE config was edited
    decodes other images, so its cells must not be reused."""
    from diffusers import AutoencoderKL

    from tadq.experiments.workload import Workload, vae_decoder

    def components(scaling_factor: float) -> dict[str, str]:
        torch.manual_seed(0)
        vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                            up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), latent_channels=1,
                            norm_num_groups=4, sample_size=8, scaling_factor=scaling_factor).eval()
        return Workload("vae", tiny_unet, ddpm_scheduler, decoder=vae_decoder(vae)).components()

    assert components(0.5) == components(0.5)
    assert components(0.5)["vae"] != components(0.25)["vae"]


def test_cell_components_follow_the_pipeline_class_that_decodes(tiny_unet, ddpm_scheduler):
    """A text-to-image folder's latents are decoded as its pipeline class decodes them (SDXL: latents mean/std,
    SD3/Flux: shift_factor); cells written when every class applied both are not reused for the same VAE."""
    from diffusers import AutoencoderKL

    from tadq.experiments.workload import Workload, vae_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), latent_channels=1,
                        norm_num_groups=4, sample_size=8).eval()

    def components(pipeline_class: str | None) -> dict[str, str]:
        return Workload("vae", tiny_unet, ddpm_scheduler,
                        decoder=vae_decoder(vae, pipeline_class=pipeline_class)).components()

    assert "vae_decode" not in components(None)  # DiT / LDM folders: decoded as before, their cells kept
    sd, sdxl = components("StableDiffusionPipeline"), components("StableDiffusionXLPipeline")
    assert sd["vae"] == sdxl["vae"] and sd["vae_decode"] != sdxl["vae_decode"]

    # decoded without a graph though the VAE's parameters require grad; an SD folder as by the class-less decoder
    latents = torch.randn(3, 1, 4, 4)
    images = vae_decoder(vae, batch_size=2, pipeline_class="StableDiffusionPipeline")(latents)
    assert not images.requires_grad and images.shape == (3, 1, 4, 4)
    assert torch.equal(images, vae_decoder(vae, batch_size=2)(latents))  # SD reads no shift and no statistics


class _TimeScaled(nn.Module):
    """ε = g·x·t/1000: a walk that depends on which timesteps the grid visits."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x, t, cond=None):
        return self.gain * x * (t.float().view(-1, 1, 1, 1) / 1000.0)


def test_a_shared_fp_cache_does_not_serve_a_walk_under_another_timestep_spacing():
    from tests.corrections.analytic import fit_context

    from tadq.corrections.sequential import paired_final_error

    def scheduler(spacing: str) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=1000, clip_sample=False, timestep_spacing=spacing)

    fp = _TimeScaled()

    def quantized(x, t, cond=None):
        return fp(x, t) * 1.1 + 0.05 * x.tanh()

    def error(spacing: str, cache: FPTrajectoryCache | None) -> float:
        ctx = fit_context(fp, quantized, scheduler(spacing), SAMPLER, fp_trajectories=cache, progress=False)
        return paired_final_error(ctx, (), num_samples=4, seed=5)

    cache = FPTrajectoryCache(fp)
    assert error("leading", cache) != error("trailing", None)  # the two grids walk apart
    assert error("trailing", cache) == error("trailing", None)
