import dataclasses

import pytest
import torch
from tests.backends.machine import needs_int8_cpu

import tadq
import tadq.methods
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant import QuantLayer
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod, svdquant_schemes
from tadq.tfmq import TFMQConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=10)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=16, num_steps_kept=5, samples_per_step=8, batch_size=16)


def _calibration(model, scheduler):
    return collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False)


def test_quantize_leaves_the_original_untouched(tiny_unet, ddpm_scheduler):
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=CALIB),
                          progress=False)
    assert not any(isinstance(m, QuantLayer) for m in tiny_unet.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_unet.state_dict().items())
    assert sum(isinstance(m, QuantLayer) for m in qmodel.modules()) == len(qmodel.plans)


def test_error_grows_as_bits_shrink(tiny_unet, ddpm_scheduler):
    calib = _calibration(tiny_unet, ddpm_scheduler)
    errors = {}
    for name in ("W8A8", "W4A8", "W4A4"):
        qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset(name, calibration=CALIB),
                              calibration=calib, progress=False)
        errors[name] = (qmodel(calib.x, calib.t) - calib.eps).pow(2).mean().item()
    assert errors["W8A8"] < errors["W4A8"] < errors["W4A4"]


def test_exclusions_keep_layers_in_fp(tiny_unet, ddpm_scheduler):
    config = QuantConfig.from_preset("W4A8", calibration=CALIB, exclude=("conv_in",),
                                     keep_fp_roles=("time_embedding", "output_conv"))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, calibration=_calibration(tiny_unet, ddpm_scheduler),
                          progress=False)
    qmap = qmodel.quantization_map()
    assert not qmap["conv_in"]["quantized"] and "pattern" in qmap["conv_in"]["reason"]
    assert not qmap["conv_out"]["quantized"] and not qmap["time_embedding.linear_1"]["quantized"]
    assert qmap["down_blocks.0.resnets.0.conv1"]["quantized"]
    assert not isinstance(qmodel.model.conv_in, QuantLayer)


def test_same_seed_gives_bit_identical_samples(tiny_unet, ddpm_scheduler):
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=CALIB),
                          progress=False)
    runs = [api.sample(qmodel, ddpm_scheduler, SAMPLER, num_samples=6, seed=7, progress=False).images
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = api.sample(qmodel, ddpm_scheduler, SAMPLER, num_samples=6, seed=8, progress=False).images
    assert not torch.equal(runs[0], other)


def test_quantize_save_load_and_sample_leave_the_callers_torch_rng_stream_alone(tiny_unet, ddpm_scheduler,
                                                                                  tmp_path):
    """tadq draws its noise from its own generators; the fake-quant layers built around the model's weights (and
    the architecture ``load`` builds before reading the artefact's) used to run torch's random init, so a script's
    own torch.manual_seed stream moved by every tadq.quantize and tadq.load."""
    from tadq.io import save_quantized

    calibration = dataclasses.replace(CALIB, num_trajectories=4, num_steps_kept=2, samples_per_step=4)
    config = QuantConfig.from_preset("W8A8", calibration=calibration, split_shortcut=True, quantize_attention=True)
    torch.manual_seed(3)
    expected = torch.randn(8)
    torch.manual_seed(3)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    save_quantized(qmodel, tmp_path / "q", ddpm_scheduler)
    loaded, _ = api.load(tmp_path / "q")
    api.sample(loaded, ddpm_scheduler, calibration.sampler, num_samples=2, seed=5, progress=False)
    assert torch.equal(torch.randn(8), expected)


def test_a_negative_seed_is_refused_before_any_denoiser_call(tiny_unet, ddpm_scheduler, monkeypatch):
    calls = []
    monkeypatch.setattr(tiny_unet, "forward", lambda *args, **kwargs: calls.append(1))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32 - 1\], got -1"):
        api.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=2, seed=-1, progress=False)
    assert not calls


def test_numpy_integer_seeds_and_counts_sample_as_the_python_ints(tiny_unet, ddpm_scheduler):
    """A seed from ``np.random`` or a count read from an array was refused by tadq.sample's type check ("seed must be
    a int") although the seed range check and the pipelines take numpy integers; floats and bools still are."""
    import numpy as np

    expected = api.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=3, seed=7, batch_size=2,
                          progress=False).images
    got = api.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=np.int64(3), seed=np.uint32(7),
                     batch_size=np.int32(2), progress=False).images
    assert torch.equal(got, expected)
    for bad in (7.0, True, torch.tensor(7)):
        with pytest.raises(TypeError, match="tadq.sample: seed must be a int"):
            api.sample(tiny_unet, ddpm_scheduler, SAMPLER, num_samples=1, seed=bad, progress=False)


