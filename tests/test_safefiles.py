"""The pickle-free file format: round trips, determinism, and every kind of damage as one clear error."""

from __future__ import annotations

import pickle

import pytest
import torch

from tadq.safefiles import (
    DamagedFileError,
    diffusers_loading_options,
    join_tensors,
    load_checked,
    read_json_file,
    require_finite,
    save_checked,
    split_tensors,
)


def test_round_trip_and_identical_bytes(tmp_path):
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.tensor([True, False]), "c": torch.zeros(())}
    meta = {"z": 1, "a": [1.5, None, "x"], "m": {"q": 2, "b": 3}}
    save_checked(tensors, meta, tmp_path / "one.safetensors")
    save_checked(dict(reversed(tensors.items())), dict(reversed(meta.items())), tmp_path / "two.safetensors")
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    loaded, loaded_meta = load_checked(tmp_path / "one.safetensors", "test file")
    assert loaded_meta == meta and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    tree, tensors = split_tensors({"optimizer": optimizer.state_dict(), "rng": torch.Generator().get_state()})
    save_checked(tensors, tree, tmp_path / "state.safetensors")
    state = join_tensors(*reversed(load_checked(tmp_path / "state.safetensors", "state")))
    fresh = torch.optim.AdamW(layer.parameters())
    fresh.load_state_dict(state["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_unstorable_objects_are_refused():
    with pytest.raises(TypeError, match="without pickle"):
        split_tensors({"x": object()})


class _Exploit:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_pickle_is_refused_and_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(DamagedFileError, match="evil.safetensors"):
        load_checked(path, "checkpoint")
    torch.save({"x": _Exploit()}, tmp_path / "evil.pt")  # torch's zip pickle format, as old tadq wrote
    with pytest.raises(DamagedFileError, match="evil.pt"):
        load_checked(tmp_path / "evil.pt", "checkpoint")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header", "empty", "random"])
def test_damage_is_one_clear_error_naming_the_file(tmp_path, damage):
    path = tmp_path / "f.safetensors"
    save_checked({"w": torch.arange(64.0)}, {"k": 1}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "flip_data":
        data[-5] ^= 0xFF
    elif damage == "flip_header":
        data[12] ^= 0x20
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="f.safetensors") as error:
        load_checked(path, "thing")
    assert "\n" not in str(error.value)


def _rewrite_header(path, edit) -> None:
    """Rewrite the tadq metadata of a checked file in place, keeping the tensors' bytes (and checksum) as they are."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from tadq.safefiles import META_KEY

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        header = handle.metadata()[META_KEY]
    save_file(tensors, str(path), metadata={META_KEY: edit(header) if callable(edit) else json.dumps(edit)})


def test_a_changed_byte_in_the_metadata_is_damage_not_another_value(tmp_path):
    """The checksum covered the tensors only: a flipped digit in the metadata loaded as another value (a training
    checkpoint's step 2 read as 3 resumed a step late, silently)."""
    import json

    path = tmp_path / "f.safetensors"
    save_checked({"w": torch.arange(4.0)}, {"step": 2, "lr": 0.001}, path)
    data = bytearray(path.read_bytes())
    at = data.index(b'\\"step\\": 2') + len(b'\\"step\\": ')
    data[at] ^= 0x01  # "2" -> "3": the header stays valid JSON of the same length
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match="f.safetensors fails its metadata checksum"):
        load_checked(path, "thing")

    save_checked({"w": torch.arange(4.0)}, {"step": 2}, path)  # the digest's own name changed: not an older file
    _rewrite_header(path, lambda header: header.replace('"meta_sha256"', '"meta_sha257"'))
    with pytest.raises(DamagedFileError, match="f.safetensors has unreadable tadq metadata"):
        load_checked(path, "thing")

    save_checked({"w": torch.arange(4.0)}, {"step": 2}, path)  # written before the metadata digest: still read
    _rewrite_header(path, lambda header: json.dumps({k: v for k, v in json.loads(header).items()
                                                     if k != "meta_sha256"}, sort_keys=True))
    assert load_checked(path, "thing")[1] == {"step": 2}


def test_metadata_that_json_round_trips_loads_back(tmp_path):
    """The metadata digest is taken before saving and checked after loading: every value JSON stores must give
    the same digest both times (tuples read back as lists, floats exactly, non-finite floats, non-ASCII text)."""
    meta = {"t": (1, 2), "f": [0.1, 1e-300, 2.0**60, -0.0], "nan": float("inf"), "text": "größe ✓", "n": None,
            "nested": {"b": [True, False], "a": {"z": 1}}}
    save_checked({"w": torch.zeros(1)}, meta, tmp_path / "f.safetensors")
    loaded = load_checked(tmp_path / "f.safetensors", "thing")[1]
    assert loaded == {**meta, "t": [1, 2]}


def test_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(line 2"):
        read_json_file(path, "model config")


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
def test_require_finite_names_the_tensor(value, kind):
    with pytest.raises(ValueError, match=f"layer conv.weight holds {kind}"):
        require_finite({"conv.weight": torch.tensor([1.0, value])}, "layer")
    require_finite({"ok": torch.ones(3), "ints": torch.arange(3)}, "layer")


@pytest.mark.parametrize("accelerate", [True, False])
def test_every_diffusers_load_follows_one_low_cpu_mem_usage_rule(tmp_path, tiny_model_dir, accelerate, monkeypatch):
    """An FP model folder and a folder's VAE were loaded with ``low_cpu_mem_usage=False`` always, pipelines only
    without accelerate: two rules for one choice. Every diffusers load asks ``diffusers_loading_options`` now
    (with accelerate installed or not: the check is stubbed, diffusers falls back itself when it is absent)."""
    import json

    from diffusers import AutoencoderKL, ModelMixin

    from tadq import safefiles
    from tadq.experiments.workload import folder_vae_decoder
    from tadq.models import load_pipeline_parts
    from tadq.pipelines.components import pipeline_load_options

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, sample_size=8).save_pretrained(tmp_path / "dit" / "vae")
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline",
                                                                   "vae": ["diffusers", "AutoencoderKL"]}))
    monkeypatch.setattr(safefiles, "_accelerate_installed", lambda: accelerate)
    rule = diffusers_loading_options()
    assert rule == ({} if accelerate else {"low_cpu_mem_usage": False})
    original, asked = ModelMixin.__dict__["from_pretrained"].__func__, []

    def spy(cls, *args, **kwargs):
        asked.append((cls.__name__, {key: value for key, value in kwargs.items() if key == "low_cpu_mem_usage"}))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(spy))
    load_pipeline_parts(tiny_model_dir)
    folder_vae_decoder(tmp_path / "dit")
    assert asked == [("UNet2DModel", rule), ("AutoencoderKL", rule)]
    assert {key: value for key, value in pipeline_load_options(ModelMixin, None).items()
            if key == "low_cpu_mem_usage"} == rule


