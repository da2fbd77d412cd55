"""The ``int8-compiled`` backend: the int8 layers under torch.compile (Inductor, freezing) keep their arithmetic.

Compiled, a layer quantizes its input with out-of-place ops (``traced_codes``) that Inductor fuses into a generated
C++ kernel. Inductor builds without unsafe math and without FP contraction (its defaults), so the fused kernel does
the same float32 operations in the same order: the codes are bit-identical (checked on exact half-step ties), the
int32 sums are exact, and every layer meets the same derived bound against fake-quant as the eager layer
(``bounds.py``; the offset-correction and bias roundings are at most the ones counted there). End to end, Inductor
also reorders the float ops between layers (GroupNorm's reductions), which is float rounding of the same kind as
eager-vs-fake, hence the same ≥ 40 dB median PSNR criterion.

Each compile takes seconds to a minute on these CPUs; the layer tests compile one small layer each.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tests.backends.bounds import conv_bound, linear_bound
from tests.backends.machine import needs_compiled, needs_compiled_w8
from tests.backends.test_layers import ACTIVATIONS, CONVS, WEIGHTS, _conv, _linear, _split
from tests.backends.test_model import MIN_PSNR_DB, _agree, _images, _quantize
from torch import nn
from torch.torch_version import TorchVersion

from tadq.backends import (
    BACKENDS,
    BackendUnavailableError,
    IntegerDenoiser,
    capability,
    check_backend,
    to_backend,
)
from tadq.backends.activations import activation_grid, traced_codes
from tadq.backends.compiled import INT8_CONV_OPS, CompiledIntegerDenoiser, frozen, keep_identity_guards, prime_grids
from tadq.backends.cpu_int8 import OneDNNConv2d, OneDNNLinear, OneDNNSplitConv2d
from tadq.quant import QuantLinear
from tadq.quant.attention import RowSoftmaxQuantizer


def _compiled(module: nn.Module):
    torch._dynamo.reset()
    prime_grids(module)
    compiled = torch.compile(module)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), frozen():
            return compiled(x)

    return call


@needs_compiled
def test_compiled_codes_are_the_fake_quant_codes():
    """The fused quantization kernel rounds exactly like fake-quant, including exact half-step ties."""
    quantizer = QuantLinear.from_module(nn.Linear(4, 4), WEIGHTS["w8-asym"], ACTIVATIONS["a8"]).input_quantizer
    quantizer.set_range(torch.tensor([-3.0]), torch.tensor([5.0]))
    grid = activation_grid(quantizer)
    x = torch.cat([(torch.arange(-400, 400) + 0.5) * grid.scale, torch.randn(10_000) * 3])
    torch._dynamo.reset()
    codes = torch.compile(lambda v: traced_codes(torch.nn.functional.silu(v), grid).to(torch.uint8))(x)
    fake = torch.fake_quantize_per_tensor_affine(torch.nn.functional.silu(x), grid.scale, int(grid.zero_point), 0,
                                                 255)
    assert torch.equal((codes.float() - grid.zero_point) * grid.scale, fake)


def _attention_operands(batch: int, scale: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (batch, 2, 16, 8) q-like operand (half of it at half steps of ``scale``) and a (batch, 2, 16, 16) softmax
    P whose rows hold entries at half steps of their own per-row step max_j P_ij / 255 (near ties either way)."""
    operand = torch.randn(batch, 2, 16, 8, generator=generator) * 2
    ties = (torch.randint(-100, 100, operand.shape, generator=generator) + 0.5) * scale
    operand = torch.where(torch.rand(operand.shape, generator=generator) < 0.5, ties, operand)
    probs = (torch.randn(batch, 2, 16, 16, generator=generator) * 3).softmax(dim=-1)
    row_step = probs.amax(dim=-1, keepdim=True) / 255
    at_ties = (torch.randint(0, 255, probs.shape, generator=generator) + 0.5) * row_step
    return operand, torch.where(torch.rand(probs.shape, generator=generator) < 0.5, at_ties, probs)


