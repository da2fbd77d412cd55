"""Device and dtype paths a user takes that the basic device tests do not: a process whose default dtype is
float64, a model split over dtypes, device names torch accepts but tadq must not take at face value, and refusals
that must come before the model is copied, cast or loaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.adapters.test_mmdit import build_tiny_sd3, prompts
from tests.conftest import build_tiny_unet
from typer.testing import CliRunner

import tadq
from tadq import api
from tadq.config import CalibrationConfig
from tadq.device import float32_default, model_placement, place_model, resolve_device, same_device
from tadq.recipe import Deployment, NaiveMethod, QDiffusionMethod, Recipe
from tadq.sampling import ConditioningList, SamplerConfig, initial_noise, step_noise

SAMPLER = SamplerConfig(kind="ddim", num_steps=3)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=4)
RECIPE = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),))


@pytest.fixture
def float64_default():
    """The caller's ``torch.set_default_dtype(torch.float64)``, undone after the test whatever it raised."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _sample(model, scheduler, **kwargs) -> torch.Tensor:
    return tadq.sample(model, scheduler, SAMPLER, num_samples=3, seed=5, progress=False, **kwargs).images


def test_a_float64_default_dtype_changes_no_noise_and_no_sample(tiny_unet, ddpm_scheduler):
    expected_noise = initial_noise(5, [0, 1], (1, 8, 8)), step_noise(5, [0, 1], 3, (1, 8, 8))
    expected = _sample(tiny_unet, ddpm_scheduler)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        noise = initial_noise(5, [0, 1], (1, 8, 8)), step_noise(5, [0, 1], 3, (1, 8, 8))
        images = _sample(tiny_unet, ddpm_scheduler)
        assert torch.get_default_dtype() is torch.float64  # the caller's setting is given back
    finally:
        torch.set_default_dtype(previous)
    # randn under a float64 default drew other values: every sample of a seed changed
    for drawn, wanted in zip(noise, expected_noise, strict=True):
        assert drawn.dtype is torch.float32 and torch.equal(drawn, wanted)
    assert images.dtype is torch.float32 and torch.equal(images, expected)


def test_quantize_save_and_load_under_a_float64_default(tiny_unet, ddpm_scheduler, tmp_path, float64_default):
    """Quantizer ranges were built in float64 (the save then refused them as off-grid) and a loaded model's
    rebuilt weights too (the load blamed the file as altered)."""
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False)
    tensors = [t for t in qmodel.model.state_dict().values() if isinstance(t, torch.Tensor)]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
    images = _sample(qmodel, ddpm_scheduler)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    assert torch.equal(_sample(loaded, scheduler), images)
    assert torch.get_default_dtype() is torch.float64
    with float32_default():  # the same model as a float32 process quantizes
        reference = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False)
        assert torch.equal(_sample(reference, ddpm_scheduler), images)


def test_cpu_device_names_resolve_to_the_one_cpu():
    assert resolve_device("cpu:0") == torch.device("cpu") and resolve_device(torch.device("cpu", 0)).index is None
    with pytest.raises(ValueError, match="'cpu:1': the CPU has no device index"):
        resolve_device("cpu:1")
    assert same_device(torch.device("cpu"), torch.device("cpu:0"))
    assert not same_device(torch.device("cpu"), torch.device("meta"))