def test_a_config_that_quantizes_no_layer_warns(tiny_unet, ddpm_scheduler, caplog):
    """``--exclude '*'`` saved "0 of N layers quantized" with no more than an info line."""
    import logging

    calibration = dataclasses.replace(CALIB, num_trajectories=2, num_steps_kept=2, samples_per_step=2)
    for exclude, warned in ((("*",), True), (("conv_in",), False)):
        caplog.clear()
        config = QuantConfig.from_preset("W8A8", calibration=calibration, exclude=exclude)
        with caplog.at_level(logging.WARNING, logger="tadq"):
            qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
        assert any(not plan.quantized for plan in qmodel.plans)
        assert ("no layer was quantized" in caplog.text) == warned, caplog.text


def test_quantization_is_reproducible(tiny_unet, ddpm_scheduler):
    config = QuantConfig.from_preset("W4A4", calibration=CALIB)
    states = [api.quantize(tiny_unet, ddpm_scheduler, config, progress=False).state_dict() for _ in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_layer_pattern_raises(tiny_unet, ddpm_scheduler):
    import pytest

    config = QuantConfig.from_preset("W4A8", calibration=CALIB, exclude=("encoder.*",))
    with pytest.raises(ValueError, match="match no quantizable layer"):
        api.quantize(tiny_unet, ddpm_scheduler, config, calibration=_calibration(tiny_unet, ddpm_scheduler),
                     progress=False)


def test_a_shared_fp_trajectory_cache_changes_no_table_and_walks_the_fp_side_once(tiny_unet, ddpm_scheduler):
    from tadq import NaiveMethod, Recipe
    from tadq.corrections import FPTrajectoryCache, TACConfig
    from tadq.recipe import Deployment

    calib = _calibration(tiny_unet, ddpm_scheduler)
    tac = TACConfig(num_samples=8, ner_target="fp_trajectory")

    def tables(preset, cache=None):
        recipe = Recipe.from_preset(preset, method=NaiveMethod(), calibration=CALIB, corrections=(tac,),
                                    deployments=(Deployment(SAMPLER),))
        qmodel = api.quantize(tiny_unet, ddpm_scheduler, recipe, calibration=calib, progress=False,
                              fp_trajectories=cache)
        return {k: v for k, v in qmodel.corrections[0].state_dict().items() if isinstance(v, torch.Tensor)}

    cache = FPTrajectoryCache(tiny_unet)
    shared = [tables(preset, cache) for preset in ("W8A8", "W4A8")]
    assert (cache.hits, cache.misses) == (1, 1)  # the W4A8 fit read the W8A8 fit's FP walk
    for preset, got in zip(("W8A8", "W4A8"), shared, strict=True):
        alone = tables(preset)
        assert got.keys() == alone.keys() and all(torch.equal(got[k], alone[k]) for k in alone)


def test_a_model_left_in_training_mode_samples_and_quantizes_reproducibly(ddpm_scheduler):
    """nn.Module starts in training mode: a model built with dropout and not put in eval mode sampled and calibrated
    with dropout on, so the same seed gave other samples and the same call another quantized model."""
    from tests.conftest import build_tiny_unet

    model = build_tiny_unet()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    model.down_blocks[0].eval()  # a mixed state, given back as it was
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=4)
    config = QuantConfig.from_preset("W8A8", calibration=calib)
    first, second = (api.quantize(model, ddpm_scheduler, config, progress=False) for _ in range(2))
    for denoiser in (model, first, second):
        a, b = (api.sample(denoiser, ddpm_scheduler, sampler, num_samples=2, seed=3, progress=False).images
                for _ in range(2))
        assert torch.equal(a, b)
    assert torch.equal(api.sample(first, ddpm_scheduler, sampler, num_samples=2, seed=3, progress=False).images,
                       api.sample(second, ddpm_scheduler, sampler, num_samples=2, seed=3, progress=False).images)
    assert model.training and not model.down_blocks[0].training and model.down_blocks[1].training


