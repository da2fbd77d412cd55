"""Model folders as users have them on disk, beyond a plain ``save_pretrained``: weights saved as a variant only
(``variant="fp16"``), sharded weights, the Hugging Face hub-cache layout (every file a link into ``blobs/``),
half-precision weights, and the damage an interrupted download leaves. Each either loads exactly what diffusers
itself loads, or is refused naming the file before any model is built."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DModel,
)
from safetensors.torch import load_file, save_file
from tests.adapters.test_transformer2d import build_tiny_dit
from tests.conftest import build_tiny_unet
from tests.pipelines.builders import build_sd

from tadq.models import load_pipeline_parts, load_scheduler
from tadq.pipelines import PipelineFolderError, check_pipeline_folder, load_fp_pipeline
from tadq.safefiles import DamagedFileError, find_weight_files

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Bit-equal parameters and buffers, dtypes included."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _ddpm_folder(path: Path, unet: UNet2DModel | None = None, **save_options) -> Path:
    DDPMPipeline(unet=unet or build_tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(path, **save_options)
    return path


def _to_hub_cache(source: Path, hub: Path, revision: str = "0123456789abcdef") -> Path:
    """``source`` laid out as ``huggingface_hub`` caches a download: content-addressed files in ``blobs/`` and a
    snapshot folder of relative links to them; returns the snapshot folder (what users pass)."""
    repo = hub / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / revision, repo / "blobs"
    blobs.mkdir(parents=True)
    for file in sorted(source.rglob("*")):
        if file.is_file():
            blob = blobs / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def _no_from_pretrained(monkeypatch) -> None:
    """Fail the test if a model is built: a refusal must come from the checks, before any weights are read."""
    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained was called before the folder was refused")

    monkeypatch.setattr(UNet2DModel, "from_pretrained", refuse)


# -- layouts that load ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"variant": "fp16"}, {"variant": "fp16", "max_shard_size": "20KB"},
                                     {"max_shard_size": "20KB"}], ids=["variant", "sharded-variant", "sharded"])
def test_variant_and_sharded_folders_load_as_diffusers_loads_them(tmp_path, options):
    """A folder saved with ``variant="fp16"`` holds ``diffusion_pytorch_model.fp16.safetensors`` only; it used to be
    refused with diffusers' "no file named diffusion_pytorch_model.safetensors"."""
    unet = build_tiny_unet().half()  # what a hub fp16 variant holds: float16 tensors
    folder = _ddpm_folder(tmp_path / "model", unet, **options)
    names = sorted(p.name for p in (folder / "unet").iterdir())
    assert WEIGHTS not in names and len(names) > 1
    loaded, scheduler = load_pipeline_parts(folder)
    reference = UNet2DModel.from_pretrained(folder / "unet", variant=options.get("variant"), use_safetensors=True,
                                            low_cpu_mem_usage=False)
    assert _same_state(loaded, reference)
    assert all(torch.equal(value.float(), loaded.state_dict()[name]) for name, value in unet.state_dict().items())
    assert isinstance(scheduler, DDPMScheduler)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_as_diffusers_loads_them(tmp_path, dtype):
    unet = build_tiny_unet().to(dtype)
    folder = _ddpm_folder(tmp_path / "model", unet)
    loaded, _ = load_pipeline_parts(folder)
    reference = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, low_cpu_mem_usage=False)
    assert _same_state(loaded, reference)
    assert all(torch.equal(value.float(), loaded.state_dict()[name]) for name, value in unet.state_dict().items())


def test_a_hub_cache_snapshot_of_links_loads_and_a_deleted_blob_is_named(tmp_path, monkeypatch):
    source = _ddpm_folder(tmp_path / "model")
    snapshot = _to_hub_cache(source, tmp_path / "hub")
    assert (snapshot / "unet" / WEIGHTS).is_symlink()
    loaded, _ = load_pipeline_parts(snapshot)
    assert _same_state(loaded, load_pipeline_parts(source)[0])
    assert load_scheduler(snapshot).config == load_scheduler(source).config
    (snapshot / "unet" / WEIGHTS).resolve().unlink()  # what a cleaned-up or interrupted download leaves
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DamagedFileError, match=rf"unet/{WEIGHTS} is a link to .*blobs/.*which does not exist"):
        load_pipeline_parts(snapshot)