def test_index_less_cuda_is_the_current_device(monkeypatch):
    """``cuda`` named without an index is the current GPU, as the tensors placed there report it: a model already
    there was compared unequal and copied whole on every call."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1) and resolve_device("cuda:0") == torch.device("cuda", 0)
    assert same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert not same_device(torch.device("cuda"), torch.device("cuda", 0))
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def _split_dtype_unet():
    model = build_tiny_unet()
    model.conv_out.to(torch.float16)  # one layer in another dtype than the rest
    return model


def test_a_model_split_over_dtypes_is_refused_before_any_forward(ddpm_scheduler):
    model = _split_dtype_unet()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))  # copied along with the model
    with pytest.raises(ValueError, match=r"tadq.sample: .* several dtypes \(float16, float32\); pass dtype="):
        _sample(model, ddpm_scheduler)
    with pytest.raises(ValueError, match=r"tadq.quantize: .* several dtypes"):
        api.quantize(model, ddpm_scheduler, RECIPE, progress=False)
    assert not calls
    # an explicit dtype runs all of it in one (on a copy: the caller's split model stays as it was)
    images = _sample(model, ddpm_scheduler, dtype="float32")
    assert calls and images.dtype is torch.float32 and torch.isfinite(images).all()
    assert model.conv_out.weight.dtype is torch.float16 and model.conv_in.weight.dtype is torch.float32
    assert model_placement(model, "here", dtype=False) == (torch.device("cpu"), torch.float32)


def test_place_model_ignores_integer_parameters(tiny_unet):
    tiny_unet.register_parameter("codes", torch.nn.Parameter(torch.zeros(2, dtype=torch.int8), requires_grad=False))
    assert place_model(tiny_unet, torch.device("cpu"), torch.float32) is tiny_unet  # no needless deep copy


@pytest.mark.parametrize("method", ["qdiffusion", "tfmq-naive"])
def test_reconstruction_in_bfloat16_is_refused_before_the_model_is_cast(method, tiny_unet, ddpm_scheduler,
                                                                        monkeypatch):
    from tadq.tfmq import TFMQMethod

    chosen = QDiffusionMethod() if method == "qdiffusion" else TFMQMethod(base="naive")
    recipe = Recipe.from_preset("W8A8", method=chosen, calibration=CALIB, deployments=(Deployment(SAMPLER),))
    placed = []
    monkeypatch.setattr(api, "place_model", lambda *a: placed.append(a) or a[0])
    with pytest.raises(NotImplementedError, match="dtype=float32, not bfloat16"):
        api.quantize(tiny_unet, ddpm_scheduler, recipe, dtype="bfloat16", progress=False)
    assert not placed  # neither the bfloat16 reference nor the float32 network was copied


def test_cli_refuses_reconstruction_in_bfloat16_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    import tadq.models
    from tadq.cli.app import app

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(tadq.models, "load_pipeline_parts", never)
    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--method",
                                      "qdiffusion", "--dtype", "bfloat16", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 2 and "dtype=float32, not bfloat16" in result.output, result.output
    assert not (tmp_path / "q").exists()


def test_flow_model_in_bfloat16_with_float64_conditions_and_uneven_batches():
    """Fractional (flow-matching) timesteps with a bfloat16 SD3: conditions handed over in float64 are cast to the
    model's dtype (the same samples as float32 ones, exactly representable in both), states stay bfloat16, and a
    batch size not dividing the count gives every sample."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, scheduler = build_tiny_sd3().to(torch.bfloat16), FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow = SamplerConfig("flow-euler", num_steps=2)
    given = prompts(3, seed=1)
    wide = given.to("cpu", torch.float64)
    runs = [tadq.sample(model, scheduler, flow, num_samples=3, seed=0, batch_size=2, progress=False,
                        conditions=ConditioningList(cond)).images for cond in (given, wide)]
    assert runs[0].dtype is torch.bfloat16 and runs[0].shape == (3, 4, 8, 8) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_quantized_model_sampled_in_a_lower_dtype_matches_its_artefact_loaded_in_it(
        dtype, tiny_unet, ddpm_scheduler, tmp_path):
    """The artefact holds codes; loading in a lower dtype rounds Δ·(q − z) to it. The in-memory model cast its FP
    weights instead and quantized them again in that precision, so codes moved and the bytes differed."""
    qmodel = api.quantize(tiny_unet.to(torch.bfloat16), ddpm_scheduler, RECIPE, progress=False)  # a bf16 model
    assert next(qmodel.parameters()).dtype is torch.float32  # the fake-quant network computes in float32
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    in_memory = _sample(qmodel, ddpm_scheduler, dtype=dtype)
    loaded, scheduler = tadq.load(tmp_path / "q", dtype=dtype)
    assert in_memory.dtype is getattr(torch, dtype) and torch.equal(_sample(loaded, scheduler), in_memory)
    assert next(qmodel.parameters()).dtype is torch.float32  # the caller's model is not cast
    float32, _ = tadq.load(tmp_path / "q")
    assert torch.equal(_sample(float32, scheduler), _sample(qmodel, ddpm_scheduler))


