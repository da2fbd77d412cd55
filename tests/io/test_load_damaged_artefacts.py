"""Damaged and hostile artefact files that used to load silently, or fail deep inside torch, diffusers or json.

Most cases rewrite the manifest after the damage (``write_manifest``): a consistent artefact of the wrong shape,
so what is checked is the loader's own validation, not the SHA-256 check. Every case runs on one tiny W4A8
artefact built once per module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.io.tiny_artefacts import save_tiny_artefact

from tadq.io import WEIGHTS_FILE, load_quantized, save_quantized
from tadq.io.manifest import MANIFEST_FILE, ArtefactDamaged, verify_manifest, write_manifest
from tadq.models import load_pipeline_parts
from tadq.safefiles import read_json_file

LAYER = "model.down_blocks.0.resnets.0.conv1"  # a quantized conv, 4·4·3·3 = 144 weights: 72 packed bytes
THREE_BIT = "model.down_blocks.0.resnets.0.conv2"  # given 3-bit weights (layer_bits)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory) -> Path:
    return save_tiny_artefact(tmp_path_factory.mktemp("probe") / "q", "W4A8",
                              layer_bits=((THREE_BIT.removeprefix("model."), 3, 8),))


def _edit_weights(folder: Path, edit) -> None:
    """Apply ``edit(tensors, metadata)`` to the weights file and rewrite the manifest to match."""
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(folder / WEIGHTS_FILE)
    edit(tensors, metadata)
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata=metadata)
    write_manifest(folder)


def _edit_json(folder: Path, name: str, edit) -> None:
    document = json.loads((folder / name).read_text())
    edit(document)
    (folder / name).write_text(json.dumps(document))
    write_manifest(folder)


def _set(key: str, value: float):
    def edit(tensors, _metadata):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value
    return edit


def _replace(key: str, fn):
    def edit(tensors, _metadata):
        tensors[key] = fn(tensors[key])
    return edit


# -- tadq_weights.safetensors: dtypes, shapes, packing ---------------------------------------------------------------

@pytest.mark.parametrize(("key", "fn", "needle"), [
    (f"{LAYER}.weight.codes", lambda t: t.to(torch.int8), "is int8 \\[72\\], but .* expects uint8 \\[72\\]"),
    (f"{LAYER}.weight.codes", lambda t: t.float(), "is float32 \\[72\\], but .* expects uint8 \\[72\\]"),
    (f"{LAYER}.weight.codes", lambda t: torch.cat([t, t[:1]]), "is uint8 \\[73\\], but .* expects uint8 \\[72\\]"),
    (f"{LAYER}.weight.codes", lambda t: t[:-1], "is uint8 \\[71\\]"),
    (f"{LAYER}.weight.codes", lambda t: t.reshape(8, 9), "is uint8 \\[8, 9\\]"),
    (f"{LAYER}.weight_quantizer.scale", lambda t: (t * 1000).to(torch.int64), "is int64 \\[4\\], but .* float32"),
    (f"{LAYER}.weight_quantizer.scale", lambda t: t.double(), "is float64 \\[4\\]"),
    (f"{LAYER}.weight_quantizer.scale", lambda t: t[:2], "is float32 \\[2\\], but .* expects float32 \\[4\\]"),
])
def test_a_tensor_of_the_wrong_dtype_or_shape_is_named(copy, key, fn, needle):
    _edit_weights(copy, _replace(key, fn))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}: '{key}' {needle}"):
        load_quantized(copy)


@pytest.mark.parametrize(("quantizer", "value", "needle"), [
    ("weight_quantizer", float("nan"), "step size Δ = nan"),
    ("weight_quantizer", 0.0, "step size Δ = 0.0"),
    ("weight_quantizer", -0.01, "step size Δ = -0.0099"),
    ("input_quantizer", 0.0, "step size Δ = 0.0"),
    ("input_quantizer", float("inf"), "step size Δ = inf"),
])
def test_a_step_size_that_is_not_finite_and_positive_is_refused(copy, quantizer, value, needle):
    _edit_weights(copy, _set(f"{LAYER}.{quantizer}.scale", value))
    with pytest.raises(ValueError, match=f"quantizer {LAYER}.{quantizer} .*{needle}"):
        load_quantized(copy)


def _as_format_1(folder: Path) -> None:
    """Rewrite a format-2 artefact as format 1 wrote it: every zero point float32 (format 2 stores integer dtypes)."""
    _edit_weights(folder, lambda tensors, _metadata: tensors.update(
        {key: value.float() for key, value in tensors.items() if key.endswith(".zero_point")}))
    _edit_json(folder, "tadq_config.json", lambda document: document.update(format_version=1))


def _outputs(folder: Path) -> torch.Tensor:
    qmodel, _ = load_quantized(folder)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *qmodel.sample_shape, generator=generator)
    return qmodel(x, torch.tensor([10, 500]))


def test_zero_points_are_stored_as_integers_and_a_format_1_artefact_loads_to_the_same_model(artefact, copy):
    """Format 2 stores each calibrated zero point in the smallest integer dtype of its grid (uint8 here), which
    widens back to the same float32 values; format 1's float32 zero points still load, to the same outputs."""
    stored = load_file(artefact / WEIGHTS_FILE)
    assert stored[f"{LAYER}.weight_quantizer.zero_point"].dtype == torch.uint8
    assert stored[f"{LAYER}.input_quantizer.zero_point"].dtype == torch.uint8
    _as_format_1(copy)
    assert load_file(copy / WEIGHTS_FILE)[f"{LAYER}.weight_quantizer.zero_point"].dtype == torch.float32
    assert torch.equal(_outputs(copy), _outputs(artefact))


