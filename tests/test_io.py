import copy
import dataclasses
import json
import math

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tadq
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.fsguard import OutputRefused
from tadq.io import CONFIG_FILE, WEIGHTS_FILE, ArtefactSize, load_quantized, pack_codes, save_quantized, unpack_codes
from tadq.io.manifest import write_manifest
from tadq.io.save import CODES_SUFFIX
from tadq.quant import QScheme, Quantizer, QuantLayer, quantize_to_int
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


@pytest.fixture
def calibration(tiny_unet, ddpm_scheduler):
    return collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)


def _quantize(model, scheduler, calibration, name="W4A8", **overrides):
    config = QuantConfig.from_preset(name, calibration=CALIB, **overrides)
    return api.quantize(model, scheduler, config, calibration=calibration, progress=False)


def _public(config) -> dict:
    return {key: value for key, value in dict(config).items() if not key.startswith("_")}


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(4, 1, 8, 8, generator=generator), torch.tensor([0, 10, 500, 999])


def _assert_same_model(saved, loaded):
    x, t = _inputs()
    assert torch.equal(saved(x, t), loaded(x, t))
    saved_layers = {n: m for n, m in saved.named_modules() if isinstance(m, QuantLayer)}
    loaded_layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLayer)}
    assert saved_layers.keys() == loaded_layers.keys() and saved_layers
    for name, layer in saved_layers.items():
        assert torch.equal(layer.quantized_weight(), loaded_layers[name].quantized_weight()), name


@pytest.mark.parametrize("name", ["W8A8", "W4A8", "W4A4", "W4A16", "W4A8-FP8", "W8A8-FP8", "W4A8-G5", "W4A4-G16"])
def test_round_trip_is_bit_identical(tmp_path, tiny_unet, ddpm_scheduler, calibration, name):
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, name)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    _assert_same_model(qmodel, loaded)
    assert loaded.config == qmodel.config and loaded.quantization_map() == qmodel.quantization_map()
    assert _public(scheduler.config) == _public(ddpm_scheduler.config)
    runs = [api.sample(m, scheduler, SAMPLER, num_samples=2, seed=5, progress=False).images for m in (qmodel, loaded)]
    assert torch.equal(runs[0], runs[1])


def test_load_builds_the_network_once_without_copying_it(tmp_path, tiny_unet, ddpm_scheduler, calibration,
                                                        monkeypatch):
    """The architecture load builds from config.json was deep-copied before its layers were wrapped: two networks
    in memory at once (and a fifth of a load's time) for one whose weights the artefact overwrites anyway. The
    loaded model must be built without copying a module and stay the saved one bit for bit."""
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    deepcopy, copied = copy.deepcopy, []

    def spy(value, *args, **kwargs):
        if isinstance(value, torch.nn.Module):
            copied.append(type(value).__name__)
        return deepcopy(value, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(copy, "deepcopy", spy)
        loaded, _ = tadq.load(tmp_path / "q")
    assert copied == []
    _assert_same_model(qmodel, loaded)


def test_load_runs_no_random_init(tmp_path, tiny_unet, ddpm_scheduler, calibration, monkeypatch):
    """The architecture load builds from config.json was randomly initialised (a draw per weight: most of a large
    model's build time) before the artefact overwrote every tensor. No ``torch.nn.init`` initializer runs during a
    load now, and the loaded model is the saved one bit for bit."""
    from tadq.io.load import WEIGHT_INITIALIZERS

    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    ran: list[str] = []  # initializers run on real memory (the fake-quant wrappers' own are built on "meta")
    for name in WEIGHT_INITIALIZERS:
        initializer = getattr(torch.nn.init, name)
        monkeypatch.setattr(torch.nn.init, name,
                            lambda tensor, *args, name=name, initializer=initializer, **kwargs:
                            (None if tensor.is_meta else ran.append(name)) or initializer(tensor, *args, **kwargs))
    torch.nn.Linear(2, 2)  # the spies see a build outside a load
    assert ran and set(ran) <= set(WEIGHT_INITIALIZERS)
    ran.clear()
    loaded, _ = tadq.load(tmp_path / "q")
    assert ran == []
    _assert_same_model(qmodel, loaded)


def test_every_tensor_the_init_would_set_is_loaded(tmp_path, tiny_unet, ddpm_scheduler, calibration, monkeypatch):
    """Skipping the init is safe only because the artefact overwrites every tensor an initializer would have set:
    built with NaN there instead of leaving memory as allocated, the loaded model is still the saved one."""
    import contextlib

    import tadq.io.load as loading

    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8", split_shortcut=True, quantize_attention=True)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    filled: list[torch.Tensor] = []

    @contextlib.contextmanager
    def nan_init():
        with monkeypatch.context() as patch:
            for name in loading.WEIGHT_INITIALIZERS:
                patch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: filled.append(tensor)
                              or tensor.detach().fill_(math.nan) if tensor.is_floating_point() else tensor)
            yield

    monkeypatch.setattr(loading, "skipped_weight_init", nan_init)
    loaded, _ = tadq.load(tmp_path / "q")
    assert filled and all(bool(torch.isfinite(tensor).all()) for tensor in filled)
    _assert_same_model(qmodel, loaded)