@needs_compiled
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_attention_operand_quantizers_compile_once_for_every_batch_size(granularity):
    """The attention operands' quantizers (q/k/v per tensor; P per tensor or per row) are what an int8-compiled model
    keeps simulated. Their fused fake-quant ops have no fake-tensor implementation for a dynamic batch: the graph
    broke there, Dynamo then skipped the whole UNet forward and compiled its sub-frames one by one at every new
    batch size (graphs 1 → 2 → 11 → 33 over batches 3, 1, 5, 3). Compiled, they run the kernels' arithmetic as
    pure ops instead: one graph, no break, with a batch dimension that changes, and the fused ops' bits exactly
    (the inputs sit at half steps, where another rounding order lands one code away)."""
    from torch._dynamo.utils import counters

    from tadq.quant import Quantizer
    from tadq.quant.attention import RowSoftmaxQuantizer, softmax_scheme

    operand_quantizer = Quantizer(ACTIVATIONS["a8"], kind="activation")
    operand_quantizer.set_range(torch.tensor([-3.0]), torch.tensor([5.0]))
    scheme = softmax_scheme(ACTIVATIONS["a8"], 8, granularity)
    softmax_quantizer = RowSoftmaxQuantizer(scheme) if granularity == "per_row" else Quantizer(scheme, "activation")
    if granularity == "per_tensor":
        softmax_quantizer.set_range(torch.tensor([0.0]), torch.tensor([0.6]))

    def quantize(operand: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return operand_quantizer(operand), softmax_quantizer(probs)

    generator = torch.Generator().manual_seed(0)
    inputs = [_attention_operands(batch, float(operand_quantizer.scale), generator) for batch in (3, 5, 2)]
    with torch.no_grad():  # eager first (torch's fused fake-quant kernels): it memoises a quantizer's kernel range
        expected = [quantize(*pair) for pair in inputs]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(quantize, dynamic=True)
    for pair, reference in zip(inputs, expected, strict=True):
        with torch.no_grad(), frozen():
            got = compiled(*pair)
        assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1]), pair[0].shape
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1


@needs_compiled
@pytest.mark.parametrize("case", [pytest.param(case, marks=needs_compiled_w8) if "w8" in case else case
                                  for case in ("conv-w8", "conv-w8sym", "conv-w4-stride2", "split-w8", "linear-w8")])
def test_compiled_layers_match_fake_quant(case):
    """The same derived per-element bound as the eager int8 layers (asymmetric 8-bit: offset correction; symmetric
    8-bit: none)."""
    weights = WEIGHTS["w4-asym" if "w4" in case else "w8-sym" if "w8sym" in case else "w8-asym"]
    activations = ACTIVATIONS["a8"]
    if case.startswith("conv"):
        layer, x = _conv(weights, activations, CONVS[1 if "stride2" in case else 0])
        integer = OneDNNConv2d(layer, "layer")
        assert integer.kernel.has_offset == (case == "conv-w8")
        bound = conv_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias, layer)
    elif case.startswith("split"):
        layer, x = _split(weights, activations)
        integer = OneDNNSplitConv2d(layer, "layer")
        views = layer.quantized_weights()
        bound = conv_bound(x[:, :10], layer.input_quantizer_deep, *views["weight_deep"], layer.bias, layer, extra=1)
        bound = bound + conv_bound(x[:, 10:], layer.input_quantizer_skip, *views["weight_skip"], None, layer,
                                   extra=1)
    else:
        layer, x = _linear(weights, activations)
        integer = OneDNNLinear(layer, "layer")
        bound = linear_bound(x, layer.input_quantizer, layer.weight_quantizer, layer.weight, layer.bias)
    with torch.no_grad():
        expected = layer(x).double()
        got = _compiled(integer)(x).double()
    assert got.shape == expected.shape
    excess = (got - expected).abs() - bound
    assert excess.max() <= 0, f"{case}: worst error exceeds the derived bound by {excess.max():.3g}"


@needs_compiled
@pytest.mark.slow
@pytest.mark.parametrize("preset, attention", [pytest.param("W8A8", False, marks=needs_compiled_w8),
                                               pytest.param("W8A8", True, marks=needs_compiled_w8), ("W4A8", True)])