# -- layouts refused before any model is built ---------------------------------------------------------------------

def _empty(file: Path) -> None:
    file.write_bytes(b"")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-10])


@pytest.mark.parametrize(("damage", "needle"), [(_empty, r"is damaged: an empty file \(0 bytes\)"),
                                                (_truncate, r"is damaged: \d+ bytes, its header describes \d+")])
def test_an_empty_or_truncated_shard_is_named_before_loading(tmp_path, monkeypatch, damage, needle):
    folder = _ddpm_folder(tmp_path / "model", max_shard_size="20KB")
    shard = sorted((folder / "unet").glob("*-of-*.safetensors"))[-1]
    damage(shard)
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DamagedFileError, match=rf"could not load weights from .*{shard.name} {needle}"):
        load_pipeline_parts(folder)


def _rewrite_header(file: Path, edit) -> None:
    """``edit(header text) -> header text`` on a safetensors file, its data bytes kept."""
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = edit(data[8:8 + length].decode()).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length:])


def _edit_entry(key: str, **fields):
    def edit(text: str) -> str:
        header = json.loads(text)
        header[key] |= fields
        return json.dumps(header)
    return edit


def _name_twice(text: str) -> str:  # a second "conv_in.bias" entry, over conv_in.weight's bytes
    header = json.loads(text)
    return text.rstrip()[:-1] + ', "conv_in.bias": ' + json.dumps(header["conv_in.weight"]) + "}"


@pytest.mark.parametrize(("edit", "needle"), [
    (_edit_entry("conv_in.bias", dtype="F16"), r"tensor 'conv_in\.bias' is F16 \[4\], 8 bytes, but its offsets span "
                                               r"16 bytes"),
    (_edit_entry("conv_in.bias", shape=[8]), r"tensor 'conv_in\.bias' is F32 \[8\], 32 bytes, but its offsets span"),
    (_edit_entry("conv_in.bias", data_offsets=[-4, 12]), r"tensor 'conv_in\.bias' is not described by a dtype"),
    (_name_twice, r"key 'conv_in\.bias' appears twice"),
    (lambda text: text.replace('"format":"pt"', '"format":5'), r"its __metadata__ is not an object of strings"),
])
def test_a_safetensors_header_that_contradicts_itself_is_named_before_loading(tmp_path, monkeypatch, edit, needle):
    """diffusers reported each of these only as "Unable to load weights from checkpoint file", which says neither
    what is wrong nor that it was known from the header alone."""
    folder = _ddpm_folder(tmp_path / "model")
    _rewrite_header(folder / "unet" / WEIGHTS, edit)
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DamagedFileError, match=rf"{WEIGHTS} is damaged: .*{needle}"):
        load_pipeline_parts(folder)


def _drop_a_shard(index: Path) -> str:
    shard = sorted(index.parent.glob("*-of-*.safetensors"))[0]
    shard.unlink()
    return rf"{shard.name} is missing: {index.name} lists it as one of \d+ shards"


def _point_outside(index: Path) -> str:
    content = json.loads(index.read_text())
    name = next(iter(content["weight_map"]))
    content["weight_map"][name] = "../../elsewhere.safetensors"
    index.write_text(json.dumps(content))
    return r"lists the shard '\.\./\.\./elsewhere\.safetensors', which is not a file name inside"


def _empty_map(index: Path) -> str:
    index.write_text(json.dumps({"metadata": {}, "weight_map": {}}))
    return "is damaged: no weight_map"


@pytest.mark.parametrize("edit", [_drop_a_shard, _point_outside, _empty_map])
def test_a_shard_index_that_does_not_describe_its_shards_is_refused(tmp_path, monkeypatch, edit):
    folder = _ddpm_folder(tmp_path / "model", max_shard_size="20KB")
    needle = edit(folder / "unet" / f"{WEIGHTS}.index.json")
    _no_from_pretrained(monkeypatch)
    with pytest.raises(DamagedFileError, match=needle):
        load_pipeline_parts(folder)