def test_load_looks_up_no_layer_by_name_unless_a_tensor_is_refused(tmp_path, tiny_unet, ddpm_scheduler, calibration,
                                                                   monkeypatch):
    """Every stored tensor's owning module was looked up (a get_submodule walk) and formatted into the message of an
    error that a valid artefact never raises; the lookup is left for the error."""
    import tadq.io.load as loading

    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W8A8")
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    owner, calls = loading._owner, []
    monkeypatch.setattr(loading, "_owner", lambda *args: calls.append(args[1]) or owner(*args))
    loaded, _ = tadq.load(tmp_path / "q")
    assert calls == []
    _assert_same_model(qmodel, loaded)


@pytest.mark.parametrize("name", ["W8A8", "W4A8"])
def test_a_channels_last_model_saves_and_loads(tmp_path, tiny_unet, ddpm_scheduler, calibration, name):
    """``model.to(memory_format=torch.channels_last)`` (a common speed setting) quantized and sampled, then
    ``save_pretrained`` failed inside safetensors on the 8-bit codes, which kept the weights' strides. The layout
    is not part of the model: the weight codes are the contiguous twin's, and the loaded model is the saved one
    (compared in one layout: channels-last float convolutions round differently)."""
    channels_last = copy.deepcopy(tiny_unet).to(memory_format=torch.channels_last)
    assert not channels_last.down_blocks[0].resnets[0].conv1.weight.is_contiguous()
    qmodel = _quantize(channels_last, ddpm_scheduler, calibration, name)
    qmodel.save_pretrained(tmp_path / "last", ddpm_scheduler)
    _quantize(tiny_unet, ddpm_scheduler, calibration, name).save_pretrained(tmp_path / "plain", ddpm_scheduler)
    stored = {label: load_file(str(tmp_path / label / WEIGHTS_FILE)) for label in ("last", "plain")}
    codes = [key for key in stored["plain"] if key.endswith(CODES_SUFFIX)]
    assert codes and all(torch.equal(stored["last"][key], stored["plain"][key]) for key in codes)
    # docs/architecture.md: the loaded model is contiguous; put in the saved one's layout it gives its bits back
    _assert_same_model(qmodel, tadq.load(tmp_path / "last")[0].to(memory_format=torch.channels_last))
    _assert_same_model(qmodel.to(memory_format=torch.contiguous_format), tadq.load(tmp_path / "last")[0])