@needs_int8_cpu
def test_load_takes_the_backend_the_docs_name(tiny_unet, ddpm_scheduler, tmp_path):
    """docs/architecture.md and backends.md name ``tadq.load(dir, backend=...)``; it raised a TypeError."""
    from tadq.backends import IntegerDenoiser
    from tadq.io import load_quantized

    calib = CalibrationConfig(sampler=SAMPLER, num_trajectories=4, num_steps_kept=2, samples_per_step=4, batch_size=4)
    api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=calib),
                 progress=False).save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, scheduler = api.load(tmp_path / "q", backend="int8")
    reference, _ = load_quantized(tmp_path / "q", backend="int8")
    assert isinstance(loaded, IntegerDenoiser) and loaded.backend == "int8" and loaded.recipe is not None
    sampler = SamplerConfig(kind="ddim", num_steps=3)
    assert torch.equal(api.sample(loaded, scheduler, sampler, num_samples=2, seed=1, progress=False).images,
                       api.sample(reference, scheduler, sampler, num_samples=2, seed=1, progress=False).images)
    with pytest.raises(ValueError, match="float32"):
        api.load(tmp_path / "q", backend="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="no-such-backend"):
        api.load(tmp_path / "q", backend="no-such-backend")


def test_a_calibration_set_made_for_another_call_is_refused_before_any_work(tiny_unet, ddpm_scheduler, monkeypatch):
    """``calibration=`` recorded from another model, or with another sampler than the config says, calibrated the
    ranges without a word (and the artefact recorded a sampler its data never came from); one of another sample
    shape failed inside the first convolution."""
    from tests.conftest import build_tiny_unet

    small = CalibrationConfig(sampler=SamplerConfig("ddim", num_steps=4), num_trajectories=4, num_steps_kept=2,
                              samples_per_step=2, batch_size=4)
    config = QuantConfig.from_preset("W8A8", calibration=small)
    adapter = adapter_for(tiny_unet)
    own = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, small, progress=False)
    other_model = collect_calibration_set(build_tiny_unet(seed=1), adapter, ddpm_scheduler.config, small,
                                          progress=False)
    five_steps = dataclasses.replace(small, sampler=SamplerConfig("ddim", num_steps=5))
    other_sampler = collect_calibration_set(tiny_unet, adapter, ddpm_scheduler.config, five_steps, progress=False)
    monkeypatch.setattr(tadq.methods, "build_quantized_structure", None)  # nothing may be built before the refusal
    for wrong, field in ((other_model, "model"), (other_sampler, "config")):
        with pytest.raises(ValueError, match=f"calibration= was collected for another {field} than this call"):
            api.quantize(tiny_unet, ddpm_scheduler, config, calibration=wrong, progress=False)
    monkeypatch.undo()
    assert api.quantize(tiny_unet, ddpm_scheduler, config, calibration=own, progress=False) is not None


def test_quantizing_a_quantized_model_says_so(tiny_unet, ddpm_scheduler):
    """It used to say 'no tadq adapter for QuantizedDenoiser ... add one with register_adapter': the wrong way."""
    config = QuantConfig.from_preset("W8A8", calibration=CALIB)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, calibration=_calibration(tiny_unet, ddpm_scheduler),
                          progress=False)
    with pytest.raises(TypeError, match="model is already quantized \\(QuantizedDenoiser\\).*base="):
        api.quantize(qmodel, ddpm_scheduler, config, progress=False)


@pytest.mark.parametrize("reparametrize", ["weight_norm", "parametrizations"])
def test_a_reparametrized_weight_is_refused_with_the_call_that_folds_it(tiny_unet, ddpm_scheduler, reparametrize):
    """Legacy ``weight_norm`` failed deep in ``copy.deepcopy`` ('Only Tensors created explicitly by the user...'),
    the parametrized form as an unsupported layer class; both are named with the layer and the folding call, and
    the folded model quantizes."""
    import warnings

    from torch.nn.utils import parametrizations, parametrize, remove_weight_norm, weight_norm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy form is deprecated, and still in users' models
        if reparametrize == "weight_norm":
            weight_norm(tiny_unet.conv_out)
        else:
            parametrizations.weight_norm(tiny_unet.conv_out)
    config = QuantConfig.from_preset("W8A8", calibration=CALIB)
    fold = "remove_weight_norm" if reparametrize == "weight_norm" else "remove_parametrizations"
    with pytest.raises(ValueError, match=f"layer conv_out .*{fold}"):
        api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    if reparametrize == "weight_norm":
        remove_weight_norm(tiny_unet.conv_out)
    else:
        parametrize.remove_parametrizations(tiny_unet.conv_out, "weight")
    assert api.quantize(tiny_unet, ddpm_scheduler, config, calibration=_calibration(tiny_unet, ddpm_scheduler),
                        progress=False) is not None