def test_compiled_sampling_agrees_with_fake_quant(tiny_unet, ddpm_scheduler, preset, attention):
    """A tiny UNet end to end (W8A8: asymmetric weights with the offset term; W4A8: the preset a CPU without VNNI
    runs), with and without quantized attention operands. Slow: compiling even this UNet takes 1.5–3 minutes on the
    loaded 2-core CPU."""
    torch._dynamo.reset()
    fake = _quantize(tiny_unet, ddpm_scheduler, preset, quantize_attention=attention)
    compiled = to_backend(fake, "int8-compiled")
    assert isinstance(compiled, CompiledIntegerDenoiser) and isinstance(compiled, IntegerDenoiser)
    assert compiled.backend == "int8-compiled" and compiled.layers["integer"]
    images = _images(compiled, ddpm_scheduler)
    assert _agree(images, _images(fake, ddpm_scheduler))
    with torch.enable_grad():  # runs without autograd whatever the caller's mode (freezing needs it)
        assert torch.equal(_images(compiled, ddpm_scheduler), images)


@needs_compiled
@pytest.mark.slow
def test_quantized_attention_keeps_two_graphs_when_the_batch_size_changes(tiny_unet, ddpm_scheduler):
    """A model with quantized attention operands, called with batches of 3, 5 and 2 (a run whose last batch is
    smaller): the first size compiles a static graph, the second one graph with a dynamic batch that serves every
    later size, as for a model without quantized attention. The operands' fused fake-quant ops broke that dynamic
    graph (no fake-tensor implementation), so Dynamo skipped the UNet forward and compiled its sub-frames one by
    one, 11 graphs at the second size and more at each new one, towards the recompile limit and eager speed.
    Outputs against the eager int8 model: the same integer kernels and attention arithmetic, Inductor reordering
    float ops only, hence ``test_model``'s criterion (median PSNR ≥ 40 dB). Slow: two compiles of the tiny UNet."""
    from torch._dynamo.utils import counters

    from tadq.metrics.image import psnr_per_sample

    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8", quantize_attention=True)
    assert any(isinstance(m, RowSoftmaxQuantizer) for m in fake.model.modules())  # the default per-row P
    eager = to_backend(fake, "int8")
    torch._dynamo.reset()
    counters.clear()
    compiled = to_backend(fake, "int8-compiled")
    generator = torch.Generator().manual_seed(0)
    for batch in (3, 5, 2):
        x = torch.randn(batch, *fake.sample_shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        with torch.no_grad():
            got, expected = compiled(x, t), eager(x, t)
        assert psnr_per_sample(got, expected).median() >= MIN_PSNR_DB, batch
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2


@needs_compiled_w8
@pytest.mark.slow
def test_two_compiled_models_in_one_process_each_run_their_own_graph(tiny_unet, ddpm_scheduler):
    """Compiled models of one class share their forward's graph cache; the guard filter drops the per-call checks
    of module attributes but keeps the identity checks, so the second model compiles its own graph instead of
    running the first one's (it did, before the identity guards were kept). Slow: two compiles."""
    torch._dynamo.reset()
    fakes = [_quantize(tiny_unet, ddpm_scheduler, preset) for preset in ("W8A8", "W8A8-WSYM")]
    eager = [to_backend(fake, "int8") for fake in fakes]
    compiled = [to_backend(fake, "int8-compiled") for fake in fakes]
    x = torch.randn(2, *fakes[0].sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500, dtype=torch.long)
    with torch.no_grad():
        expected = [model(x, t) for model in eager]
        got = [model(x, t) for model in compiled]
    apart = (expected[0] - expected[1]).abs().max()
    for mine, other, out in ((0, 1, got[0]), (1, 0, got[1])):
        assert (out - expected[mine]).abs().max() < (out - expected[other]).abs().max(), f"model {mine}"
    assert apart > 0


def test_the_guard_filter_keeps_identity_and_input_guards_only():
    class Source:
        def __init__(self, on_module: bool) -> None:
            self.on_module = on_module

        def is_unspecialized_nn_module(self) -> bool:
            return self.on_module

    def entry(kind: str, on_module: bool) -> SimpleNamespace:
        return SimpleNamespace(guard_type=kind, orig_guard=SimpleNamespace(source=Source(on_module)))

    entries = [entry("ID_MATCH", True), entry("CONSTANT_MATCH", True), entry("TYPE_MATCH", True),
               entry("TENSOR_MATCH", False), entry("CONSTANT_MATCH", False)]
    assert keep_identity_guards(entries) == [True, False, False, True, True]


@needs_compiled
def test_conversion_is_lazy_and_lifts_the_recompile_limit(tiny_unet, ddpm_scheduler):
    """Converting compiles nothing yet; torch's graph limit per code object (shared by every compiled model of one
    class) is raised, so a process with several compiled models does not fall back to eager unnoticed."""
    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    compiled = to_backend(fake, "int8-compiled")
    assert isinstance(compiled, CompiledIntegerDenoiser) and compiled.model._compiled_call_impl is not None
    assert torch._dynamo.config.recompile_limit >= 64


@needs_compiled
@pytest.mark.parametrize("op", INT8_CONV_OPS)
def test_inductor_counts_the_int8_convs_as_convs_while_compiling(op):
    """Inductor's channels-last layout choice sees only the convs its ``is_mkldnn_conv`` recognises: under
    ``frozen()`` that includes each int8 conv op the layers call, and only there (fails if torch renames it)."""
    import torch._inductor.graph as inductor_graph

    if TorchVersion(torch.__version__) < "2.11":  # the hook it extends came in 2.11; compiled convs stay NCHW before
        pytest.skip(f"torch {torch.__version__}'s Inductor has no is_mkldnn_conv (2.11 and later)")
    name, overload = op.split(".")
    int8_conv = torch.fx.Graph().call_function(getattr(getattr(torch.ops.onednn, name), overload), ())
    float_op = torch.fx.Graph().call_function(torch.ops.aten.add.Tensor, ())
    assert not inductor_graph.is_mkldnn_conv(int8_conv)
    with frozen():
        assert torch._inductor.config.force_layout_optimization
        assert inductor_graph.is_mkldnn_conv(int8_conv)
        assert not inductor_graph.is_mkldnn_conv(float_op)
    assert not inductor_graph.is_mkldnn_conv(int8_conv)


def test_compiled_is_a_registered_backend():
    assert "int8-compiled" in BACKENDS and BACKENDS["int8-compiled"].factory is BACKENDS["int8"].factory


def test_compiled_is_refused_without_a_cpp_compiler(monkeypatch):
    monkeypatch.setattr(capability, "int8_cpu_missing", lambda: None)
    monkeypatch.setattr(capability.shutil, "which", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="int8-compiled.*C\\+\\+ compiler.*not replaced"):
        check_backend("int8-compiled")


def test_compiled_is_refused_where_the_int8_kernels_are_not_exact(monkeypatch):
    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: 0)
    with pytest.raises(BackendUnavailableError, match="int8-compiled.*wrong sums.*not replaced"):
        check_backend("int8-compiled")