def test_round_trip_with_exclusions_reconstruction_and_structural_features(
    tmp_path, tiny_unet, ddpm_scheduler, calibration,
):
    reconstruction = ReconstructionConfig(weight_iters=4, activation_iters=4, batch_size=4)
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8", exclude=("conv_in",),
                       keep_fp_roles=("time_embedding",), split_shortcut=True, quantize_attention=True,
                       method="qdiffusion", reconstruction=reconstruction)
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    loaded, _ = load_quantized(tmp_path / "q")
    _assert_same_model(qmodel, loaded)
    assert not isinstance(loaded.model.conv_in, QuantLayer)
    stored = load_file(tmp_path / "q" / WEIGHTS_FILE)
    assert stored["model.conv_in.weight"].dtype == torch.float32  # FP layers keep their float weights
    assert "model.conv_in.weight.codes" not in stored


def test_fp8_activations_round_trip_with_reconstruction_and_structural_features(
    tmp_path, tiny_unet, ddpm_scheduler, calibration,
):
    """FP8 activations through the learned activation steps, split shortcuts and attention operands (P keeps its
    integer grid), saved and loaded bit for bit; an integer backend refuses the artefact before building it."""
    reconstruction = ReconstructionConfig(weight_iters=2, activation_iters=2, batch_size=4, rounding="adaround")
    config = QuantConfig.from_preset("W4A8-FP8", calibration=CALIB, split_shortcut=True, quantize_attention=True,
                                     method="qdiffusion", reconstruction=reconstruction)
    config = dataclasses.replace(config, activations=dataclasses.replace(config.activations, range_method="minmax"))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, calibration=calibration, progress=False)
    activations = [m for m in qmodel.modules() if isinstance(m, Quantizer) and m.kind == "activation" and m.enabled]
    assert {m.scheme.format for m in activations} == {"fp8_e4m3", "int"}  # P's quantizers stay integer
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    loaded, _ = load_quantized(tmp_path / "q")
    assert loaded.config == qmodel.config and loaded.config.activations.format == "fp8_e4m3"
    _assert_same_model(qmodel, loaded)
    with pytest.raises(ValueError, match="fp8_e4m3.*backend='fake'"):
        load_quantized(tmp_path / "q", backend="int8")


def test_weights_are_stored_as_integer_codes(tmp_path, tiny_unet, ddpm_scheduler, calibration):
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    stored = load_file(tmp_path / "q" / WEIGHTS_FILE)
    layer = qmodel.model.down_blocks[0].resnets[0].conv1
    quantizer = layer.weight_quantizer
    packed = stored["model.down_blocks.0.resnets.0.conv1.weight.codes"]
    assert "model.down_blocks.0.resnets.0.conv1.weight" not in stored
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(layer.weight.numel() / 2)  # two per byte
    codes = unpack_codes(packed, 4, quantizer.scheme.qmin, tuple(layer.weight.shape))
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 15
    expected = quantize_to_int(layer.weight, quantizer._broadcast(quantizer.scale, layer.weight),
                               quantizer._broadcast(quantizer.zero_point, layer.weight), 0, 15)
    assert torch.equal(codes, expected)
    assert stored["model.down_blocks.0.resnets.0.conv1.weight_quantizer.scale"].shape == (layer.out_channels,)


def test_zero_points_are_stored_as_bytes_and_one_off_its_grid_is_refused_at_save(tmp_path, tiny_unet, ddpm_scheduler,
                                                                                   calibration):
    """Format 2 stores calibrated zero points as uint8 (a 4-bit or 8-bit unsigned grid); a zero point that is not an
    integer on its grid is refused by name when saving rather than rounded into the file."""
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    stored = load_file(tmp_path / "q" / WEIGHTS_FILE)
    zero_points = {key: value for key, value in stored.items() if key.endswith("_quantizer.zero_point")}
    assert zero_points and {value.dtype for value in zero_points.values()} == {torch.uint8}
    key = "model.down_blocks.0.resnets.0.conv1.input_quantizer.zero_point"
    qmodel.get_submodule(key.removesuffix(".zero_point")).zero_point.fill_(2.5)
    with pytest.raises(ValueError, match=rf"^{key}: zero point 2.5 is not an integer on its grid \[0, 255\]"):
        save_quantized(qmodel, tmp_path / "q2", ddpm_scheduler)
    assert not (tmp_path / "q2").exists()