def test_a_base_on_the_meta_device_is_refused_before_any_fit(tiny_unet, ddpm_scheduler):
    """``base=`` is reused as it is; one whose weights were never loaded failed at its first forward, deep in a
    quantizer (``Tensor.item() cannot be called on meta tensors``)."""
    import copy

    from tadq.corrections import TACConfig

    base = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False)
    empty = copy.deepcopy(base).to("meta")
    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),),
                                corrections=(TACConfig(num_samples=4),))
    with pytest.raises(ValueError, match=r"tadq.quantize: base: \d+ weight\(s\) .* 'meta' device"):
        api.quantize(tiny_unet, ddpm_scheduler, recipe, base=empty, progress=False)
    with pytest.raises(TypeError, match="base must be a QuantizedDenoiser"):
        api.quantize(tiny_unet, ddpm_scheduler, recipe, base=tiny_unet, progress=False)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_base_loaded_in_a_lower_dtype_is_refused_before_any_fit(dtype, tiny_unet, ddpm_scheduler, tmp_path):
    """``base=tadq.load(dir, dtype=torch.bfloat16)[0]`` had its corrections fitted against the bfloat16 network; the
    result was refused by ``save_pretrained`` until ``.float()``, which then saved tables fitted for another network
    than the float32 one stored beside them."""
    from tests.conftest import counting_forwards

    from tadq.corrections import TACConfig

    recipe = dataclasses.replace(RECIPE, corrections=(TACConfig(num_samples=4),))
    api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False).save_pretrained(tmp_path / "q", ddpm_scheduler)
    lowered, _ = tadq.load(tmp_path / "q", dtype=dtype)
    with counting_forwards(tiny_unet) as calls, counting_forwards(lowered.model) as network_calls:
        with pytest.raises(ValueError, match=rf"tadq.quantize: base is in {dtype}; .*tadq.load\(dir\) without dtype="):
            api.quantize(tiny_unet, ddpm_scheduler, recipe, base=lowered, progress=False)
    assert calls == network_calls == [0]
    base, _ = tadq.load(tmp_path / "q")  # the float32 network is taken
    assert api.quantize(tiny_unet, ddpm_scheduler, recipe, base=base, progress=False).model is base.model


def test_a_base_quantized_from_another_model_is_refused_before_any_fit(tiny_unet, ddpm_scheduler):
    """``quantize(B, ..., base=quantize(A))`` with A another training of B's config returned A's network with
    corrections fitted against B's trajectories, without a word."""
    from tests.conftest import build_tiny_unet

    from tadq.corrections import TACConfig

    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),),
                                corrections=(TACConfig(num_samples=4),))
    base = api.quantize(build_tiny_unet(seed=1), ddpm_scheduler, RECIPE, progress=False)
    with pytest.raises(ValueError, match="base= was not quantized from this model: .* tensors differ"):
        api.quantize(tiny_unet, ddpm_scheduler, recipe, base=base, progress=False)
    own = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False)  # its own base is taken
    assert api.quantize(tiny_unet, ddpm_scheduler, recipe, base=own, progress=False).model is own.model


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to("cpu", torch.float16)], ids=["to-bfloat16", "half", "to-cpu-float16"])
def test_a_quantized_model_cast_by_torch_samples_its_artefact_loaded_in_that_dtype(cast, tiny_unet, ddpm_scheduler,
                                                                                   tmp_path):
    """``qmodel.to(torch.bfloat16)`` cast the FP weights kept beside the quantizers and quantized them again in the
    lower precision (codes moved across rounding boundaries): other samples than ``sample(qmodel, dtype=)`` and than
    its artefact loaded in that dtype. The weights now go on their float32 grid before the cast."""
    import copy

    qmodel = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    cast_copy = cast(copy.deepcopy(qmodel))
    dtype = next(cast_copy.parameters()).dtype
    loaded, scheduler = tadq.load(tmp_path / "q", dtype=dtype)
    expected = _sample(loaded, scheduler)
    assert torch.equal(_sample(cast_copy, ddpm_scheduler), expected)
    assert torch.equal(_sample(qmodel, ddpm_scheduler, dtype=dtype), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_saving_a_cast_quantized_model_is_refused_before_anything_is_written(dtype, tiny_unet, ddpm_scheduler,
                                                                            tmp_path):
    """A ``.half()`` model was saved with its float16 ranges and biases; ``tadq.load`` then refused every stored
    tensor as "altered": an artefact that could never be loaded."""
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, RECIPE, progress=False).to(dtype)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"this model is in {name} .*save the float32 model.*\.float\(\)"):
        qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    assert not any(tmp_path.iterdir())
    qmodel.float().save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    assert torch.equal(_sample(loaded, scheduler), _sample(qmodel, ddpm_scheduler))