def test_several_variants_without_plain_weights_are_refused_by_name(tmp_path):
    folder = _ddpm_folder(tmp_path / "model", variant="fp16")
    shutil.copyfile(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors",
                    folder / "unet" / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(ValueError, match=r"several variants \(diffusion_pytorch_model\.bf16\.safetensors, "
                                         r"diffusion_pytorch_model\.fp16\.safetensors\).*cannot be guessed"):
        load_pipeline_parts(folder)
    shutil.copyfile(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors", folder / "unet" / WEIGHTS)
    assert find_weight_files(folder / "unet").variant is None  # plain weights beside variants: the plain ones


def test_a_variant_pickle_is_named_and_never_unpickled(tmp_path, monkeypatch):
    folder = _ddpm_folder(tmp_path / "model", variant="fp16", safe_serialization=False)
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.fp16.bin"]
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(ValueError, match=r"no safetensors weights .*diffusion_pytorch_model\.fp16\.bin is a pickle.*"
                                         r"never a pickle"):
        load_pipeline_parts(folder)


@pytest.mark.parametrize("config", [{"sample_size": 8}, {"_class_name": None}, {"_class_name": ""}])
def test_a_config_without_a_class_name_is_refused_listing_the_supported_ones(tmp_path, config):
    folder = _ddpm_folder(tmp_path / "model")
    file = folder / "unet" / "config.json"
    file.write_text(json.dumps({k: v for k, v in json.loads(file.read_text()).items() if k != "_class_name"} | config))
    with pytest.raises(ValueError, match=r"unet/config\.json names no model class .*Supported: \[.*'UNet2DModel'"):
        load_pipeline_parts(folder)


def test_unknown_config_keys_are_ignored_as_diffusers_ignores_them(tmp_path):
    folder = _ddpm_folder(tmp_path / "model")
    file = folder / "unet" / "config.json"
    file.write_text(json.dumps(json.loads(file.read_text()) | {"some_future_option": [1, 2]}))
    assert _same_state(load_pipeline_parts(folder)[0], build_tiny_unet())


def _dit_pipeline(path: Path) -> Path:
    build_tiny_dit().save_pretrained(path / "transformer")
    DDIMScheduler().save_pretrained(path / "scheduler")
    from tests.pipelines.builders_transformer import _vae

    _vae().save_pretrained(path / "vae")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}))
    return path