@pytest.mark.parametrize(("bits", "symmetric"), [(2, False), (3, True), (4, False), (4, True), (6, True), (8, False),
                                                 (8, True)])
def test_packing_round_trips_every_code(bits, symmetric):
    scheme = QScheme(bits=bits, symmetric=symmetric)
    codes = torch.randint(scheme.qmin, scheme.qmax + 1, (5, 3, 3)).float()  # odd count: padding is exercised
    packed = pack_codes(codes, bits, scheme.qmin)
    assert torch.equal(unpack_codes(packed, bits, scheme.qmin, (5, 3, 3)), codes)
    if bits <= 4:
        assert packed.dtype == torch.uint8 and packed.numel() == 23
    else:
        assert packed.dtype == (torch.int8 if symmetric else torch.uint8) and packed.numel() == 45


def _small_unet() -> UNet2DModel:
    """Wide enough that tensor payload, not the per-tensor safetensors header, dominates the file."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8).eval()


def test_artefact_size_is_measured_and_four_bit_is_packed(tmp_path):
    model = _small_unet()
    fp_bytes = 4 * sum(p.numel() for p in model.parameters())
    sizes = {}
    for name in ("W8A16", "W4A16"):
        qmodel = api.build_quantized_structure(model, QuantConfig.from_preset(name))
        sizes[name] = save_quantized(qmodel, tmp_path / name, DDPMScheduler())
        assert sizes[name].weights_bytes == (tmp_path / name / WEIGHTS_FILE).stat().st_size
        assert sizes[name].fp_bytes == fp_bytes
        saved = json.loads((tmp_path / name / CONFIG_FILE).read_text())["sizes"]
        assert saved["weights_bytes"] == sizes[name].weights_bytes and saved["fp_bytes"] == fp_bytes
    assert sizes["W4A16"].ratio < 0.35
    assert sizes["W4A16"].weights_bytes < sizes["W8A16"].weights_bytes < fp_bytes / 3


def test_diffusers_layout_is_untouched(tmp_path, tiny_unet, ddpm_scheduler, calibration, tiny_model_dir):
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration)
    size = qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    assert isinstance(size, ArtefactSize)
    config = UNet2DModel.load_config(tmp_path / "q" / "unet")
    assert "quantization_config" not in config
    fp_config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    assert json.loads((tmp_path / "q" / "unet" / "config.json").read_text()) == fp_config
    scheduler = DDPMScheduler.from_pretrained(tmp_path / "q" / "scheduler")
    assert _public(scheduler.config) == _public(ddpm_scheduler.config)
    index = json.loads((tmp_path / "q" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    meta = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    assert meta["adapter"] == "unet2d" and meta["model_class"] == "UNet2DModel" and "torch" in meta["versions"]


def test_not_an_artefact_and_missing_folder_are_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="not a tadq artefact"):
        load_quantized(tiny_model_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    (tmp_path / "samples.png").write_bytes(b"png")  # an existing file was reported as missing
    with pytest.raises(NotADirectoryError, match="samples.png is a file; a tadq artefact is a folder"):
        load_quantized(tmp_path / "samples.png")


def test_newer_format_is_refused(tmp_path, tiny_unet, ddpm_scheduler, calibration):
    save_quantized(_quantize(tiny_unet, ddpm_scheduler, calibration), tmp_path / "q", ddpm_scheduler)
    meta = json.loads((tmp_path / "q" / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (tmp_path / "q" / CONFIG_FILE).write_text(json.dumps(meta))
    write_manifest(tmp_path / "q")  # as a newer tadq would have written it (else the checksum fails first)
    with pytest.raises(ValueError, match="newer"):
        load_quantized(tmp_path / "q")


@pytest.mark.parametrize(("key", "owner"), [
    ("model.conv_in.input_quantizer.scale", "model.conv_in.input_quantizer (Quantizer)"),
    ("model.conv_in.weight.codes", "model.conv_in (QuantConv2d)"),
])
def test_missing_key_names_the_module_that_expected_it(tmp_path, tiny_unet, ddpm_scheduler, calibration, key, owner):
    save_quantized(_quantize(tiny_unet, ddpm_scheduler, calibration), tmp_path / "q", ddpm_scheduler)
    path = tmp_path / "q" / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, str(path), metadata=metadata)
    write_manifest(tmp_path / "q")  # a consistent artefact of another structure, not a damaged one
    with pytest.raises(ValueError, match=f"lacks '{key}', expected by module {owner}".replace("(", r"\(").replace(
            ")", r"\)")):
        load_quantized(tmp_path / "q")


def test_existing_folder_is_kept_unless_overwrite(tmp_path, tiny_unet, ddpm_scheduler, calibration):
    target = tmp_path / "q"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration)
    with pytest.raises(OutputRefused, match="overwrite"):
        save_quantized(qmodel, target, ddpm_scheduler)
    with pytest.raises(OutputRefused, match="tadq did not write"):  # a folder tadq did not write is never replaced
        save_quantized(qmodel, target, ddpm_scheduler, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    save_quantized(qmodel, target, ddpm_scheduler, overwrite=True, force_foreign=True)  # named explicitly
    assert not (target / "notes.txt").exists() and (target / CONFIG_FILE).exists()
    save_quantized(qmodel, target, ddpm_scheduler, overwrite=True)  # tadq's own artefact: replaced
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no staging folder left behind


class _PassThrough:
    def observe(self, x):
        pass


def test_off_grid_or_undeclared_weights_refuse_to_save(tmp_path, tiny_unet, ddpm_scheduler, calibration):
    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration)
    qmodel.model.conv_in.weight_quantizer.attach_observer(_PassThrough())  # forward now returns the float weight
    with pytest.raises(ValueError, match="off the"):
        save_quantized(qmodel, tmp_path / "a", ddpm_scheduler)
    qmodel.model.conv_in.weight_quantizer.attach_observer(None)
    layer = qmodel.model.conv_out
    layer.quantized_weights = lambda: {"weight": (layer.weight_quantizer, layer.weight * 1)}  # a copy, not a view
    with pytest.raises(ValueError, match="neither a parameter"):
        save_quantized(qmodel, tmp_path / "c", ddpm_scheduler)
    del layer.quantized_weights
    qmodel.model.conv_norm_out.extra = Quantizer(QScheme(bits=8), kind="weight")
    with pytest.raises(ValueError, match="quantized_weights"):
        save_quantized(qmodel, tmp_path / "b", ddpm_scheduler)
    assert [p.name for p in tmp_path.iterdir()] == []


RAISED = (("down_blocks.0.resnets.0.conv1", 8, 8), ("mid_block.attentions.0.to_q", 8, 6))


def test_layer_bits_give_named_layers_their_bits_and_survive_save_and_load(
    tmp_path, tiny_unet, ddpm_scheduler, calibration,
):
    """Two layers of a W4A8 model at other bits: a different network from plain W4A8, the same one every time the
    config is built, and the same one after saving (the artefact records the choice)."""
    plain = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    mixed = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8", layer_bits=RAISED)
    again = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8", layer_bits=RAISED)
    layers = {name: m for name, m in mixed.model.named_modules() if isinstance(m, QuantLayer)}
    for name, weight_bits, activation_bits in RAISED:
        assert layers[name].weight_quantizer.scheme.bits == weight_bits
        assert layers[name].input_quantizer.scheme.bits == activation_bits
        assert mixed.quantization_map()[name]["weights"].startswith(f"int{weight_bits}-")
    assert layers["conv_in"].weight_quantizer.scheme.bits == 4  # every other layer keeps the preset's bits
    x, t = _inputs()
    with torch.no_grad():
        assert not torch.equal(mixed(x, t), plain(x, t))
        assert torch.equal(mixed(x, t), again(x, t))
    # the bit-operations count the raised layers at their own bits: exactly their MACs × (b_w b_a − 4·8) more
    from tadq.corrections.ptqd.bitops import bit_operations, layer_macs

    macs = layer_macs(plain.model, plain, plain.sample_shape)
    extra = sum(macs[name] * (w * a - 4 * 8) for name, w, a in RAISED)
    assert bit_operations(mixed) - bit_operations(plain) == extra > 0
    mixed.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.config == mixed.config and loaded.config.layer_bits == RAISED
    assert loaded.quantization_map() == mixed.quantization_map()
    _assert_same_model(mixed, loaded)


@pytest.mark.parametrize(("layer_bits", "options", "named"), [
    ((("down_blocks.0.resnets.0.conv9", 8, 8),), {}, "down_blocks.0.resnets.0.conv9"),
    ((("conv_in", 8, 8),), {"exclude": ("conv_in",)}, "conv_in"),  # kept in FP: no bits to change
    ((("time_embedding.linear_1", 8, 8),), {"fp_layers": "first_last_time"}, "time_embedding.linear_1"),
])
def test_layer_bits_naming_no_quantized_layer_raise_before_calibration(
    tiny_unet, ddpm_scheduler, monkeypatch, layer_bits, options, named,
):
    def no_sampling(*args, **kwargs):
        raise AssertionError("calibration data was collected before the config was checked")

    monkeypatch.setattr("tadq.methods.collect_calibration_set", no_sampling)
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, layer_bits=layer_bits, **options)
    with pytest.raises(ValueError, match=rf"layer_bits names \['{named}'\]"):
        api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)


def _as_version_2(payload):
    """``payload`` as a tadq before ``layer_bits`` wrote it: the field absent, QuantConfig/Recipe at version 2."""
    if isinstance(payload, dict):
        if payload.get("type") in ("QuantConfig", "Recipe"):
            payload = {**payload, "version": 2}
        return {k: _as_version_2(v) for k, v in payload.items() if k != "layer_bits"}
    if isinstance(payload, list):
        return [_as_version_2(v) for v in payload]
    return payload


def test_an_artefact_saved_before_layer_bits_loads_bit_identically(tmp_path, tiny_unet, ddpm_scheduler, calibration):
    from tadq.io.save import RECIPE_FILE

    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W4A8")
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    for name in (CONFIG_FILE, RECIPE_FILE):
        path = tmp_path / "q" / name
        old = _as_version_2(json.loads(path.read_text()))
        assert "layer_bits" not in json.dumps(old)
        path.write_text(json.dumps(old, indent=2))
    assert json.loads((tmp_path / "q" / CONFIG_FILE).read_text())["quant_config"]["version"] == 2
    write_manifest(tmp_path / "q")  # a consistent old artefact, not a damaged one
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.config.layer_bits == () and loaded.config == qmodel.config
    assert loaded.recipe is not None and loaded.recipe.layer_bits == ()
    _assert_same_model(qmodel, loaded)


def test_an_old_recipe_takes_the_network_fields_it_could_not_record_from_the_config(
    tmp_path, tiny_unet, ddpm_scheduler, calibration,
):
    """A version-1 recipe beside a config that records the per-row softmax (written between the field's arrival in
    QuantConfig and in Recipe): the recipe could not say it, so the network's config decides, and it loads."""
    from tadq.io.save import RECIPE_FILE

    qmodel = _quantize(tiny_unet, ddpm_scheduler, calibration, "W8A8", quantize_attention=True)
    assert qmodel.config.softmax_granularity == "per_row"
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    path = tmp_path / "q" / RECIPE_FILE
    recipe = json.loads(path.read_text())
    recipe["version"] = 1
    for key in ("softmax_granularity", "layer_bits"):
        recipe["data"].pop(key)
    path.write_text(json.dumps(recipe, indent=2))
    write_manifest(tmp_path / "q")
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.recipe.softmax_granularity == "per_row" and loaded.config == qmodel.config
    _assert_same_model(qmodel, loaded)