def test_metadata_with_integer_keys_and_tuples_reads_back_under_its_checksum(tmp_path):
    """JSON turns int keys into strings (which then sort as strings: 1, 10, 2) and tuples into lists: the metadata
    checksum is of the metadata as read back, so such a file is not taken for a damaged one."""
    path = tmp_path / "x.safetensors"
    save_checked({"a": torch.ones(2)}, {"per_step": {1: 0.5, 10: 0.25, 2: 1.0}, "shape": (1, 2)}, path)
    assert load_checked(path, "test")[1] == {"per_step": {"1": 0.5, "10": 0.25, "2": 1.0}, "shape": [1, 2]}


@pytest.mark.parametrize(("extra", "noted"), [({}, False), ({"foo": 1}, True)])
def test_a_registered_flux_sample_size_loads_without_diffusers_ignore_note(tmp_path, extra, noted):
    """tadq reads a Flux config's ``sample_size`` (the latent side users register) while diffusers noted on every load
    that it "will be ignored"; any other extra key is still noted."""
    import logging

    from diffusers import FluxTransformer2DModel

    from tadq.safefiles import diffusers_loading_options

    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    model.register_to_config(sample_size=8, **extra)
    model.save_pretrained(tmp_path / "flux")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.configuration_utils")
    logger.addHandler(handler)
    try:
        loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "flux", **diffusers_loading_options())
    finally:
        logger.removeHandler(handler)
    assert loaded.config.sample_size == 8  # what tadq's Flux adapter reads
    ignored = [message for message in records if "will be ignored" in message]
    assert bool(ignored) == noted, ignored