def test_a_float_zero_point_in_a_format_2_artefact_is_named(copy):
    key = f"{LAYER}.weight_quantizer.zero_point"
    _edit_weights(copy, _replace(key, lambda t: t.float()))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}: '{key}' is float32 \\[4\\], but .* expects uint8 \\[4\\]"):
        load_quantized(copy)


@pytest.mark.parametrize(("quantizer", "value", "grid", "format_version"), [
    ("weight_quantizer", 16.0, "[0, 15]", 2), ("weight_quantizer", 255.0, "[0, 15]", 2),
    ("weight_quantizer", 16.0, "[0, 15]", 1), ("weight_quantizer", -1.0, "[0, 15]", 1),
    ("weight_quantizer", 0.5, "[0, 15]", 1), ("input_quantizer", 300.0, "[0, 255]", 1),
    ("input_quantizer", 2.5, "[0, 255]", 1),
])
def test_a_zero_point_off_the_grid_is_refused(copy, quantizer, value, grid, format_version):
    """Format 2's uint8 storage cannot hold a fraction or a value beyond 255, but can hold one beyond a 4-bit grid;
    format 1's float32 could hold any."""
    if format_version == 1:
        _as_format_1(copy)
    _edit_weights(copy, _set(f"{LAYER}.{quantizer}.zero_point", value))
    with pytest.raises(ValueError, match=f"zero point z = {value}; z must be an integer in {re.escape(grid)}"):
        load_quantized(copy)


def test_a_quantizer_marked_uncalibrated_is_refused_at_load(copy):
    _edit_weights(copy, _replace(f"{LAYER}.input_quantizer.initialized", lambda t: torch.zeros_like(t)))
    with pytest.raises(ValueError, match=f"{LAYER}.input_quantizer .*has no range"):
        load_quantized(copy)


def test_codes_off_a_narrow_grid_are_refused(copy):
    # THREE_BIT's codes are nibbles in [0, 7]: a nibble of 15 fits the byte but not the 3-bit grid
    _edit_weights(copy, _replace(f"{THREE_BIT}.weight.codes", lambda t: t | 0x0F))
    with pytest.raises(ValueError, match=f"'{THREE_BIT}.weight.codes' holds codes outside \\[0, 7\\] of its 3-bit"):
        load_quantized(copy)