def test_a_pipeline_whose_vae_is_gone_or_truncated_is_refused_before_loading(tmp_path, monkeypatch):
    """A DiT pipeline missing its VAE used to be loaded, calibrated and quantized, and refused only when its
    artefact (which copies the VAE) was written."""
    folder = _dit_pipeline(tmp_path / "dit")
    assert type(load_pipeline_parts(folder)[0]) is DiTTransformer2DModel
    _truncate(folder / "vae" / WEIGHTS)

    def refuse(*args, **kwargs):
        raise AssertionError("the denoiser was loaded before the folder was refused")

    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", refuse)
    with pytest.raises(DamagedFileError, match=rf"vae/{WEIGHTS} is damaged"):
        load_pipeline_parts(folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(ValueError, match=r"is incomplete: the component folder vae/ \(AutoencoderKL\) named in "
                                         "model_index.json is missing"):
        load_pipeline_parts(folder)
    with pytest.raises(ValueError, match="vae/"):  # what commands check samplers against, before any work
        load_scheduler(folder)


# -- whole text-to-image pipelines ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_variant_folder(tmp_path_factory) -> Path:
    """A Stable Diffusion folder as hub fp16 branches hold it: every component ``*.fp16.safetensors`` only (float16
    tensors), and a ``model_index.json`` naming a safety checker and feature extractor whose folders the user
    deleted (tadq loads neither)."""
    root = tmp_path_factory.mktemp("sd-layouts")
    pipe = StableDiffusionPipeline.from_pretrained(build_sd(root / "sd"), safety_checker=None,
                                                   requires_safety_checker=False)
    folder = root / "sd-fp16"
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    index = json.loads((folder / "model_index.json").read_text())
    index |= {"safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
              "feature_extractor": ["transformers", "CLIPImageProcessor"], "requires_safety_checker": True}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_variant_only_pipeline_without_its_safety_checker_loads_as_diffusers_loads_it(sd_variant_folder):
    layout = check_pipeline_folder(sd_variant_folder)
    assert layout.variant == "fp16" and "safety_checker" in layout.components
    pipe = load_fp_pipeline(sd_variant_folder)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    reference = StableDiffusionPipeline.from_pretrained(sd_variant_folder, variant="fp16", use_safetensors=True,
                                                        safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        assert _same_state(getattr(pipe, name), getattr(reference, name)), name
    unet, _ = load_pipeline_parts(sd_variant_folder)
    assert _same_state(unet, reference.unet)


def test_a_quantized_variant_pipeline_saves_and_loads_back(sd_variant_folder, tmp_path):
    """From a hub-cache snapshot: the artefact copies the variant components as files, not links into the cache
    (and leaves out the absent safety checker); ``load_pipeline`` reads them as the FP folder's loader does."""
    import dataclasses

    import tadq
    from tadq.pipelines import PromptConditions, save_pipeline
    from tadq.recipe import Deployment, Recipe
    from tadq.sampling import SamplerConfig

    pytest.importorskip("tadq.adapters.unet_condition")
    sampler = SamplerConfig("ddim", num_steps=2, eta=0.0)
    recipe = Recipe.from_preset("W8A8")
    recipe = dataclasses.replace(
        recipe, calibration=dataclasses.replace(recipe.calibration, sampler=sampler, num_trajectories=2,
                                                num_steps_kept=2, samples_per_step=2),
        deployments=(Deployment(sampler=sampler, guidance_scale=2.0),))
    source = _to_hub_cache(sd_variant_folder, tmp_path / "hub")
    pipe = load_fp_pipeline(source)
    qmodel = tadq.quantize(pipe.unet, pipe.scheduler, recipe, conditions=PromptConditions(pipe, ["a cat"]),
                           progress=False)
    out = tmp_path / "artefact"
    save_pipeline(qmodel, source, out)
    assert not (out / "safety_checker").exists()
    assert (out / "text_encoder" / "model.fp16.safetensors").is_file()
    assert not any(path.is_symlink() for path in out.rglob("*"))
    loaded = tadq.load_pipeline(out)
    assert _same_state(loaded.text_encoder, pipe.text_encoder) and _same_state(loaded.vae, pipe.vae)


def test_components_of_different_variants_are_refused(sd_variant_folder, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(sd_variant_folder, folder)
    (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").rename(
        folder / "vae" / "diffusion_pytorch_model.bf16.safetensors")
    with pytest.raises(PipelineFolderError, match=r"different variants only \(text_encoder fp16, unet fp16, vae "
                                                  r"bf16\)"):
        check_pipeline_folder(folder)


def test_a_pipeline_component_with_a_deleted_blob_is_named(sd_variant_folder, tmp_path):
    snapshot = _to_hub_cache(sd_variant_folder, tmp_path / "hub")
    assert check_pipeline_folder(snapshot).variant == "fp16"
    (snapshot / "text_encoder" / "model.fp16.safetensors").resolve().unlink()
    with pytest.raises(PipelineFolderError, match=r"text_encoder/model\.fp16\.safetensors is a link to .*does not "
                                                  "exist"):
        load_fp_pipeline(snapshot)


def test_a_component_folder_of_a_pipeline_takes_the_pipelines_scheduler(tmp_path, caplog):
    """``sd/unet`` used to be read with DDPM defaults (linear betas, epsilon) in place of the pipeline's own
    schedule (here scaled-linear, v-prediction), with only a warning."""
    folder = tmp_path / "model"
    DDPMPipeline(unet=build_tiny_unet(), scheduler=DDPMScheduler(beta_schedule="scaled_linear",
                                                                 prediction_type="v_prediction")).save_pretrained(folder)
    _, scheduler = load_pipeline_parts(folder / "unet")
    assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "v_prediction"
    assert load_scheduler(folder / "unet").config == scheduler.config
    assert "DDPM defaults" not in caplog.text
    alone = tmp_path / "alone"
    shutil.copytree(folder / "unet", alone)  # a bare model folder, which never had a scheduler: defaults, warned
    assert load_pipeline_parts(alone)[1].config.beta_schedule == "linear" and "DDPM defaults" in caplog.text


def test_a_single_file_checkpoint_is_refused_naming_the_conversion(tmp_path):
    file = tmp_path / "model.safetensors"
    shutil.copyfile(_ddpm_folder(tmp_path / "model") / "unet" / WEIGHTS, file)
    with pytest.raises(ValueError, match=r"model\.safetensors is a file; tadq reads diffusers model folders.*"
                                         r"from_single_file"):
        load_pipeline_parts(file)


def test_a_hub_cache_repository_folder_is_refused_naming_its_snapshot(tmp_path):
    snapshot = _to_hub_cache(_ddpm_folder(tmp_path / "model"), tmp_path / "hub")
    repo = snapshot.parents[1]
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    (repo / "snapshots" / "an-older-revision").mkdir()
    with pytest.raises(ValueError, match=rf"not a diffusers model folder.*hub-cache folder: pass its snapshot "
                                         rf"{re.escape(str(snapshot))}$"):
        load_pipeline_parts(repo)


# -- weights that do not cover the model ---------------------------------------------------------------------------

def test_weights_missing_a_parameter_are_refused_not_filled_at_random(tmp_path):
    """diffusers fills a parameter the file lacks with its random initialization and only logs a warning; tadq
    then quantized a partly random model."""
    folder = _ddpm_folder(tmp_path / "model")
    file = folder / "unet" / WEIGHTS
    tensors = load_file(file)
    del tensors["conv_norm_out.weight"]
    save_file(tensors, file)
    with pytest.raises(DamagedFileError, match=r"unet: its weights lack 1 of the UNet2DModel's parameters \(e\.g\. "
                                               r"conv_norm_out\.weight\), which diffusers would fill with random"):
        load_pipeline_parts(folder)


def test_weights_a_config_has_no_place_for_are_refused_not_dropped(tmp_path):
    """A class-conditional UNet whose config lost ``num_class_embeds`` built an unconditional model; diffusers
    dropped the label table with a warning and tadq quantized a model that ignored every label."""
    folder = _ddpm_folder(tmp_path / "model", build_tiny_unet(num_class_embeds=3))
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "num_class_embeds"}))
    with pytest.raises(DamagedFileError, match=r"unet: its weights hold 1 tensor the UNet2DModel built from its "
                                               r"config\.json has no place for \(class_embedding\.weight\), which "
                                               r"diffusers would drop"):
        load_pipeline_parts(folder)