def test_the_state_of_another_preset_is_refused_by_load_state_dict(tiny_unet, ddpm_scheduler):
    """A W8A8 model's state has the keys and shapes of a W4A8 one: ``load_state_dict`` took it without a word and
    the first forward failed inside torch's kernel (``zero_point must be between quant_min and quant_max``)."""
    calibration = _calibration(tiny_unet, ddpm_scheduler)
    models = {name: api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset(name, calibration=CALIB),
                                 calibration=calibration, progress=False) for name in ("W4A8", "W8A8")}
    before = {key: value.clone() for key, value in models["W4A8"].state_dict().items()}
    with pytest.raises(ValueError, match=r"quantizer model\..*zero point z = .*another QuantConfig"):
        models["W4A8"].load_state_dict(models["W8A8"].state_dict())
    models["W4A8"].load_state_dict(before)  # its own state loads
    assert all(torch.equal(value, before[key]) for key, value in models["W4A8"].state_dict().items())


def test_diffusers_runtime_hooks_are_refused_naming_the_hook_before_any_work(ddpm_scheduler):
    """diffusers' ``enable_layerwise_casting`` (float8 storage) was refused as "several dtypes: pass dtype=", and
    with dtype= crashed in a matmul; ``enable_group_offload`` failed inside ``copy.deepcopy`` ("cannot pickle
    'module' object")."""
    from tests.conftest import build_tiny_unet, counting_forwards

    config = QuantConfig.from_preset("W8A8", calibration=CALIB)
    cast = build_tiny_unet()
    cast.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    offloaded = build_tiny_unet()
    offloaded.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level",
                                   num_blocks_per_group=1)
    with counting_forwards(cast) as calls:
        for dtype in (None, "float32"):
            with pytest.raises(ValueError, match=r"tadq.quantize: layer \S+ carries diffusers' 'layerwise_casting'"):
                api.quantize(cast, ddpm_scheduler, config, dtype=dtype, progress=False)
            with pytest.raises(ValueError, match=r"tadq.sample: layer \S+ carries .*load the model without it"):
                api.sample(cast, ddpm_scheduler, SAMPLER, num_samples=2, seed=0, dtype=dtype, progress=False)
    assert calls == [0]
    with pytest.raises(ValueError, match="carries diffusers' 'group_offloading' hook; load the model without"):
        api.quantize(offloaded, ddpm_scheduler, config, progress=False)


@pytest.mark.parametrize("sharing", ["layer placed twice", "tied weight"])
def test_a_weight_shared_between_layers_is_refused_naming_both_before_any_work(sharing, ddpm_scheduler, tmp_path):
    """One ``nn.Linear`` placed twice in the tree was quantized under its first name only (the other place ran in
    full precision), and either sharing made ``save_pretrained`` fail inside safetensors ("Some tensors share
    memory") after the whole calibration."""
    import copy

    from tests.conftest import build_tiny_unet, counting_forwards

    model = build_tiny_unet()
    first, second = model.down_blocks[1].attentions[0], model.up_blocks[0].attentions[0]
    if sharing == "layer placed twice":
        second.to_q = first.to_q
    else:
        second.to_q.weight = first.to_q.weight
    small = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=2, num_steps_kept=1,
                              samples_per_step=2, batch_size=2)
    config = QuantConfig.from_preset("W8A8", calibration=small)
    with counting_forwards(model) as calls, pytest.raises(
            ValueError, match=r"tadq.quantize: .* shares one tensor between down_blocks\.1\.attentions\.0\.to_q\."
                              r"weight and up_blocks\.0\.attentions\.0\.to_q\.weight .*copy"):
        api.quantize(model, ddpm_scheduler, config, progress=False)
    assert calls == [0]
    if sharing == "layer placed twice":  # the advice: each place its own copy, then both are quantized and saved
        second.to_q = copy.deepcopy(first.to_q)
    else:
        second.to_q.weight = torch.nn.Parameter(first.to_q.weight.detach().clone())
    qmodel = api.quantize(model, ddpm_scheduler, config, progress=False)
    assert isinstance(qmodel.model.up_blocks[0].attentions[0].to_q, QuantLayer)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)


