"""The integer backends (``int8``, ``int8-compiled``) on model families other than the unconditional UNet.

Tiny random diffusers models built with diffusers' own classes (the adapter tests' builders): Stable Diffusion and
SDXL ``UNet2DConditionModel`` (cross-attention; SDXL's ``text_time`` added embedding), a class-conditional
``UNet2DModel``, DiT, PixArt, SD3 and Flux. For each: every quantized layer is converted (or the model is refused by
name), every integer layer meets the derived float32 bound of ``tests/backends/bounds.py`` against its fake-quant
twin *on the inputs it really sees* (checked by a hook during each call, with the integer layer's own input
quantizer, so per-step and per-branch ranges are judged at the range the fake model would use at that call),
sampling runs end to end, a saved artefact loaded with ``backend="int8"`` is the in-memory conversion, and the
correction stacks still act.

End-to-end agreement: the transformers and the class UNet agree with fake-quant at the project's ≥ 40 dB median
PSNR. The tiny SD / SDXL UNets under guidance do not, although every layer call of the whole sampling run meets the
bound (measured while writing this, W8A8, 6 samples: per-sample PSNR 23.7-100 dB, median ≈ 29 dB; the fake model at
batch 6 and batch 3 is bit-identical): a float-rounding difference of one ulp flips an activation code at a tie and
the random UNet (GroupNorm, guidance scale 3) carries it on. So for those two only the layer audit is asserted.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tests.adapters.test_mmdit import build_tiny_flux, build_tiny_sd3, prompts
from tests.adapters.test_transformer2d import build_tiny_dit, build_tiny_pixart, captions, labels_source
from tests.adapters.test_unet_condition import conditions as unet_conditions
from tests.backends.bounds import conv_bound, gelu_bound, linear_bound
from tests.backends.machine import needs_compiled, needs_compiled_w8, needs_int8_cpu, needs_int8_w8
from tests.conftest import build_tiny_sd_unet, build_tiny_sdxl_unet, build_tiny_unet
from torch import nn

import tadq
from tadq import api
from tadq.backends import IntegerDenoiser, to_backend
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.corrections import PTQDConfig, TACConfig
from tadq.denoiser import QuantizedDenoiser
from tadq.io import load_quantized
from tadq.metrics.image import psnr_per_sample
from tadq.quant import QuantLayer
from tadq.recipe import Deployment, Recipe
from tadq.registry import adapter_for
from tadq.sampling import ClassLabels, ConditioningList, SamplerConfig

pytestmark = needs_int8_cpu

DDIM = SamplerConfig("ddim", num_steps=4, eta=0.0)
FLOW = SamplerConfig("flow-euler", num_steps=4)
GUIDANCE = 3.0
NUM_CONDITIONS = 24  # enough rows for the correction fits' trajectories
MIN_PSNR_DB = 40.0  # the integer issue's agreement goal


@dataclasses.dataclass(frozen=True)
class Family:
    build: Callable[[], nn.Module]
    scheduler: Callable[[], object]
    sampler: SamplerConfig
    conditions: Callable[[], object]
    guidance: float = GUIDANCE
    unet: bool = False  # convolutional UNet: shortcut splits; sample agreement is chaotic (module docstring)


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(num_train_timesteps=1000)


def _flow() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


FAMILIES = {
    "sd": Family(build_tiny_sd_unet, _ddim, DDIM,
                 lambda: ConditioningList(unet_conditions(NUM_CONDITIONS, seed=1)), unet=True),
    "sdxl": Family(build_tiny_sdxl_unet, _ddim, DDIM,
                   lambda: ConditioningList(unet_conditions(NUM_CONDITIONS, sdxl=True, seed=1)), unet=True),
    "unet-class": Family(lambda: build_tiny_unet(num_class_embeds=10), _ddim, DDIM,
                         lambda: ClassLabels([1, 4, 7, 2, 9, 0] * (NUM_CONDITIONS // 6)), guidance=1.0, unet=True),
    "dit": Family(build_tiny_dit, _ddim, DDIM, lambda: labels_source((1, 4, 7, 2, 9, 0) * (NUM_CONDITIONS // 6))),
    "pixart": Family(build_tiny_pixart, _ddim, DDIM, lambda: ConditioningList(captions(NUM_CONDITIONS, seed=1))),
    "sd3": Family(build_tiny_sd3, _flow, FLOW, lambda: ConditioningList(prompts(NUM_CONDITIONS, seed=1))),
    "flux": Family(build_tiny_flux, _flow, FLOW,
                   lambda: ConditioningList(prompts(NUM_CONDITIONS, seed=1, guidance=3.5))),
}
GUIDED = [name for name, family in FAMILIES.items() if family.guidance != 1.0]
TRANSFORMERS = ["dit", "pixart", "sd3", "flux"]


def _w8(preset: str) -> list:
    """The machine marker of a preset: 8-bit weight codes need VNNI/AMX (tests/backends/machine.py)."""
    return [needs_int8_w8] if preset.startswith("W8") else []


# ---------------------------------------------------------------- shared, cached per process


def _calibration_config(family: Family) -> CalibrationConfig:
    return CalibrationConfig(sampler=family.sampler, num_trajectories=4, num_steps_kept=2, samples_per_step=4,
                             batch_size=8)


@functools.cache
def _setup(name: str):
    """(FP model, scheduler, conditions, calibration set) of a family, built once."""
    torch.set_num_threads(1)
    family = FAMILIES[name]
    model, scheduler, source = family.build().eval(), family.scheduler(), family.conditions()
    calibration = collect_calibration_set(model, adapter_for(model), scheduler, _calibration_config(family),
                                          progress=False, conditions=source, guidance_scale=family.guidance)
    return model, scheduler, source, calibration


def _config(name: str, preset: str, **overrides) -> QuantConfig:
    family = FAMILIES[name]
    fields = {"quantize_attention": True, "split_shortcut": family.unet} | overrides
    return QuantConfig.from_preset(preset, calibration=_calibration_config(family), **fields)


@functools.cache
def _fake(name: str, preset: str, branch_ranges: bool = False) -> QuantizedDenoiser:
    model, scheduler, _, calibration = _setup(name)
    return api.quantize(model, scheduler, _config(name, preset, branch_ranges=branch_ranges),
                        calibration=calibration, progress=False)


def _sample(denoiser, name: str, num_samples: int = 4, seed: int = 7, source=None) -> torch.Tensor:
    model, scheduler, conditions, _ = _setup(name)
    family = FAMILIES[name]
    return api.sample(denoiser, scheduler, family.sampler, num_samples=num_samples, seed=seed,
                      batch_size=num_samples, progress=False, conditions=conditions if source is None else source,
                      guidance_scale=family.guidance).images


# ---------------------------------------------------------------- the layer audit


INTEGER_LAYERS = (OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d)
QUANTIZER_NAMES = ("input_quantizer", "input_quantizer_deep", "input_quantizer_skip")


class LayerAudit:
    """Checks every integer layer call against its fake-quant twin on the same input, within the derived bound.

    The twin is run with the integer layer's *own* input quantizer(s) swapped in for the call, so the reference is
    what fake-quant computes with the range that quantizer holds at that moment (a TFMQ step's range, a guidance
    branch's range written in place) and the weights the twin holds.
    """

    def __init__(self, integer: QuantizedDenoiser, fake: QuantizedDenoiser) -> None:
        self.calls = 0
        self.seen: set[str] = set()
        self.failures: list[tuple[str, float]] = []
        self._hooks = []
        for name, module in integer.model.named_modules():
            if isinstance(module, INTEGER_LAYERS):
                twin = fake.model.get_submodule(name)
                self._hooks.append(module.register_forward_hook(functools.partial(self._check, name, twin)))

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def __enter__(self) -> LayerAudit:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def _check(self, name: str, twin: nn.Module, module: nn.Module, args, output) -> None:
        x = args[0]
        saved = {part: getattr(twin, part) for part in QUANTIZER_NAMES if hasattr(twin, part)}
        try:
            for part in saved:
                setattr(twin, part, getattr(module, part))
            expected = twin(x).double()
            bound = _bound(twin, x)
            if getattr(module, "gelu", None) is not None:  # the proj of a fused feed-forward GELU (bounds.py)
                expected, bound = F.gelu(expected, approximate=module.gelu), gelu_bound(expected, bound)
        finally:
            for part, quantizer in saved.items():
                setattr(twin, part, quantizer)
        self.calls += 1
        self.seen.add(name)
        excess = float(((output.double() - expected).abs() - bound).max())
        if excess > 0:
            self.failures.append((name, excess))


def _bound(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(layer, "input_quantizer_deep"):
        views, split = layer.quantized_weights(), layer.split
        deep = conv_bound(x[:, :split], layer.input_quantizer_deep, *views["weight_deep"], layer.bias, layer, extra=1)
        skip = conv_bound(x[:, split:], layer.input_quantizer_skip, *views["weight_skip"], None, layer, extra=1)
        return deep + skip
    if isinstance(layer, nn.Conv2d):
        return conv_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias, layer)
    return linear_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias)


def _agree(images: torch.Tensor, reference: torch.Tensor) -> bool:
    return bool(psnr_per_sample(images, reference).median() >= MIN_PSNR_DB)


def _quantized_layer_names(fake: QuantizedDenoiser) -> set[str]:
    return {name for name, module in fake.model.named_modules() if isinstance(module, QuantLayer)}


# ---------------------------------------------------------------- every family × preset: converted and exact


PRESETS = ["W8A8", "W8A8-WSYM", "W4A8", "W4A4"]


@pytest.mark.parametrize("preset", [pytest.param(p, marks=_w8(p)) for p in PRESETS])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_quantized_layer_becomes_an_exact_integer_kernel(name, preset):
    """Every fake-quant layer of the family is converted (none left simulated), every integer layer runs in a
    guided call on the calibration inputs (both branches), and each meets the derived bound against its twin."""
    fake = _fake(name, preset)
    integer = to_backend(fake, "int8")
    assert isinstance(integer, IntegerDenoiser) and integer.backend == "int8"
    assert set(integer.layers["integer"]) == _quantized_layer_names(fake)
    assert not any(isinstance(m, QuantLayer) for m in integer.model.modules())
    _, _, _, calibration = _setup(name)
    with LayerAudit(integer, fake) as audit:
        with torch.no_grad():
            integer(calibration.x, calibration.t, calibration.cond)
    assert audit.seen == set(integer.layers["integer"])  # every integer layer was exercised
    assert audit.failures == []


@needs_int8_w8
def test_copying_an_int8_model_is_refused_by_name():
    """Its prepacked oneDNN weights cannot be copied: deepcopy failed deep inside torch ('Cannot access storage of
    OpaqueTensorImpl'); now it names the layer and what to copy instead."""
    import copy

    integer = to_backend(_fake("pixart", "W8A8"), "int8")
    with pytest.raises(TypeError, match=r"an int8 model holds prepacked oneDNN weights.*to_backend\(copy.deepcopy"):
        copy.deepcopy(integer)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_weight_only_presets_are_refused_by_name(name):
    fake = _fake(name, "W4A16")
    with pytest.raises(ValueError, match=r"^[\w.]+: its input is not quantized \(weight-only scheme\)"):
        to_backend(fake, "int8")


# ---------------------------------------------------------------- sampling end to end


@pytest.mark.parametrize("preset", [pytest.param("W8A8", marks=needs_int8_w8), "W4A8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampling_runs_on_the_integer_backend(name, preset):
    """Guided sampling (both branches in one batch) and a single sample (batch 1: two rows under guidance, one
    without) on int8: every layer call of every step within the bound; transformers and the class UNet also agree
    with fake-quant samples at ≥ 40 dB median PSNR."""
    fake = _fake(name, preset)
    integer = to_backend(fake, "int8")
    with LayerAudit(integer, fake) as audit:
        images = _sample(integer, name)
        single = _sample(integer, name, num_samples=1, seed=11)
    assert audit.failures == [] and audit.calls >= FAMILIES[name].sampler.num_steps * len(audit.seen)
    assert torch.isfinite(images).all() and torch.isfinite(single).all()
    assert single.shape[0] == 1
    if not FAMILIES[name].unet or name == "unet-class":
        assert _agree(images, _sample(fake, name))
        assert _agree(single, _sample(fake, name, num_samples=1, seed=11))


# ---------------------------------------------------------------- guidance branch ranges


@pytest.mark.parametrize("name", ["sd", "pixart", "dit", "flux"])
def test_guidance_branch_ranges_are_used_by_the_integer_layers(name):
    """``QuantConfig.branch_ranges``: the unconditional rows are quantized with their own activation ranges, which
    ``QuantizedDenoiser.forward`` writes into the quantizers in place for that call (``BranchRanges.active``). The
    int8 layers must quantize with them too. ``int8-compiled`` refuses such a model by name; ``int8`` converts it,
    so it must run it right (or refuse it, as the compiled backend does)."""
    fake = _fake(name, "W4A8", branch_ranges=True)
    assert fake.branch_ranges is not None
    try:
        integer = to_backend(fake, "int8")
    except ValueError as error:  # a named refusal would be acceptable; silently wrong numbers are not
        assert "branch ranges" in str(error)
        return
    _, _, _, calibration = _setup(name)
    unconditional = calibration.cond.unconditional_rows
    assert unconditional is not None and bool(unconditional.any()) and not bool(unconditional.all())
    with LayerAudit(integer, fake) as audit, torch.no_grad():
        ran = integer(calibration.x, calibration.t, calibration.cond)
        expected = fake(calibration.x, calibration.t, calibration.cond)
    wrong = sorted({layer for layer, _ in audit.failures})
    assert wrong == [], f"{len(wrong)} integer layers ignored the unconditional branch's ranges, e.g. {wrong[:3]}"
    if not FAMILIES[name].unet:  # transformers: the whole output, as test_transformer_configs judges it
        model = _setup(name)[0]
        with torch.no_grad():
            reference = adapter_for(model).predict_eps(model, calibration.x, calibration.t,
                                                       calibration.cond.without_markers())
        rows = unconditional.nonzero().squeeze(1)
        assert (ran[rows] - expected[rows]).norm() < 0.1 * (expected[rows] - reference[rows]).norm()


@pytest.mark.parametrize("name", ["pixart"])
def test_a_branch_range_artefact_loaded_on_int8_samples_like_fake_quant(name, tmp_path):
    """The same through ``load_quantized(folder, backend="int8")``: the loaded integer model's guided samples must
    be the fake-quant model's (a transformer: bit-level agreement elsewhere in this file)."""
    _, scheduler, _, _ = _setup(name)
    fake = _fake(name, "W4A8", branch_ranges=True)
    fake.save_pretrained(tmp_path / "artefact", scheduler)
    try:
        integer, _ = load_quantized(tmp_path / "artefact", backend="int8")
    except ValueError as error:
        assert "branch ranges" in str(error)
        return
    assert integer.branch_ranges is not None
    psnr = psnr_per_sample(_sample(integer, name), _sample(fake, name))
    assert float(psnr.median()) >= MIN_PSNR_DB, f"int8 vs fake-quant per-sample PSNR {psnr.tolist()}"


@needs_compiled
def test_int8_compiled_refuses_branch_ranges_by_name():
    fake = _fake("pixart", "W4A8", branch_ranges=True)
    with pytest.raises(ValueError, match="int8-compiled: the model has guidance branch ranges"):
        to_backend(fake, "int8-compiled")


@pytest.fixture(scope="module")
def sdxl_pipeline_folder(tmp_path_factory):
    from tests.pipelines.builders import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("redteam-sdxl") / "sdxl")


@pytest.mark.parametrize("branch_ranges", [False, True], ids=["shared-ranges", "branch-ranges"])
def test_an_sdxl_pipeline_artefact_runs_exact_integer_layers_through_its_call(sdxl_pipeline_folder, branch_ranges,
                                                                              tmp_path):
    """``tadq.load_pipeline(ART, backend="int8")(prompts)`` on an SDXL artefact (two text encoders, pooled text and
    time ids; its pipeline has no int8 test elsewhere): every integer layer call of the guided run meets the bound
    against the fake-quant pipeline's own layers, with and without the recipe's guidance branch ranges."""
    from tadq.pipelines import PromptConditions, load_fp_pipeline, save_pipeline

    sampler = SamplerConfig("ddim", num_steps=3, eta=0.0)
    recipe = Recipe.from_preset("W4A8", branch_ranges=branch_ranges)
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(
        recipe.calibration, sampler=sampler, num_trajectories=2, num_steps_kept=2, samples_per_step=2, batch_size=8),
        deployments=(Deployment(sampler=sampler, guidance_scale=GUIDANCE),))
    pipe = load_fp_pipeline(sdxl_pipeline_folder)
    fake = tadq.quantize(pipe.unet, pipe.scheduler, recipe, conditions=PromptConditions(pipe, ["a cat", "a dog"]),
                         progress=False)
    save_pipeline(fake, sdxl_pipeline_folder, tmp_path / "artefact")
    integer = tadq.load_pipeline(tmp_path / "artefact", backend="int8")
    reference = tadq.load_pipeline(tmp_path / "artefact")
    assert isinstance(integer.tadq_denoiser, IntegerDenoiser)
    with LayerAudit(integer.tadq_denoiser, reference.tadq_denoiser) as audit:
        latents = integer(["a cat", "a dog"], seed=2, output_type="latent", progress=False).images
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    wrong = sorted({layer for layer, _ in audit.failures})
    assert audit.calls > 0 and wrong == [], f"{len(wrong)} integer layers off their fake-quant twin, e.g. {wrong[:3]}"


# ---------------------------------------------------------------- saved artefacts


@pytest.mark.parametrize("preset", [pytest.param("W8A8", marks=needs_int8_w8), "W4A8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_an_artefact_loaded_on_int8_is_the_in_memory_conversion(name, preset, tmp_path):
    """Loading restores the weights on their grid, so the integer codes, and the outputs, are bit-identical."""
    _, scheduler, _, calibration = _setup(name)
    fake = _fake(name, preset)
    fake.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, loaded_scheduler = load_quantized(tmp_path / "artefact", backend="int8")
    in_memory = to_backend(fake, "int8")
    assert isinstance(loaded, IntegerDenoiser) and type(loaded_scheduler) is type(scheduler)
    assert loaded.layers == in_memory.layers
    with torch.no_grad():
        got = loaded(calibration.x, calibration.t, calibration.cond)
        expected = in_memory(calibration.x, calibration.t, calibration.cond)
    assert torch.equal(got, expected)
    also, _ = tadq.load(tmp_path / "artefact", backend="int8")  # the public alias
    with torch.no_grad():
        assert torch.equal(also(calibration.x, calibration.t, calibration.cond), expected)


# ---------------------------------------------------------------- correction stacks


CORRECTIONS = {
    "ptqd": lambda: PTQDConfig(num_samples=8, seed=3, select=False),
    "tac": lambda: TACConfig(num_samples=8, seed=3, select_ner=False, selection_samples=4),
}


# SD and SDXL (≈ 7 s each on a 2-core AVX2 CPU) run with `make test-slow`: the default suite fits PTQD and TAC on the
# integer models of the other families here, and the SD / SDXL integer layers are checked in the tests above
@pytest.mark.parametrize("name, correction", [pytest.param("sd", "ptqd", marks=pytest.mark.slow),
                                              pytest.param("sdxl", "tac", marks=pytest.mark.slow),
                                              ("unet-class", "tac"), ("dit", "ptqd"), ("pixart", "tac"),
                                              ("sd3", "tac"), ("flux", "ptqd")])
def test_correction_stacks_act_on_the_integer_model_and_survive_loading(name, correction, tmp_path):
    model, scheduler, source, calibration = _setup(name)
    family = FAMILIES[name]
    recipe = Recipe.from_quant_config(_config(name, "W4A8"), corrections=(CORRECTIONS[correction](),),
                                      deployments=(Deployment(family.sampler, guidance_scale=family.guidance),))
    fake = api.quantize(model, scheduler, recipe, calibration=calibration, conditions=source, progress=False)
    integer = to_backend(fake, "int8")
    assert len(integer.correction_hooks()) == 1
    with LayerAudit(integer, fake) as audit:
        corrected = _sample(integer, name)
    assert audit.failures == []
    uncorrected = _sample(to_backend(_fake(name, "W4A8"), "int8"), name)
    assert not torch.equal(corrected, uncorrected)  # the correction acts on the integer model
    if not family.unet or name == "unet-class":
        assert _agree(corrected, _sample(fake, name))
    fake.save_pretrained(tmp_path / "artefact", scheduler)
    loaded, _ = load_quantized(tmp_path / "artefact", backend="int8")
    assert len(loaded.correction_hooks()) == 1
    assert torch.equal(_sample(loaded, name), corrected)


# ---------------------------------------------------------------- odd shapes and masks


def _odd_shape_calls(name: str):
    """(x, t, cond) for batch 1 and non-square latents, built from the calibration set's first rows."""
    _, _, _, calibration = _setup(name)
    channels, height, width = calibration.x.shape[1:]
    cond = calibration.cond.without_markers()
    for batch, h, w in [(1, height, width), (2, height, width + 4), (2, height + 4, width), (3, height + 2,
                                                                                              width + 6)]:
        generator = torch.Generator().manual_seed(batch * 100 + h * 10 + w)
        x = torch.randn(batch, channels, h, w, generator=generator)
        yield x, calibration.t[:1].expand(batch).clone(), cond.rows(torch.arange(batch))


@pytest.mark.parametrize("name", ["sd", "sdxl", "unet-class", "pixart", "sd3", "flux"])
def test_batch_one_and_non_square_latents_run_exactly(name):
    """Models that take any latent size (UNets, PixArt's and SD3's interpolated/cropped position embeddings, Flux's
    packing): the integer model returns the input's shape and every layer call is within the bound."""
    fake = _fake(name, "W4A8")
    integer = to_backend(fake, "int8")
    for x, t, cond in _odd_shape_calls(name):
        with LayerAudit(integer, fake) as audit, torch.no_grad():
            out = integer(x, t, cond)
            reference = fake(x, t, cond)
        assert out.shape == x.shape == reference.shape, (name, tuple(x.shape), tuple(out.shape))
        assert audit.failures == [], (tuple(x.shape), audit.failures[:3])


def test_dit_on_non_square_latents_returns_their_shape_or_refuses():
    """DiT's diffusers unpatchify assumes a square token grid (height = width = √tokens). Fed a 8×12 latent, the
    denoiser (fake or int8, the adapter's call) must give (N, C, 8, 12) or refuse by name; a tensor with another
    batch size, silently, is wrong."""
    fake = _fake("dit", "W4A8")
    integer = to_backend(fake, "int8")
    _, _, _, calibration = _setup("dit")
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    t, cond = calibration.t[:2], calibration.cond.without_markers().rows(torch.arange(2))
    for denoiser in (fake, integer):
        try:
            with torch.no_grad():
                out = denoiser(x, t, cond)
        except (ValueError, NotImplementedError) as error:
            assert "square" in str(error) or "sample_size" in str(error) or "8" in str(error)
            continue
        assert out.shape == x.shape, f"{type(denoiser).__name__}: {tuple(x.shape)} in, {tuple(out.shape)} out"


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_prompt_masks_reach_the_integer_model(name):
    """A caption attention mask (padding tokens masked): changes the output, and every layer stays exact."""
    fake = _fake(name, "W4A8")
    integer = to_backend(fake, "int8")
    _, _, _, calibration = _setup(name)
    cond = calibration.cond.without_markers()
    tokens = cond.encoder_hidden_states.shape[1]
    mask = torch.ones(cond.batch_size, tokens)
    mask[:, -2:] = 0
    mask[0, 1:] = 0
    masked = dataclasses.replace(cond, attention_mask=mask)
    with LayerAudit(integer, fake) as audit, torch.no_grad():
        with_mask = integer(calibration.x, calibration.t, masked)
        without = integer(calibration.x, calibration.t, cond)
    assert audit.failures == []
    assert not torch.equal(with_mask, without)


def test_sd3_refuses_a_prompt_mask_by_name_on_int8():
    integer = to_backend(_fake("sd3", "W4A8"), "int8")
    _, _, _, calibration = _setup("sd3")
    cond = calibration.cond.without_markers()
    masked = dataclasses.replace(cond, attention_mask=torch.ones(cond.batch_size,
                                                                  cond.encoder_hidden_states.shape[1]))
    with pytest.raises(ValueError, match="attention_mask"):
        integer(calibration.x, calibration.t, masked)


# ---------------------------------------------------------------- int8-compiled (slow: compiles)


@needs_compiled_w8
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_compiled_families_at_batch_one_and_non_square(name):
    """int8-compiled on SDXL (not covered by the compiled tests) and Flux: a batch-1 call and a non-square one
    after the graph was built for another shape, the output equal to eager int8 up to float rounding of the fused
    float ops (1 % of the output's range), and, on Flux, guided sampling at W4A8 agreeing with fake-quant. Measured
    here: both pass; the SDXL case took 705 s with four shapes and guided sampling on the 2-core machine shared with
    other jobs, so it is cut to two shapes."""
    torch._dynamo.reset()
    fake = _fake(name, "W4A8")
    compiled, eager = to_backend(fake, "int8-compiled"), to_backend(fake, "int8")
    calls = list(_odd_shape_calls(name))
    for x, t, cond in calls if name == "flux" else calls[:2]:  # SDXL: each new shape recompiles (≈ 3 min here)
        with torch.no_grad():
            got, expected = compiled(x, t, cond), eager(x, t, cond)
        assert got.shape == x.shape
        scale = float(expected.abs().max())
        assert float((got - expected).abs().max()) <= 1e-2 * scale, tuple(x.shape)
    if not FAMILIES[name].unet:
        images = _sample(compiled, name)
        assert torch.isfinite(images).all() and _agree(images, _sample(fake, name))