@needs_compiled
def test_per_step_ranges_are_taken_and_their_step_is_required(tiny_unet, ddpm_scheduler):
    """A per-step range no longer forces the eager backend: the graph reads the step from ``StepState``'s tensor
    (tests/backends/test_tfmq.py compiles one), and since the graph cannot check that a step was set, the compiled
    model checks it before every call, as the fake and eager models do inside theirs."""
    from tadq.tfmq.fsc import StepQuantizer, StepState

    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    layer, state = fake.model.conv_in, StepState(2)
    layer.input_quantizer = StepQuantizer(layer.input_quantizer, torch.tensor([0.01, 0.02]),
                                          torch.tensor([128.0, 128.0]), state)
    compiled = to_backend(fake, "int8-compiled")
    assert compiled.step_states == [compiled.model.conv_in.input_quantizer.state]
    assert compiled.step_states[0] is not state  # the converted copy's own state
    with pytest.raises(RuntimeError, match="sampler step"):
        compiled(torch.randn(1, *fake.sample_shape), torch.full((1,), 10))


@needs_compiled
def test_per_label_caches_are_refused_before_converting(tiny_unet, ddpm_scheduler):
    """A class-conditional TFMQ cache captures the labels in a pre-hook at each call, which is not traced: refused
    by name, pointing at the eager backend, the fake model left untouched."""
    from tadq.tfmq.cache import LabelCapture
    from tadq.tfmq.fsc import StepState

    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    fake.model.register_forward_pre_hook(LabelCapture(StepState(2)), with_kwargs=True)
    with pytest.raises(ValueError, match=r"int8-compiled: the network captures class labels.*'int8'"):
        to_backend(fake, "int8-compiled", inplace=True)
    assert not isinstance(fake, IntegerDenoiser)