@pytest.mark.parametrize(("metadata", "needle"), [
    ("{oops", "tadq_codes metadata is not valid JSON"),
    ("[1, 2]", "tadq_codes metadata is not an object"),
    (json.dumps({f"{LAYER[6:]}.weight": "x"}), "tadq_codes metadata is not an object"),
])
def test_damaged_codes_metadata_is_one_error_naming_the_file(copy, metadata, needle):
    _edit_weights(copy, lambda _tensors, meta: meta.__setitem__("tadq_codes", metadata))
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE}: its {needle}"):
        load_quantized(copy)


# -- tadq_config.json, tadq_recipe.json, the diffusers configs -------------------------------------------------------

@pytest.mark.parametrize(("value", "needle"), [
    (True, "format_version is True"), (-3, "format_version is -3"), ("1", "format_version is '1'"),
])
def test_a_format_version_that_is_not_a_positive_int_is_refused(copy, value, needle):
    _edit_json(copy, "tadq_config.json", lambda d: d.__setitem__("format_version", value))
    with pytest.raises(ValueError, match=f"tadq_config.json: {needle}"):
        load_quantized(copy)


@pytest.mark.parametrize("folder", ["../../elsewhere/unet", "/tmp/unet", 3, "", ".."])
def test_a_denoiser_folder_outside_the_artefact_is_refused(copy, folder):
    _edit_json(copy, "tadq_config.json", lambda d: d.__setitem__("denoiser_folder", folder))
    with pytest.raises(ValueError, match="denoiser_folder .* is not the name of a folder inside the artefact"):
        load_quantized(copy)


def test_invalid_quant_config_names_the_file(copy):
    _edit_json(copy, "tadq_config.json", lambda d: d["quant_config"]["data"]["weights"]["data"].__setitem__("bits", 9))
    with pytest.raises(ValueError, match="tadq_config.json: quant_config is malformed .*bits must be an integer"):
        load_quantized(copy)


def test_a_config_that_does_not_fit_the_model_names_the_file(copy):
    """A ``layer_bits`` entry naming a layer the rebuilt model does not quantize was refused by the plan without
    the file's name (every other inconsistent field of ``tadq_config.json`` names it)."""
    _edit_json(copy, "tadq_config.json",
               lambda d: d["quant_config"]["data"].__setitem__("layer_bits", [["nope", 8, 8]]))
    with pytest.raises(ValueError, match="tadq_config.json: quant_config does not fit the UNet2DModel .*layer_bits "
                                         "names \\['nope'\\], which are not quantized layers"):
        load_quantized(copy)


def test_invalid_recipe_names_the_file(copy):
    _edit_json(copy, "tadq_recipe.json", lambda d: d["data"]["method"].__setitem__("type", "MagicMethod"))
    with pytest.raises(ValueError, match="tadq_recipe.json: Recipe.method: unknown config type 'MagicMethod'"):
        load_quantized(copy)


def test_a_model_class_that_disagrees_with_the_denoiser_config_is_refused(copy):
    _edit_json(copy, "tadq_config.json", lambda d: d.__setitem__("model_class", "DiTTransformer2DModel"))
    with pytest.raises(ValueError, match="unet/config.json describes a 'UNet2DModel', but tadq_config.json"):
        load_quantized(copy)


def test_a_denoiser_config_diffusers_cannot_build_names_the_file(copy):
    _edit_json(copy, "unet/config.json", lambda d: d.__setitem__("block_out_channels", "abc"))
    with pytest.raises(ValueError, match="unet/config.json does not build a UNet2DModel"):
        load_quantized(copy)