def test_a_stored_buffer_the_class_no_longer_saves_still_loads(tmp_path):
    """A tensor that names one of the model's buffers (a positional table an older diffusers saved and the current
    one recomputes) is not a config mismatch: diffusers ignores it and so does the check."""
    model = build_tiny_dit()
    folder = tmp_path / "dit"
    model.save_pretrained(folder / "transformer")
    DDIMScheduler().save_pretrained(folder / "scheduler")
    file = folder / "transformer" / WEIGHTS
    tensors = load_file(file)
    buffers = {name for name, _ in model.named_buffers()} - set(model.state_dict())
    assert buffers, "the tiny DiT has a non-persistent buffer to store"
    name = sorted(buffers)[0]
    tensors[name] = dict(model.named_buffers())[name].contiguous()
    save_file(tensors, file)
    assert _same_state(load_pipeline_parts(folder / "transformer")[0], model)


@pytest.mark.parametrize(("dtype", "name"), [(torch.int64, "I64"), (torch.int8, "I8"), (torch.uint8, "U8")])
def test_a_float_weight_stored_as_integers_is_refused_not_cast(tmp_path, dtype, name):
    """``load_state_dict`` copies int64 values into a float32 weight without a word: integer codes (a quantized
    file) were loaded as the model's weights and quantized again."""
    folder = _ddpm_folder(tmp_path / "model")
    file = folder / "unet" / WEIGHTS
    tensors = load_file(file)
    tensors["conv_in.weight"] = tensors["conv_in.weight"].mul(100).to(dtype)
    save_file(tensors, file)
    with pytest.raises(DamagedFileError, match=rf"unet: its weights store the float parameter conv_in\.weight as "
                                               rf"{name} \(integers or booleans\)"):
        load_pipeline_parts(folder)


@pytest.mark.parametrize(("key", "value"), [("layers_per_block", "2"), ("block_out_channels", 32),
                                            ("norm_num_groups", None)])