@needs_compiled
def test_forward_hooks_are_refused(tiny_unet, ddpm_scheduler):
    fake = _quantize(tiny_unet, ddpm_scheduler, "W4A8")
    fake.model.mid_block.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(ValueError, match="int8-compiled: mid_block has forward hooks"):
        to_backend(fake, "int8-compiled")


@needs_compiled
@pytest.mark.slow
def test_cli_sample_runs_int8_compiled(tiny_unet, ddpm_scheduler, tmp_path):
    from typer.testing import CliRunner

    from tadq.cli.app import app

    _quantize(tiny_unet, ddpm_scheduler, "W4A8").save_pretrained(tmp_path / "q", ddpm_scheduler)
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "q"), "--backend", "int8-compiled", "--num-samples",
                                      "2", "--steps", "4", "--out", str(tmp_path / "s.png"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").is_file()


def _guided_sd(preset: str = "W8A8"):
    """A naive ``preset`` tiny Stable Diffusion UNet (text cross-attention, quantized attention operands, split
    shortcuts), its scheduler, and evaluation prompts disjoint from the calibration ones."""
    from diffusers import DDIMScheduler
    from tests.adapters.test_unet_condition import CALIB, GUIDANCE, _quant_config, conditions
    from tests.conftest import build_tiny_sd_unet

    from tadq import api
    from tadq.calibration import collect_calibration_set
    from tadq.registry import adapter_for
    from tadq.sampling import ConditioningList

    model, scheduler = build_tiny_sd_unet(), DDIMScheduler(num_train_timesteps=1000)
    calibration = collect_calibration_set(model, adapter_for(model), scheduler.config, CALIB, progress=False,
                                          conditions=ConditioningList(conditions(6, seed=1), name="calibration"),
                                          guidance_scale=GUIDANCE)
    fake = api.quantize(model, scheduler, _quant_config(preset, "naive"), calibration=calibration, progress=False)
    return fake, scheduler, ConditioningList(conditions(6, seed=5), name="evaluation")


def _guided_images(model, scheduler, prompts) -> torch.Tensor:
    from tests.adapters.test_unet_condition import GUIDANCE, SAMPLER

    from tadq import api

    return api.sample(model, scheduler, SAMPLER, num_samples=6, seed=7, batch_size=6, progress=False,
                      conditions=prompts, guidance_scale=GUIDANCE).images


@needs_compiled_w8
def test_a_compiled_cross_attention_model_skips_the_kv_memo(monkeypatch):
    """Text-conditioned adapters carry the cross-attention K/V memo, which decides on the host (torch.equal): the
    compiled model runs the network without entering it (what it serves is bit-identical to recomputing). Checked
    on the converted model's own call path, without paying for a compile: the eager int8 model re-classed as the
    compiled one must sample without touching the memo and give the eager model's images."""
    fake, scheduler, prompts = _guided_sd()
    assert to_backend(fake, "int8-compiled") is not None  # converted (compiles lazily), not refused
    eager = to_backend(fake, "int8")
    expected = _guided_images(eager, scheduler, prompts)

    def entered(model):
        raise AssertionError("the compiled model entered the K/V memo")

    monkeypatch.setattr(eager.adapter, "inference_cache", entered)
    eager.step_states, eager.__class__ = [], CompiledIntegerDenoiser
    assert torch.equal(_guided_images(eager, scheduler, prompts), expected)


@needs_compiled_w8
@pytest.mark.slow
def test_compiled_guided_text_to_image_sampling_agrees_with_fake_quant():
    """The tiny Stable Diffusion UNet under classifier-free guidance (both branches in one batch) end to end on
    int8-compiled: median PSNR ≥ 40 dB against fake-quant, as for the unconditional UNet. Slow: one compile."""
    torch._dynamo.reset()
    fake, scheduler, prompts = _guided_sd()
    compiled = to_backend(fake, "int8-compiled")
    assert _agree(_guided_images(compiled, scheduler, prompts), _guided_images(fake, scheduler, prompts))


@needs_compiled_w8
@pytest.mark.slow
@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_compiled_transformers_agree_with_fake_quant(family):
    """The tests' tiny DiT (class labels), PixArt (captions), SD3 and Flux (MMDiT, flow matching) under guidance,
    naive W8A8 with quantized attention operands, end to end on int8-compiled. Slow: one compile each."""
    import importlib

    from tadq import api
    from tadq.calibration import collect_calibration_set
    from tadq.registry import adapter_for

    tests = importlib.import_module("tests.adapters." + ("test_transformer2d" if family in ("dit", "pixart")
                                                         else "test_mmdit"))
    torch._dynamo.reset()
    model, scheduler, source = tests._setup(family)
    calibration = collect_calibration_set(model, adapter_for(model), scheduler, tests.CALIB, progress=False,
                                          conditions=source, guidance_scale=tests.GUIDANCE)
    fake = api.quantize(model, scheduler, tests._quant_config("W8A8", quantize_attention=True),
                        calibration=calibration, progress=False)
    compiled = to_backend(fake, "int8-compiled")
    assert _agree(tests._sample(compiled, scheduler, source), tests._sample(fake, scheduler, source))


@needs_compiled_w8
@pytest.mark.slow
def test_a_second_model_with_other_layer_widths_compiles_in_the_same_process():
    """W8A8's convs carry one more (ones) output channel than W8A8-WSYM's, so compiling the second model of one
    class recompiles the shared forward with other weight sizes at the same places. Dynamo's automatic dynamic
    shapes made those sizes symbols, which Inductor's C++ wrapper failed to declare (a compile error on the shipped
    t2i UNet); the prepacked weights are marked static. Slow: two compiles of the tiny text-conditioned UNet."""
    torch._dynamo.reset()
    for preset in ("W8A8", "W8A8-WSYM"):
        fake, scheduler, prompts = _guided_sd(preset)
        compiled = to_backend(fake, "int8-compiled")
        assert all(torch.is_tensor(m.packed) and m.packed._dynamo_static_indices == set(range(m.packed.dim()))
                   for m in compiled.model.modules() if hasattr(m, "packed"))
        assert _agree(_guided_images(compiled, scheduler, prompts), _guided_images(fake, scheduler, prompts))


def test_only_the_simulated_ops_shim_warning_is_silenced():
    """Inductor's C++ wrapper logs one "missing a c-shim" line per fake-quant op an integer model keeps simulated
    (15 on a W4A8 model with quantized attention operands); that line is dropped, any other op's is not."""
    import logging

    from tadq.backends import compiled

    compiled._quiet_fake_quant_shim_warnings()
    compiled._quiet_fake_quant_shim_warnings()  # idempotent
    logger = logging.getLogger("torch._inductor.ir")
    assert logger.filters.count(compiled._SHIM_FILTER) == 1

    def passes(op: str) -> bool:
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0,
                                   "%s is missing a c-shim implementation, using proxy executor as fallback", (op,),
                                   None)
        return all(f.filter(record) for f in logger.filters)

    assert not passes("aten._fake_quantize_per_tensor_affine_cachemask_tensor_qparams.default")
    # the per-row softmax quantizer (quantize_attention's default softmax_granularity) calls
    # torch.fake_quantize_per_channel_affine, whose op has no leading underscore: one line per attention and compile
    # leaked through (seen compiling a W8A8 UNet with quantized attention through tadq sample --backend int8-compiled)
    assert not passes("aten.fake_quantize_per_channel_affine_cachemask.default")
    assert passes("aten.some_other_op.default")
