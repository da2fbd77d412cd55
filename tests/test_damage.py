"""Damage everything tadq reads or writes, systematically, and check each case gives one clear error and loses nothing.

Artefacts (truncate, flip bytes, remove or swap files, wrong JSON types, random bytes, NaN/Inf), checkpoints and
caches, configs, and paths (a foreign folder, a plain file, the input model, read-only places). Every case runs on the
tiny model of ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import tadq
from tadq.calibration import collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.cli.app import app
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.io import WEIGHTS_FILE, load_quantized, save_quantized
from tadq.io.manifest import MANIFEST_FILE, write_manifest
from tadq.registry import adapter_for
from tadq.safefiles import DamagedFileError
from tadq.sampling import SamplerConfig

runner = CliRunner()
SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
SMALL = ["--steps", "4", "--calib-trajectories", "8"]
READ_ONLY = Path("/sys/tadq-damage-test")  # read-only even for root (chmod does not stop root)


def _tree(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file: 'byte-identical' means equal trees."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert "error:" in result.output and all(n in result.output for n in needles), result.output


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler
    from tests.conftest import build_tiny_unet

    model = build_tiny_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    qmodel = tadq.quantize(model, scheduler, QuantConfig.from_preset("W8A8", calibration=CALIB), progress=False)
    path = tmp_path_factory.mktemp("artefact") / "q"
    save_quantized(qmodel, path, scheduler)
    return path


# -- artefacts -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "flip", "random", "empty"])
def test_damaged_weights_are_detected_naming_the_file(copy, damage):
    path = copy / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0x01  # one bit inside a tensor: safetensors alone would load it
    elif damage == "random":
        data = bytearray(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(1)).byte()
                         .numpy().tobytes())
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=WEIGHTS_FILE):
        load_quantized(copy)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and WEIGHTS_FILE in result.output and "Traceback" not in result.output


def test_truncated_weights_of_an_artefact_without_manifest_are_named(copy):
    (copy / MANIFEST_FILE).unlink()
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "UNCHECKED" in result.output and "OK" not in result.output, result.output
    (copy / WEIGHTS_FILE).write_bytes((copy / WEIGHTS_FILE).read_bytes()[:-50])
    with pytest.raises(DamagedFileError, match=WEIGHTS_FILE):
        load_quantized(copy)


def test_random_weights_with_a_matching_manifest_still_give_one_clear_error(copy):
    (copy / WEIGHTS_FILE).write_bytes(bytes(range(256)) * 8)
    write_manifest(copy)  # a consistent but foreign file: safetensors' own error must not leak as a traceback
    with pytest.raises(DamagedFileError, match=WEIGHTS_FILE):
        load_quantized(copy)


def test_every_removed_file_is_named(artefact, tmp_path):
    names = json.loads((artefact / MANIFEST_FILE).read_text())["files"]
    assert {"tadq_config.json", WEIGHTS_FILE, "unet/config.json", "tadq_output.json"} <= set(names)
    for name in names:
        target = tmp_path / name.replace("/", "_")
        shutil.copytree(artefact, target)
        (target / name).unlink()
        with pytest.raises((ValueError, FileNotFoundError), match=Path(name).name):
            load_quantized(target)


def test_swapped_files_are_detected(copy):
    config, index = (copy / "tadq_config.json").read_bytes(), (copy / "model_index.json").read_bytes()
    (copy / "tadq_config.json").write_bytes(index)
    (copy / "model_index.json").write_bytes(config)
    with pytest.raises(ValueError, match="model_index.json|tadq_config.json"):
        load_quantized(copy)


@pytest.mark.parametrize(("file", "text", "needle"), [
    ("tadq_config.json", "[1, 2]", "quant_config"),
    ("tadq_config.json", '{"format_version": 1, "quant_config": "W8A8"}', "quant_config"),
    ("tadq_config.json", '{"quant_config": {', "not valid JSON"),
    ("unet/config.json", "{]", "not valid JSON"),
    ("tadq_quant_map.json", "\"a string\"", "tadq_quant_map.json"),
    ("scheduler/scheduler_config.json", "[]", "scheduler_config.json"),
])
def test_wrong_json_types_name_the_file(copy, file, text, needle):
    (copy / file).write_text(text)
    write_manifest(copy)  # consistent files of the wrong shape, not bit damage
    with pytest.raises(ValueError, match=needle) as error:
        load_quantized(copy)
    assert Path(file).name in str(error.value) or needle in str(error.value)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_weights_in_an_artefact_are_refused_naming_the_tensor(copy, value, kind):
    tensors = load_file(copy / WEIGHTS_FILE)
    name = next(k for k, v in tensors.items() if k.endswith("conv_norm_out.weight"))
    tensors[name][0] = value
    from safetensors import safe_open

    with safe_open(str(copy / WEIGHTS_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(copy / WEIGHTS_FILE), metadata=metadata)
    write_manifest(copy)
    with pytest.raises(ValueError, match=f"conv_norm_out.weight holds {kind}"):
        load_quantized(copy)


def test_added_file_fails_verify_but_not_load(copy):
    (copy / "notes.txt").write_text("mine")
    load_quantized(copy)
    result = runner.invoke(app, ["verify", str(copy)])
    assert result.exit_code == 1 and "notes.txt" in result.output


def test_verify_passes_a_sound_artefact(artefact):
    result = runner.invoke(app, ["verify", str(artefact)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "files match the manifest" in result.output


# -- checkpoints and caches ------------------------------------------------------------------------------------------

def test_damaged_reconstruction_checkpoint_is_refused_and_kept(tiny_unet, ddpm_scheduler, tmp_path):
    calib = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)
    config = ReconstructionConfig(weight_iters=1, activation_iters=0, batch_size=4)

    def fresh():
        return tadq.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A16", calibration=CALIB),
                             calibration=calib, progress=False)

    checkpoint = tmp_path / "recon.safetensors"
    qmodel = fresh()
    reconstruct(qmodel.model, tiny_unet, qmodel.adapter, calib, config, checkpoint=checkpoint, progress=False)
    data = bytearray(checkpoint.read_bytes())
    for damaged in (data[: len(data) - 7], data[:-40] + bytes([data[-40] ^ 0xFF]) + data[-39:]):
        checkpoint.write_bytes(bytes(damaged))
        qmodel = fresh()
        with pytest.raises(DamagedFileError, match="recon.safetensors"):
            reconstruct(qmodel.model, tiny_unet, qmodel.adapter, calib, config, checkpoint=checkpoint,
                        progress=False)
        assert checkpoint.read_bytes() == bytes(damaged)  # nothing overwritten: the user decides


def test_damaged_calibration_cache_is_refused(tiny_unet, ddpm_scheduler, tmp_path):
    adapter = adapter_for(tiny_unet)
    collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, CALIB, cache_dir=tmp_path, progress=False)
    (cache,) = tmp_path.glob("calibration-*.safetensors")
    data = bytearray(cache.read_bytes())
    data[-3] ^= 0x10
    cache.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=cache.name):
        collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, CALIB, cache_dir=tmp_path, progress=False)


def test_cache_of_other_settings_names_the_field(tiny_unet, ddpm_scheduler, tmp_path):
    adapter = adapter_for(tiny_unet)
    collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, CALIB, cache_dir=tmp_path, progress=False)
    (cache,) = tmp_path.glob("calibration-*.safetensors")
    other = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4,
                              batch_size=8, seed=5)
    from tadq.calibration.data import calibration_key

    cache.rename(tmp_path / f"calibration-{calibration_key(tiny_unet, ddpm_scheduler.config, other)}.safetensors")
    with pytest.raises(ValueError, match="differs in: config"):
        collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, other, cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_non_finite_model_is_refused_before_anything_is_cached(tiny_unet, ddpm_scheduler, tmp_path, value, kind):
    with torch.no_grad():
        tiny_unet.conv_in.weight[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=f"conv_in.weight holds {kind}"):
        tadq.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=CALIB),
                      cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="calibration data recorded from the FP model"):  # the data path alone
        collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB,
                                cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []  # NaN data is never cached


# -- configs and model folders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "needle"), [
    ("{not json", "not valid JSON (line 1"),
    ('{"type": "QuantConfig", "version": 1}', "is not a tadq config"),
    ("[]", "is not a tadq config"),
    ('{"type": "QuantConfig", "version": 1, "data": {"method": "magic"}}', "method must be one of"),
    ('{"type": "QuantConfig", "version": 1, "data": {"bogus": 1}}', "no fields"),
])
def test_malformed_config_is_one_line_naming_the_file(tmp_path, tiny_model_dir, text, needle):
    config = tmp_path / "config.json"
    config.write_text(text)
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--config",
                                 str(config), "--cache-dir", str(tmp_path / "cache"), *SMALL])
    _one_line_error(result, "--config", needle)
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


def test_broken_json_in_a_model_folder_names_the_file(tmp_path, tiny_model_dir):
    (tiny_model_dir / "unet" / "config.json").write_text('{"_class_name": "UNet2DModel",\n  oops}')
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), *SMALL])
    _one_line_error(result, "config.json", "line 2")


def test_truncated_model_weights_name_the_folder(tmp_path, tiny_model_dir):
    (weights,) = (tiny_model_dir / "unet").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), *SMALL])
    _one_line_error(result, "could not load weights")


def test_traceback_only_with_verbose(tmp_path, tiny_model_dir):
    args = ["quantize", str(tmp_path / "missing"), "--out", str(tmp_path / "q")]
    assert "Traceback" not in runner.invoke(app, args).output
    assert "Traceback" in runner.invoke(app, [*args, "--verbose"]).output


def test_api_type_errors_name_the_argument(tiny_unet, ddpm_scheduler):
    with pytest.raises(TypeError, match="tadq.quantize: scheduler"):
        tadq.quantize(tiny_unet, "ddpm", QuantConfig())
    with pytest.raises(TypeError, match="Recipe or a QuantConfig, got str"):
        tadq.quantize(tiny_unet, ddpm_scheduler, "W8A8")
    with pytest.raises(TypeError, match="tadq.sample: sampler must be a SamplerConfig"):
        tadq.sample(tiny_unet, ddpm_scheduler, "ddim", num_samples=2, seed=0)
    with pytest.raises(TypeError, match="tadq.sample: num_samples must be a int"):
        tadq.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=2.5, seed=0)
    with pytest.raises(TypeError, match="load_quantized takes a folder path"):
        tadq.load(42)


# -- paths -----------------------------------------------------------------------------------------------------------

def test_overwrite_leaves_a_foreign_folder_byte_identical(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = _tree(out)
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--overwrite", *SMALL,
                                 "--cache-dir", str(tmp_path / "cache")])
    _one_line_error(result, "tadq did not write", "--force-foreign")
    assert _tree(out) == before and not (tmp_path / "cache").exists()  # refused before any work
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--overwrite",
                                 "--force-foreign", *SMALL, "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert not (out / "thesis.tex").exists() and (out / "tadq_output.json").is_file()


def test_plain_file_at_out_is_left_alone(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    out.write_text("a file")
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--overwrite", *SMALL])
    _one_line_error(result, "is a file")
    assert out.read_text() == "a file"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_overlapping_the_input_model_is_refused(tmp_path, tiny_model_dir, where):
    out = {"same": tiny_model_dir, "inside": tiny_model_dir / "q", "parent": tiny_model_dir.parent}[where]
    before = _tree(tiny_model_dir)
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--overwrite", *SMALL])
    _one_line_error(result, "input")
    assert _tree(tiny_model_dir) == before


def test_overwrite_replaces_tadqs_own_artefact(tmp_path, tiny_model_dir):
    args = ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), *SMALL, "--cache-dir", str(tmp_path / "c")]
    assert runner.invoke(app, args).exit_code == 0
    _one_line_error(runner.invoke(app, args), "--overwrite")
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("flag", ["--out", "--cache-dir"])
def test_read_only_targets_fail_before_any_work(tmp_path, tiny_model_dir, flag):
    paths = {"--out": str(tmp_path / "q"), "--cache-dir": str(tmp_path / "cache"), flag: str(READ_ONLY / "x")}
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), *SMALL, *[a for k, v in paths.items()
                                                                             for a in (k, v)]])
    _one_line_error(result, flag, "not writable")
    assert not (tmp_path / "q").exists() and not (tmp_path / "cache").exists()


def test_sample_out_must_name_a_png_file(tmp_path, tiny_model_dir):
    (tmp_path / "grid").mkdir()
    for out, needle in ((tmp_path / "grid", "must end in .png"), (tmp_path / "grid.jpg", "must end in .png"),
                        (tmp_path / "grid" / "x.png" / "..", "must end in .png")):
        result = runner.invoke(app, ["sample", str(tiny_model_dir), "--num-samples", "2", "--steps", "2",
                                     "--out", str(out)])
        _one_line_error(result, needle)
    result = runner.invoke(app, ["sample", str(tiny_model_dir), "--num-samples", "2", "--steps", "2",
                                 "--out", str(tmp_path / "grid" / "s.png")])
    assert result.exit_code == 0 and f"wrote {tmp_path / 'grid' / 's.png'}" in result.output.replace("\n", "")
    assert (tmp_path / "grid" / "s.png").is_file() and not (tmp_path / "grid.png").exists()


def test_evaluate_refuses_a_foreign_report_folder_before_sampling(tmp_path, artefact, tiny_model_dir):
    report = tmp_path / "report"
    report.mkdir()
    (report / "keep.md").write_text("mine")
    result = runner.invoke(app, ["evaluate", str(artefact), "--reference", str(tiny_model_dir), "--num-samples", "4",
                                 "--steps", "2", "--out", str(report)])
    _one_line_error(result, "tadq did not write")
    assert _tree(report) == {"keep.md": hashlib.sha256(b"mine").hexdigest()}


def test_nan_samples_fail_fast_before_metrics():
    from tadq.metrics.frechet import fd_digits

    images = torch.zeros(8, 1, 8, 8)
    images[3] = float("nan")
    with pytest.raises(ValueError, match="1 of 8 images hold NaN or Inf"):
        fd_digits(torch.zeros(8, 1, 8, 8), images, classifier=None)


# -- determinism -----------------------------------------------------------------------------------------------------

def test_two_identical_quantize_runs_give_identical_bytes(tmp_path, tiny_model_dir):
    trees = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / name), *SMALL,
                                     "--preset", "W4A8", "--cache-dir", str(tmp_path / f"cache-{name}")])
        assert result.exit_code == 0, result.output
        trees.append(_tree(tmp_path / name))
    assert trees[0] == trees[1]
    assert MANIFEST_FILE in trees[0] and WEIGHTS_FILE in trees[0]


def test_overflowing_activations_are_refused_after_calibration(tiny_unet, ddpm_scheduler):
    calib = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)
    calib = dataclasses.replace(calib, fields=None)  # as if built by hand: it is not this (changed) model's
    with torch.no_grad():
        tiny_unet.conv_in.weight.mul_(1e37)  # finite weights whose outputs overflow float32 downstream
    # named by the quantizer that saw the overflow, before any range is used
    with pytest.raises(ValueError, match=r"activation range after calibration: [\w.]+quantizer: .*no finite 8-bit"):
        tadq.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=CALIB),
                      calibration=calib, progress=False)


def test_verify_checks_tables_against_the_recipe(tmp_path, tiny_unet, ddpm_scheduler):
    import dataclasses

    from tadq.corrections import PTQDConfig
    from tadq.recipe import Recipe

    recipe = dataclasses.replace(Recipe.from_quant_config(QuantConfig.from_preset("W8A8", calibration=CALIB)),
                                 corrections=(PTQDConfig(num_samples=8, seed=1),))
    qmodel = tadq.quantize(tiny_unet, ddpm_scheduler, recipe, progress=False)
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    result = runner.invoke(app, ["verify", str(tmp_path / "q")])
    assert result.exit_code == 0 and "PTQDCorrection): W8A8, ddim-4-eta0.0" in result.output, result.output
    text = (tmp_path / "q" / "tadq_recipe.json").read_text()
    recipe_json = json.loads(text)
    recipe_json["data"]["deployments"][0]["data"]["guidance_scale"] = 2.0
    (tmp_path / "q" / "tadq_recipe.json").write_text(json.dumps(recipe_json))
    write_manifest(tmp_path / "q")  # a recipe deploying another guidance than the tables were fitted for
    result = runner.invoke(app, ["verify", str(tmp_path / "q")])
    assert result.exit_code == 1 and "recipe deploys ddim-4-eta0.0 at guidance 2.0" in result.output, result.output
    legacy = tmp_path / "legacy"  # an artefact saved before manifests: safetensors damage still named
    shutil.copytree(tmp_path / "q", legacy)
    (legacy / MANIFEST_FILE).unlink()
    tables = legacy / "corrections.safetensors"
    tables.write_bytes(tables.read_bytes()[:-20])
    with pytest.raises(DamagedFileError, match="corrections.safetensors"):
        load_quantized(legacy)
    qmodel.corrections[0].table_key = dataclasses.replace(qmodel.corrections[0].table_key, bits="W4A8")
    save_quantized(qmodel, tmp_path / "bad", ddpm_scheduler)  # consistent files, tables of another model
    result = runner.invoke(app, ["verify", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "W4A8" in result.output and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("command", [["run", "--num-samples", "2"], ["sample-sharded", "--num-samples", "2"],
                                     ["bench", "--num-samples", "2"]])
def test_run_like_commands_refuse_a_foreign_out_folder_before_work(tmp_path, tiny_model_dir, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    flag = "--out-dir" if command[0] == "sample-sharded" else "--out"
    model = [str(tiny_model_dir)] if command[0] == "sample-sharded" else ["--model", str(tiny_model_dir)]
    result = runner.invoke(app, [command[0], *model, *command[1:], flag, str(out)])
    _one_line_error(result, "tadq did not write")
    assert _tree(out) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_checkpoint_inside_the_input_model_is_refused(tmp_path, tiny_model_dir):
    before = _tree(tiny_model_dir)
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method",
                                 "qdiffusion", "--checkpoint", str(tiny_model_dir / "recon.safetensors"), *SMALL])
    _one_line_error(result, "--checkpoint", "inside the input")
    assert _tree(tiny_model_dir) == before