def test_a_config_value_of_the_wrong_type_names_the_config(tmp_path, key, value):
    """diffusers fails inside a block with a TypeError naming no file ("'str' object cannot be interpreted as an
    integer"): the CLI printed that one line, and Python callers got a TypeError from deep in diffusers."""
    folder = _ddpm_folder(tmp_path / "model")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {key: value}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))} does not build a UNet2DModel \(TypeError: "):
        load_pipeline_parts(folder)


def test_shards_missing_a_parameter_are_refused_beside_a_single_file_that_holds_it(tmp_path):
    """diffusers reads the shards an index lists even when a single weight file lies beside them; the parameter
    check used to read both, so a parameter only the unread single file held passed while diffusers filled it at
    random."""
    unet = build_tiny_unet()
    folder = _ddpm_folder(tmp_path / "model", unet, max_shard_size="20KB")
    save_file({name: value.contiguous() for name, value in unet.state_dict().items()}, folder / "unet" / WEIGHTS)
    index_file = folder / "unet" / f"{WEIGHTS}.index.json"
    index = json.loads(index_file.read_text())
    shard = folder / "unet" / index["weight_map"].pop("conv_out.weight")
    index_file.write_text(json.dumps(index))
    tensors = load_file(shard)
    del tensors["conv_out.weight"]
    save_file(tensors, shard)
    with pytest.raises(DamagedFileError, match=r"lack 1 of the UNet2DModel's parameters \(e\.g\. conv_out\.weight\)"):
        load_pipeline_parts(folder)
    assert find_weight_files(folder / "unet").files == tuple(sorted((folder / "unet").glob("*-of-*.safetensors")))


def test_old_attention_key_names_load_as_diffusers_renames_them(tmp_path):
    """google/ddpm-* checkpoints name attention weights query/key/value/proj_attn; diffusers renames them while
    loading, so the parameter check must not refuse them."""
    folder = _ddpm_folder(tmp_path / "model")
    file = folder / "unet" / WEIGHTS
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for name, tensor in load_file(file).items():
        for new_part, old_part in renames.items():
            name = name.replace(new_part, old_part) if ".attentions." in name else name
        old[name] = tensor
    assert any(".query." in name for name in old)
    save_file(old, file)
    assert _same_state(load_pipeline_parts(folder)[0], build_tiny_unet())


def test_a_pipeline_denoiser_missing_a_parameter_is_refused(sd_variant_folder, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(sd_variant_folder, folder)
    file = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    tensors = load_file(file)
    del tensors["conv_out.bias"]
    save_file(tensors, file)
    with pytest.raises(PipelineFolderError, match=r"unet: its weights lack 1 .*conv_out\.bias"):
        load_fp_pipeline(folder)


def test_an_empty_or_dangling_config_is_named_as_such(tmp_path):
    folder = _ddpm_folder(tmp_path / "model")
    (folder / "unet" / "config.json").write_text("")
    with pytest.raises(ValueError, match=r"model config .*unet/config\.json is empty \(0 bytes"):
        load_pipeline_parts(folder)
    snapshot = _to_hub_cache(_ddpm_folder(tmp_path / "other"), tmp_path / "hub")
    (snapshot / "model_index.json").resolve().unlink()
    with pytest.raises(ValueError, match=r"model_index\.json is a link to .*blobs/.*which does not exist"):
        load_pipeline_parts(snapshot)


def test_a_variant_only_vae_decodes_as_diffusers_loads_it(tmp_path):
    """``folder_vae_decoder`` (the VAE ``tadq run`` / ``tadq sample`` decode a DiT or LDM folder's latents with)
    loaded ``vae/`` without a variant, so a folder saved with ``variant="fp16"`` failed with "could not load the VAE
    ... no file named diffusion_pytorch_model.safetensors"; its weights are checked whole and complete too."""
    from diffusers import AutoencoderKL

    from tadq.experiments.workload import folder_vae_decoder

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=8)
    vae.half().save_pretrained(tmp_path / "vae", variant="fp16")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                           "vae": ["diffusers", "AutoencoderKL"]}))
    latents = torch.randn(2, 4, 4, 4)
    # frozen as tadq freezes it: whether the weights require grad picks torch's conv kernel, and on an AVX2 CPU the
    # two kernels differed in the last bit (1.8e-7) while giving the same numbers on AVX-512
    reference = AutoencoderKL.from_pretrained(tmp_path / "vae", variant="fp16").float().eval().requires_grad_(False)
    with torch.no_grad():
        expected = reference.decode(latents / reference.config.scaling_factor).sample
        got = folder_vae_decoder(tmp_path, dtype=torch.float32)(latents)
    torch.testing.assert_close(got, expected.clamp(-1, 1), rtol=0, atol=0)
    (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="could not load the VAE.*empty file"):
        folder_vae_decoder(tmp_path)