def test_save_pretrained_refuses_a_wrong_scheduler_or_flag_before_touching_the_folder(tiny_unet, ddpm_scheduler,
                                                                                     tmp_path):
    """A str or a scheduler class failed with an AttributeError / a missing-argument TypeError from inside the
    writer; ``overwrite="no"`` is truthy and replaced the artefact already there."""
    from diffusers import DDPMScheduler

    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=CALIB),
                          progress=False)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()}
    for scheduler in ("ddpm", DDPMScheduler):
        with pytest.raises(TypeError, match="save_pretrained: scheduler must be a diffusers scheduler"):
            qmodel.save_pretrained(tmp_path / "other", scheduler)
    with pytest.raises(TypeError, match=r"save_pretrained: overwrite must be True or False, got str \('no'\)"):
        qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler, overwrite="no")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError),
                                              (2.5, TypeError)])
def test_a_bad_fit_batch_size_is_refused_by_name_before_calibration(value, error, tiny_unet, ddpm_scheduler):
    """It was refused as "batch_size must be a positive int" by the first correction fit, after calibration and
    quantization had run."""
    from tests.conftest import counting_forwards

    from tadq.corrections import TACConfig
    from tadq.recipe import Deployment, NaiveMethod, Recipe

    recipe = Recipe.from_preset("W8A8", method=NaiveMethod(), calibration=CALIB, deployments=(Deployment(SAMPLER),),
                                corrections=(TACConfig(num_samples=4),))
    with counting_forwards(tiny_unet) as calls, pytest.raises(error, match="tadq.quantize: fit_batch_size must be"):
        api.quantize(tiny_unet, ddpm_scheduler, recipe, fit_batch_size=value, progress=False)
    assert calls == [0]


def _training_modules(model: torch.nn.Module) -> list[str]:
    return [name or "(root)" for name, module in model.named_modules() if module.training]


# TFMQ with every stage on (Q-Diffusion base with AdaRound, TIAR, FSC) at a budget that builds each module kind
_TFMQ_SMALL = tadq.TFMQMethod(
    reconstruction=tadq.ReconstructionConfig(weight_iters=4, activation_iters=2, batch_size=4, rounding="adaround"),
    tfmq=TFMQConfig(tiar_iters=4, tiar_batch_size=4, num_samples=4, fsc_samples_per_step=2))


@pytest.mark.parametrize("method", [None, _TFMQ_SMALL], ids=["naive", "tfmq"])
def test_quantized_and_loaded_models_are_in_eval_mode(tiny_unet, ddpm_scheduler, tmp_path, method):
    """The modules tadq builds (the denoiser, every fake-quant wrapper and quantizer, TFMQ's per-step quantizers,
    loaded corrections) were in nn.Module's default training mode around the model's own eval-mode modules:
    ``qmodel.training`` read True after quantize and load."""
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calibration = CalibrationConfig(sampler=sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                                    batch_size=4)
    recipe = tadq.Recipe.from_preset("W8A8", calibration=calibration, deployments=(tadq.Deployment(sampler),),
                                     **({} if method is None else {"method": method}))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, recipe, progress=False)
    assert _training_modules(qmodel) == []
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert _training_modules(loaded) == []
    loaded.train()  # a mode asked for still reaches every module
    assert not [name for name, module in loaded.named_modules() if not module.training]


def test_a_plain_svdquant_quant_config_is_quantized_with_its_branch_and_smoothing(tiny_unet, ddpm_scheduler):
    """``QuantConfig(method="svdquant")`` with the structure SVDQuant fits (a low-rank branch, smoothing) was turned
    into a recipe with ``NaiveMethod``, which refused the config as 'svdquant fits these, not naive'; the docstring
    promises SVDQuant at its default fitting settings, and the recipe the model carries must say SVDQuant."""
    weights, activations = svdquant_schemes("W4A4")
    config = QuantConfig(weights=weights, activations=activations, method="svdquant",
                         calibration=dataclasses.replace(CALIB, num_trajectories=4, samples_per_step=4))
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    assert qmodel.config == config
    assert isinstance(qmodel.recipe.method, SVDQuantMethod)
    fits = qmodel.svdquant_report["layers"]
    assert any(fit["rank"] >= 1 for fit in fits) and any(fit["alpha"] is not None for fit in fits)