@pytest.mark.parametrize("correction", ["ptqd", "tcec"])
def test_a_float32_cast_keeps_the_float64_correction_tables(correction, tiny_unet, ddpm_scheduler, tmp_path):
    """``.float()`` (and ``tadq.load(dir, device="cuda")``, which casts to float32) cast PTQD's k and TCEC's settings
    to float32 (their precision lost), and saving it wrote tables its loader refused as altered."""
    import copy

    from tadq.corrections import PTQDConfig, TCECConfig

    config = {"ptqd": PTQDConfig, "tcec": TCECConfig}[correction](num_samples=4)
    recipe = dataclasses.replace(RECIPE, corrections=(config,))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, recipe, progress=False)
    tables = {key: value.dtype for key, value in qmodel.corrections.state_dict().items() if torch.is_tensor(value)}
    cast = copy.deepcopy(qmodel).to(torch.float32)
    assert {key: value.dtype for key, value in cast.corrections.state_dict().items() if key in tables} == tables
    assert torch.equal(_sample(cast, ddpm_scheduler), _sample(qmodel, ddpm_scheduler))
    cast.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = tadq.load(tmp_path / "q")
    assert torch.equal(_sample(loaded, scheduler), _sample(qmodel, ddpm_scheduler))


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_a_lower_precision_model_is_quantized_from_one_float32_copy(dtype, tiny_unet, ddpm_scheduler, monkeypatch):
    """The fake-quant network of a float16 / bfloat16 model is a float32 cast made for the call, and building the
    structure copied that cast again: two float32 networks alive through calibration and every fit (the FP
    reference is the caller's model in its dtype). The cast is wrapped itself now, to the same numbers."""
    import copy

    from diffusers import UNet2DModel

    from tadq.calibration import collect_calibration_set
    from tadq.registry import adapter_for

    model = tiny_unet.to(dtype)
    calibration = collect_calibration_set(model, adapter_for(model), ddpm_scheduler.config, CALIB, progress=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    deepcopy, copied = copy.deepcopy, []

    def spy(value, memo=None, *args):
        if memo is None and isinstance(value, UNet2DModel):
            copied.append(value)
        return deepcopy(value, memo, *args)

    with monkeypatch.context() as patch:
        patch.setattr(copy, "deepcopy", spy)
        qmodel = api.quantize(model, ddpm_scheduler, RECIPE, calibration=calibration, progress=False)
    assert copied == [model]  # the one float32 cast
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    monkeypatch.setattr(api, "wrap_in_place", lambda network: network)  # the copy of the cast, as before
    copied_twice = api.quantize(model, ddpm_scheduler, RECIPE, calibration=calibration, progress=False)
    state, reference = qmodel.state_dict(), copied_twice.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[key], reference[key]) for key in state if isinstance(state[key], torch.Tensor))
    assert torch.equal(_sample(qmodel, ddpm_scheduler), _sample(copied_twice, ddpm_scheduler))


@pytest.mark.parametrize("method", ["naive", "tfmq-naive"])
def test_a_given_calibration_set_in_another_dtype_is_moved_to_the_models(method, tiny_unet, ddpm_scheduler):
    """TFMQ fed a given set as it came (a float64 copy: "Input type (double) and bias type (float)"; one on another
    device: refused), where the naive and Q-Diffusion bases move it to the model's device and dtype."""
    from tadq.calibration import collect_calibration_set
    from tadq.registry import adapter_for
    from tadq.tfmq import TFMQConfig, TFMQMethod

    settings = TFMQConfig(tiar=False, fsc="off", num_samples=4, fsc_samples_per_step=2)
    chosen = NaiveMethod() if method == "naive" else TFMQMethod(base="naive", tfmq=settings)
    recipe = Recipe.from_preset("W8A8", method=chosen, calibration=CALIB, deployments=(Deployment(SAMPLER),))
    calibration = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB,
                                          progress=False)
    wide = dataclasses.replace(calibration, x=calibration.x.double(), eps=calibration.eps.double())
    built = [api.quantize(tiny_unet, ddpm_scheduler, recipe, calibration=given, progress=False).model.state_dict()
             for given in (calibration, wide)]
    assert built[0].keys() == built[1].keys()
    for name, value in built[0].items():  # float32 → float64 → float32 is exact: the very same model
        assert torch.equal(value, built[1][name]), name