def test_a_denoiser_config_with_other_shapes_names_the_tensor(copy):
    _edit_json(copy, "unet/config.json", lambda d: d.__setitem__("in_channels", 3))
    with pytest.raises(ValueError, match="'model.conv_in.weight' .*\\[4, 1, 3, 3\\].*\\[4, 3, 3, 3\\]"):
        load_quantized(copy)


@pytest.mark.parametrize(("edit", "needle"), [
    ({"_class_name": "UniPCMultistepScheduler"}, "cannot be driven by tadq"),
    ({"beta_schedule": "magic"}, "magic is not implemented"),
    ({"prediction_type": "magic"}, "prediction_type='magic' is not supported"),
])
def test_a_scheduler_config_tadq_cannot_drive_is_refused_at_load_naming_the_file(copy, edit, needle):
    _edit_json(copy, "scheduler/scheduler_config.json", lambda d: d.update(edit))
    with pytest.raises(ValueError, match=f"scheduler_config.json: .*{needle}"):
        load_quantized(copy)


# -- the manifest ----------------------------------------------------------------------------------------------------

def _edit_manifest(folder: Path, edit) -> None:
    """Edit the manifest as a tool that rewrites it whole would, its digest recomputed (a stale digest is refused
    first, as the manifest's own damage: tests/cli/test_measuring_commands.py)."""
    from tadq.io.manifest import _digest

    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    edit(manifest)
    manifest["digest"] = _digest(manifest["files"])
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../etc/hostname", "unet/../../x"])
def test_a_manifest_entry_outside_the_artefact_is_refused_unread(copy, name):
    _edit_manifest(copy, lambda m: m["files"].__setitem__(name, {"sha256": "0" * 64, "bytes": 3}))
    with pytest.raises(ArtefactDamaged, match="a path outside the artefact folder"):
        verify_manifest(copy)


def test_a_newer_manifest_version_is_refused(copy):
    _edit_manifest(copy, lambda m: m.__setitem__("version", 2))
    with pytest.raises(ArtefactDamaged, match="manifest version 2, newer than this tadq reads"):
        load_quantized(copy)


@pytest.mark.parametrize("name", ["tadq_config.json", WEIGHTS_FILE, "unet/config.json"])
def test_a_file_the_loader_reads_must_be_listed_in_the_manifest(copy, name):
    _edit_manifest(copy, lambda m: m["files"].pop(name))
    with pytest.raises(ArtefactDamaged, match=f"{name} is not listed in {MANIFEST_FILE}"):
        load_quantized(copy)


@pytest.mark.parametrize("name", [MANIFEST_FILE, WEIGHTS_FILE])
def test_the_manifest_or_a_listed_file_replaced_by_a_folder_is_named_as_damage(copy, name):
    """A folder where the manifest should be is damage, not an older artefact without one; a folder where a listed
    file should be is named as such, not reported as a hash mismatch."""
    (copy / name).unlink()
    (copy / name).mkdir()
    with pytest.raises(ArtefactDamaged, match=f"{name} is not a regular file"):
        load_quantized(copy)


# -- files that are not files; pickles -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_json_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, kind):
    path = tmp_path / "config.json"
    if kind == "device":
        os.symlink("/dev/zero", path)  # read_text() would read forever
    elif kind == "fifo":
        os.mkfifo(path)  # read_text() would block forever
    else:
        path.mkdir()
    with pytest.raises(ValueError, match="config.json is not a regular file"):
        read_json_file(path, "model config")


def test_a_model_folder_whose_config_is_a_device_is_refused(tiny_model_dir):
    (tiny_model_dir / "unet" / "config.json").unlink()
    os.symlink("/dev/zero", tiny_model_dir / "unet" / "config.json")
    with pytest.raises(ValueError, match="unet/config.json is not a regular file"):
        load_pipeline_parts(tiny_model_dir)


def test_a_pickled_bin_model_is_refused_and_never_unpickled(tiny_model_dir, monkeypatch):
    (weights,) = (tiny_model_dir / "unet").glob("*.safetensors")
    torch.save(load_file(weights), tiny_model_dir / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(ValueError, match="holds no safetensors weights .*diffusion_pytorch_model.bin.*never a pickle"):
        load_pipeline_parts(tiny_model_dir)
    assert calls == []


# -- corrections.safetensors -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corrected(tmp_path_factory) -> Path:
    from tadq.corrections import PTQDConfig

    return save_tiny_artefact(tmp_path_factory.mktemp("probe-corrections") / "q", "W8A8",
                              corrections=(PTQDConfig(num_samples=8, seed=1),))


def _edit_tables(folder: Path, edit) -> None:
    file = folder / "corrections.safetensors"
    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(file)
    edit(tensors, metadata)
    save_file(tensors, str(file), metadata=metadata)
    write_manifest(folder)


@pytest.mark.parametrize(("edit", "needle"), [
    (_replace("members.0.k", lambda t: t.to(torch.int64)), "table 'members.0.k' is int64, but correction 0 "
                                                           "\\(PTQDCorrection, PTQDConfig\\) stores float64"),
    (_replace("members.0.k", lambda t: torch.full_like(t, float("nan"))), "table members.0.k holds NaN"),
    (_replace("members.0.k", lambda t: t[:1]), "tables \\['k'\\] have \\[1\\] rows, but its key says 2 steps"),
    (lambda _t, meta: meta.__setitem__("tadq_extra_state", "[1]"), "tadq_extra_state metadata is not a JSON object"),
])
def test_damaged_correction_tables_are_refused_at_load_naming_the_file(corrected, tmp_path, edit, needle):
    copy = Path(shutil.copytree(corrected, tmp_path / "q"))
    _edit_tables(copy, edit)
    with pytest.raises(ValueError, match=f"corrections.safetensors: .*{needle}"):
        load_quantized(copy)


@pytest.fixture(scope="module")
def tfmq_artefact(tmp_path_factory) -> Path:
    """A tiny TFMQ artefact with both kinds of per-step tables: FSC ranges and a 2-bit quantized feature cache."""
    from tests.conftest import build_tiny_unet
    from tests.tfmq.common import SAMPLER, calibration, quant_config, scheduler, tfmq_config

    from tadq.tfmq import quantize_tfmq

    torch.set_num_threads(1)
    model, sched = build_tiny_unet(), scheduler()
    settings = tfmq_config(maintenance="cache_quantized", cache_bits=2)
    qmodel = quantize_tfmq(model, sched, quant_config("W4A8"), settings, SAMPLER,
                           calibration=calibration(model, sched), progress=False)
    folder = tmp_path_factory.mktemp("probe-tfmq") / "q"
    save_quantized(qmodel, folder, sched)
    return folder


def _set_layout(field: str, edit):
    """Edit field ``field`` of the TFMQ correction's layout (its extra state in the tables' metadata)."""
    def apply(_tensors, metadata):
        extra = json.loads(metadata["tadq_extra_state"])
        layout = extra["members.0._extra_state"]
        layout[field] = edit(layout[field])
        metadata["tadq_extra_state"] = json.dumps(extra)
    return apply


@pytest.mark.parametrize(("edit", "needle"), [
    (_set("members.0.fsc_scale", 0.0), "time_embedding.linear_1.input_quantizer \\(int8-asym.*\\) has step size "
                                       "Δ = 0.0 at step 0; Δ must be finite and > 0"),
    (_set("members.0.fsc_scale", -1.0), "has step size Δ = -1.0 at step 0"),
    (_set("members.0.fsc_zero_point", 300.0), "has zero point z = 300.0 at step 0; z must be an integer in "
                                              "\\[0, 255\\]"),
    (_set("members.0.fsc_zero_point", 2.5), "has zero point z = 2.5 at step 0"),
    (_set("members.0.cache_scale", 0.0), "TFMQ table cache_scale holds a step size 0.0"),
    (_set("members.0.cache_zero_point", 7.0), "cache_zero_point holds a zero point off the 2-bit cache grid"),
    (_set("members.0.cache_codes", 200), "cache_codes holds code 200, beyond the 2-bit cache grid \\[0, 3\\]"),
    (_set_layout("fsc_quantizers", lambda names: names[:-1]), "fsc_scale is \\[8, 10\\], but its 9 quantizers"),
    (_set_layout("fsc_quantizers", lambda names: [names[0], *names[:-1]]), "fsc_quantizers must be distinct"),
    (_set_layout("fsc_quantizers", lambda names: ["nope.input_quantizer", *names[1:]]),
     "nope.input_quantizer is no module of this UNet2DModel"),
    (_set_layout("cache_storage", lambda _: "int3"), "cache_storage is 'int3', not 'fp', 'quantized' or null"),
    (_set_layout("cache_layers", lambda layers: [["nope", *layers[0][1:]], *layers[1:]]),
     "cache holds 4 features of nope, which is no module"),
    (_set_layout("cache_layers", lambda layers: [[layers[0][0], 5, layers[0][2]], *layers[1:]]),
     "cache layout: .* at columns \\[5, 9\\) does not follow"),
])
def test_damaged_tfmq_tables_are_refused_at_load_naming_the_file(tfmq_artefact, tmp_path, edit, needle):
    """TFMQ's per-step tables were loaded unchecked: a per-step Δ of 0 or −1, a zero point of 300 or 2.5, an edited
    cache Δ, z or code, or a layout that drops or repeats a column loaded and sampled another model (int8 too, with
    z = 300 handed to a uint8 kernel), and a name the network lacks was a raw AttributeError. The same Δ and z in
    ``tadq_weights.safetensors`` are refused (test_a_step_size_that_is_not_finite_and_positive_is_refused)."""
    copy = Path(shutil.copytree(tfmq_artefact, tmp_path / "q"))
    _edit_tables(copy, edit)
    with pytest.raises(ValueError, match=f"corrections.safetensors: .*{needle}"):
        load_quantized(copy)


def test_a_sound_tfmq_artefact_loads(tfmq_artefact):
    """The checks above pass the tables ``quantize_tfmq`` writes."""
    qmodel, _ = load_quantized(tfmq_artefact)
    assert qmodel.corrections[0].active


@pytest.mark.parametrize("name", ["model_index.json", "tadq_recipe.json"])
@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_a_damaged_file_read_before_loading_is_named_as_damage(artefact, tmp_path, name, damage):
    """``tadq sample`` and ``tadq evaluate`` read ``model_index.json`` (is it a text-to-image pipeline?) and
    ``tadq_recipe.json`` (the deployment sampler) before the artefact loads and its manifest is checked: a truncated
    one was "not valid JSON; fix or replace the file" and an edited one that still parsed "holds a None, not a
    Recipe", where every other damaged file says what the manifest recorded and to save the artefact again."""
    from typer.testing import CliRunner

    from tadq.cli.app import app

    folder = tmp_path / "q"
    shutil.copytree(artefact, folder)
    assert name in json.loads((folder / MANIFEST_FILE).read_text())["files"]
    text = (folder / name).read_text()
    (folder / name).write_text(text[:len(text) // 2] if damage == "truncated" else "{}")
    for command in (["sample", str(folder), "--num-samples", "1", "--out", str(tmp_path / "s.png")],
                    ["evaluate", str(folder), "--num-samples", "1", "--out", str(tmp_path / "report")]):
        result = CliRunner().invoke(app, command)
        message = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert str(folder / name) in message and "when saved (truncated or replaced); save the artefact again" in \
            message, message
    with pytest.raises(ArtefactDamaged, match="save the artefact again"):
        verify_manifest(folder)
