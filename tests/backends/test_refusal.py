"""A backend that cannot run here is refused with the reason, never replaced by the float simulation."""

from __future__ import annotations

import pytest
import torch
from tests.backends.machine import needs_int8_cpu
from typer.testing import CliRunner

from tadq import api
from tadq.backends import (
    BACKENDS,
    BackendUnavailableError,
    capability,
    check_backend,
    check_placement,
    int8_cuda_missing,
    to_backend,
)
from tadq.config import CalibrationConfig, QuantConfig
from tadq.sampling import SamplerConfig


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_int8_cuda_is_refused_without_cuda():
    with pytest.raises(BackendUnavailableError, match="int8-cuda.*CUDA is not available.*not replaced"):
        check_backend("int8-cuda")
    assert int8_cuda_missing() is not None


def test_int8_cpu_is_refused_where_its_kernels_are_not_exact(monkeypatch):
    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: 0)
    with pytest.raises(BackendUnavailableError, match="int8'.*wrong sums even for weight codes within ±64"):
        check_backend("int8")


@needs_int8_cpu
def test_the_measured_weight_bound_is_a_real_limit():
    """The probe's bound holds for random codes through a real conv, and (where it is below the int8 range) one
    more is really wrong: the limit is the kernels', not a guess from CPU flags. VNNI/AMX sum into int32: no limit."""
    bound = capability.int8_cpu_weight_bound()
    assert bound in (capability.PAIR_SATURATION_BOUND, capability.FULL_INT8_RANGE)
    generator = torch.Generator().manual_seed(0)
    activations = torch.randint(0, 256, (2, 64, 6, 6), generator=generator, dtype=torch.uint8)
    activations[0] = 255  # the worst case, beside random codes
    weights = torch.randint(-bound, min(bound, 127) + 1, (16, 64, 3, 3), generator=generator, dtype=torch.int8)
    weights[:2] = bound if bound <= 127 else 127
    weights[2:4] = -bound
    assert torch.equal(_onednn_conv(activations, weights), _exact_conv(activations, weights))
    if bound < capability.FULL_INT8_RANGE:
        beyond = torch.full_like(weights, bound + 1)
        assert not torch.equal(_onednn_conv(activations, beyond), _exact_conv(activations, beyond))
    if capability._has_dot_product_instructions():
        assert bound == capability.FULL_INT8_RANGE


def _onednn_conv(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return capability.unit_scale_int8_conv(weights, 1)(activations).double()


def _exact_conv(activations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(activations.double(), weights.double(), padding=1)


@needs_int8_cpu
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_weights_beyond_the_bound_are_refused_naming_the_layer(monkeypatch, kind):
    """A CPU without VNNI/AMX (bound ±64): 8-bit weight codes are refused at conversion, naming the layer and why;
    4-bit weights (±15) convert and agree with fake-quant there as anywhere."""
    from tests.backends.test_layers import ACTIVATIONS, CPU, WEIGHTS, _check, _conv, _linear

    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)
    monkeypatch.setattr(capability, "_has_dot_product_instructions", lambda: False)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the CPU's own lack, not a user's cap
        monkeypatch.delenv(name, raising=False)
    build = (lambda w: _conv(w, ACTIVATIONS["a8"], {"kernel_size": 3, "padding": 1})) if kind == "conv" \
        else (lambda w: _linear(w, ACTIVATIONS["a8"]))
    layer, _ = build(WEIGHTS["w8-sym"])
    with pytest.raises(ValueError, match=r"^down\.proj: its int8 weight codes reach ±12[78].*no int8 dot-product "
                                         r"instructions.*saturated to 16 bits.*within ±64"):
        CPU[kind](layer, "down.proj")
    _check(kind, *build(WEIGHTS["w4-asym"]), CPU[kind])


@needs_int8_cpu
def test_cli_sample_refuses_8bit_weights_where_they_would_saturate_in_one_line(monkeypatch, tiny_unet, ddpm_scheduler,
                                                                               tmp_path):
    from tadq.cli.app import app

    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
    api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8-WSYM", calibration=calib),
                 progress=False).save_pretrained(tmp_path / "q", ddpm_scheduler)
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "q"), "--backend", "int8", "--num-samples", "2",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "within ±64" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.png").exists()


@needs_int8_cpu
def test_to_backend_refuses_8bit_weights_beyond_the_bound_before_copying(monkeypatch, tiny_unet, ddpm_scheduler):
    """Without VNNI/AMX a W8A8 model is refused by its config's grid before the model is deep-copied (a large model's
    copy would be wasted), with the same reason conversion gives."""
    from tadq.backends import registry

    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W8A8", calibration=calib),
                          progress=False)
    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)

    def no_copy(_):
        raise AssertionError("the model was copied before the weight grid was checked")

    monkeypatch.setattr(registry.copy, "deepcopy", no_copy)
    with pytest.raises(ValueError, match=r"^backend 'int8': the model's 8-bit weights have codes up to .*within ±64"):
        to_backend(qmodel, "int8")


def test_int8_cpu_is_refused_without_the_onednn_engine(monkeypatch):
    monkeypatch.setattr(capability, "quantized_engines", lambda: ["qnnpack"])
    with pytest.raises(BackendUnavailableError, match="no oneDNN quantized engine"):
        check_backend("int8")


def test_refusal_happens_before_any_conversion(monkeypatch, tiny_unet):
    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: 0)
    with pytest.raises(BackendUnavailableError):
        to_backend(object(), "int8")  # refused on the machine, not on the argument


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'int4'.*fake"):
        check_backend("int4")
    assert set(BACKENDS) == {"fake", "int8", "int8-compiled", "int8-cuda"}


@pytest.fixture
def tiny_artefact(tiny_unet, ddpm_scheduler, tmp_path):
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8", calibration=calib),
                          progress=False)  # 4-bit weights: every CPU the int8 backend runs on sums them exactly
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    return tmp_path / "q"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_sample_refuses_int8_cuda_in_one_line(tiny_artefact, tmp_path):
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8-cuda", "--num-samples", "2",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "CUDA is not available" in result.output
    assert not (tmp_path / "s.png").exists()


@needs_int8_cpu
def test_cli_sample_runs_int8(tiny_artefact, tmp_path):
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8", "--num-samples", "2",
                                      "--steps", "4", "--out", str(tmp_path / "s.png"), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s.png").is_file()


@pytest.mark.parametrize("backend, device, dtype, message", [
    ("int8", "cuda", torch.float32, "int8' runs on cpu devices only, not on cuda; choose device 'cpu' or backend "
                                    "'int8-cuda'"),
    ("int8-compiled", "cuda", torch.float32, "runs on cpu devices only"),
    ("int8-cuda", "cpu", torch.float32, "cuda devices only, not on cpu; choose device 'cuda' or backend 'int8'"),
    ("int8", "cpu", torch.bfloat16, "computes in float32.*use float32, or backend 'fake'"),
    ("int8-cuda", "cuda", torch.float16, "computes in float32"),
    ("nonsense", "cpu", torch.float32, "unknown backend"),
])
def test_a_backend_is_refused_on_a_device_or_dtype_its_kernels_do_not_run(backend, device, dtype, message):
    """Machine-independent (a device object needs no device): the placement rules alone."""
    with pytest.raises(ValueError, match=message):
        check_placement(backend, torch.device(device), dtype)


def test_the_simulation_runs_anywhere_in_any_dtype():
    for device in ("cpu", "cuda", "mps"):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            check_placement("fake", torch.device(device), dtype)


@needs_int8_cpu
def test_cli_sample_refuses_a_bf16_integer_run_in_one_line(tiny_artefact, tmp_path):
    """It crashed inside deepcopy ("Cannot access storage of OpaqueTensorImpl") after loading; now refused first."""
    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["sample", str(tiny_artefact), "--backend", "int8", "--dtype", "bfloat16",
                                      "--num-samples", "2", "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2 and "computes in float32" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "s.png").exists()


@needs_int8_cpu
def test_sampling_an_integer_model_in_bf16_is_refused(tiny_artefact):
    from tadq.io import load_quantized

    model, scheduler = load_quantized(tiny_artefact, backend="int8")
    with pytest.raises(ValueError, match="computes in float32"):
        api.sample(model, scheduler, SamplerConfig(kind="ddim", num_steps=2), num_samples=2, seed=0,
                   dtype="bfloat16", progress=False)


@needs_int8_cpu
def test_casting_an_integer_model_is_refused_before_anything_changes(tiny_artefact):
    """``.half()``/``.to(bfloat16)`` on a converted model would cast its kernels' float32 scales and fail later inside
    oneDNN; refused up front, and the model is left as it was."""
    from tadq.io import load_quantized

    model, _ = load_quantized(tiny_artefact, backend="int8")
    for cast in (model.half, lambda: model.to(torch.bfloat16)):
        with pytest.raises(ValueError, match="computes in float32"):
            cast()
    assert all(t.dtype != torch.float16 and t.dtype != torch.bfloat16 for t in (*model.parameters(), *model.buffers()))
    model.float()  # a no-op cast is allowed


@needs_int8_cpu
def test_the_weight_grid_is_checked_before_loading(monkeypatch):
    """Where the kernels are exact within ±64 only, an 8-bit weight grid is refused from the artefact's config,
    before any model is built; 4-bit grids, the simulation and the CUDA kernels (exact int32 GEMMs) pass."""
    from tadq.backends import check_weight_grid
    from tadq.quant import QScheme

    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)
    for bits, symmetric, peak in ((8, False, 128), (8, True, 128), (7, False, 127)):
        with pytest.raises(ValueError, match=rf"'int8-compiled'.*{bits}-bit weights have codes up to ±{peak}"):
            check_weight_grid("int8-compiled", QScheme(bits=bits, symmetric=symmetric))
    for bits, symmetric in ((4, False), (6, False), (7, True)):
        check_weight_grid("int8", QScheme(bits=bits, symmetric=symmetric))
    check_weight_grid("fake", QScheme(bits=8))
    check_weight_grid("int8-cuda", QScheme(bits=8))


@pytest.mark.parametrize(("cap", "dot_products"), [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", None),
                                                   ("ALL", None)])
def test_a_onednn_isa_cap_below_vnni_is_named_as_the_reason(monkeypatch, cap, dot_products):
    """``ONEDNN_MAX_CPU_ISA`` below VNNI makes a VNNI/AMX CPU's int8 kernels saturate: the refusal names the cap, not
    the CPU (found by running the suite with the cap, to stand in for an AVX2 machine). Stood in for by a CPU with
    the instructions, so the test means the same on every machine."""
    monkeypatch.setattr(capability, "_cpu_has_dot_products", lambda: True)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    if dot_products is False:
        assert capability.onednn_isa_cap() == cap.upper() and not capability._has_dot_product_instructions()
        assert f"oneDNN is capped at {cap.upper()} (ONEDNN_MAX_CPU_ISA)" in capability.weight_bound_reason(64)
    else:  # a cap with VNNI, or none: the CPU's flags decide, as without the variable
        assert capability._has_dot_product_instructions()
        assert "capped" not in capability.weight_bound_reason(64)


def test_a_cap_on_a_cpu_without_dot_products_is_not_blamed(monkeypatch):
    """On a CPU without VNNI/AMX (this AVX2 EPYC) lifting ``ONEDNN_MAX_CPU_ISA=AVX2`` would not help: the refusal
    named the cap as the reason; it names the CPU, as without the variable."""
    monkeypatch.setattr(capability, "_cpu_has_dot_products", lambda: False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    reason = capability.weight_bound_reason(capability.PAIR_SATURATION_BOUND)
    assert "capped" not in reason and reason.startswith("this CPU has no int8 dot-product instructions")


@pytest.mark.parametrize(("onednn", "dnnl", "cap"), [("ALL", "AVX2", None), ("", "AVX2", "AVX2"),
                                                     ("avx512_core", "ALL", "AVX512_CORE"), (None, "sse41", "SSE41")])
def test_the_isa_cap_is_read_as_onednn_reads_it(monkeypatch, onednn, dnnl, cap):
    """oneDNN takes the first of ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA that is set (not empty), any case:
    ``ONEDNN_MAX_CPU_ISA=ALL`` lifts a ``DNNL_MAX_CPU_ISA`` cap, which the report used to name as the cap."""
    for name, value in (("ONEDNN_MAX_CPU_ISA", onednn), ("DNNL_MAX_CPU_ISA", dnnl)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert capability.onednn_isa_cap() == cap


def test_int8_kernels_that_raise_are_a_refusal_not_a_crash(monkeypatch):
    """A torch build listing oneDNN's int8 engine on a CPU whose kernels are not implemented (another architecture):
    the probe's error becomes the backend's refusal, and capability checks (the tests' skip markers, the speed
    benchmark's capability line) still return instead of raising."""
    def failing(*args, **kwargs):
        raise RuntimeError("qconv2d_pointwise: not implemented for this CPU\nsecond line")

    monkeypatch.setattr(capability, "unit_scale_int8_conv", failing)
    capability._kernel_failure.cache_clear()
    capability.int8_cpu_weight_bound.cache_clear()
    try:
        if not capability.has_onednn():
            pytest.skip("this torch build has no oneDNN quantized engine: the probe never runs")
        assert capability.int8_cpu_weight_bound() == 0
        assert capability.cpu_summary()["int8_exact_weight_codes"] == "none"
        with pytest.raises(BackendUnavailableError, match=r"int8'.*do not run \(RuntimeError: qconv2d_pointwise: "
                                                          r"not implemented for this CPU; CPU capability"):
            check_backend("int8")
    finally:
        capability._kernel_failure.cache_clear()
        capability.int8_cpu_weight_bound.cache_clear()


@needs_int8_cpu
@pytest.mark.parametrize(("cast", "message"), [
    (lambda model: model.to(torch.bfloat16), r"torch\.bfloat16 on cpu: backend 'int8' computes in float32"),
    (lambda model: model.double(), r"torch\.float64 on cpu: backend 'int8' computes in float32"),
    (lambda model: model.to("meta"), r"torch\.float32 on meta: backend 'int8' runs on cpu devices only"),
])
def test_to_backend_refuses_a_model_cast_or_moved_where_its_kernels_do_not_run(tiny_artefact, cast, message):
    """``tadq.load(..., dtype=torch.bfloat16)`` then ``to_backend``: the conversion went through on bf16 weight grids
    and the first forward raised a TypeError deep in the network (float64: "values off its grid"); it is refused
    before anything is copied, as ``check_placement`` refuses it before loading."""
    fake = cast(api.load(tiny_artefact)[0])
    with pytest.raises(ValueError, match=rf"^to_backend: the model's parameters are {message}"):
        to_backend(fake, "int8")


@needs_int8_cpu
def test_a_mixed_precision_layer_beyond_the_bound_is_refused_before_loading(monkeypatch, tiny_unet, ddpm_scheduler,
                                                                            tmp_path):
    """A W4A8 artefact with one layer raised to 8 bits (``layer_bits``, as mixed precision chooses them) passed the
    pre-load check of the model's 4-bit grid and was only refused once the whole model was built and converted; the
    layer is now named from the config, before anything is built. Weights off have no codes to bound."""
    from tadq.backends import check_weight_grid
    from tadq.io import load as load_module
    from tadq.quant import QScheme

    monkeypatch.setattr(capability, "int8_cpu_weight_bound", lambda: capability.PAIR_SATURATION_BOUND)
    sampler = SamplerConfig(kind="ddim", num_steps=4)
    calib = CalibrationConfig(sampler=sampler, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)
    config = QuantConfig.from_preset("W4A8", calibration=calib, layer_bits=(("conv_in", 8, 8),))
    api.quantize(tiny_unet, ddpm_scheduler, config, progress=False).save_pretrained(tmp_path / "q", ddpm_scheduler)

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(load_module, "_build_fp_model", built)
    with pytest.raises(ValueError, match=r"'int8': layer conv_in's 8-bit weights have codes up to ±128.*within ±64"):
        api.load(tmp_path / "q", backend="int8")
    check_weight_grid("int8", QScheme.off())


def test_load_pipeline_places_int8_cuda_on_its_gpu_when_no_device_is_given(monkeypatch, tmp_path):
    """``tadq.load(ART, backend="int8-cuda")`` defaults to the kernels' device; ``tadq.load_pipeline`` checked the
    placement against the CPU instead and refused it ("runs on cuda devices only, not on cpu") on a CUDA machine.
    Stood in for on any machine: int8-cuda made available and 'cuda' resolvable, on a folder that then fails later,
    for not being an artefact (the placement passed)."""
    import dataclasses

    import tadq
    from tadq import device as device_module

    monkeypatch.setitem(BACKENDS, "int8-cuda", dataclasses.replace(BACKENDS["int8-cuda"], missing=lambda: None))
    monkeypatch.setattr(device_module, "resolve_device", lambda name: torch.device(name))
    with pytest.raises(ValueError, match="'int8-cuda': .* is an FP pipeline folder, not a tadq artefact"):
        tadq.load_pipeline(tmp_path, backend="int8-cuda")


def test_fp8_activations_are_refused_by_every_integer_backend_before_any_copy(tiny_unet, ddpm_scheduler,
                                                                              monkeypatch):
    """fp8 activations have no int8 kernel: refused naming the format and the fake backend, before the model is
    copied or converted (whether or not this machine has the backend), and layer by layer by the factories."""
    from tadq.backends.activations import check_activation_quantizer
    from tadq.quant import Quantizer

    calibration = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=2,
                                    num_steps_kept=1, samples_per_step=2, batch_size=2)
    config = QuantConfig.from_preset("W8A8-FP8", calibration=calibration)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, config, progress=False)
    monkeypatch.setattr("copy.deepcopy", lambda *args, **kwargs: pytest.fail("copied before refusing"))
    for name in (name for name, backend in BACKENDS.items() if backend.factory is not None):
        with pytest.raises(ValueError, match=f"backend '{name}'.*fp8_e4m3.*backend='fake'"):
            to_backend(qmodel, name)
    quantizer = next(m for m in qmodel.modules() if isinstance(m, Quantizer) and m.kind == "activation" and m.enabled)
    with pytest.raises(ValueError, match="conv: its input is quantized to fp8_e4m3.*'fake' backend"):
        check_activation_quantizer(quantizer, "conv")
    assert to_backend(qmodel, "fake") is qmodel


def test_block_wise_weights_are_refused_by_every_integer_backend_before_any_copy(tiny_unet, ddpm_scheduler,
                                                                                 monkeypatch, tmp_path):
    """Weights with one step per block of a row (``-G<n>`` presets) need a group-wise kernel: refused naming the
    block size and the fake backend, before the model is copied or an artefact's model is built, and layer by layer
    when a layer is converted."""
    from tadq.backends.weights import weight_codes
    from tadq.io import load_quantized
    from tadq.quant import QuantLayer

    calibration = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=2,
                                    num_steps_kept=1, samples_per_step=2, batch_size=2)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, QuantConfig.from_preset("W4A8-G16", calibration=calibration),
                          progress=False)
    qmodel.save_pretrained(tmp_path / "art", ddpm_scheduler)
    layer_name, layer = next((n, m) for n, m in qmodel.named_modules() if isinstance(m, QuantLayer))
    monkeypatch.setattr("copy.deepcopy", lambda *args, **kwargs: pytest.fail("copied before refusing"))
    for name in (name for name, backend in BACKENDS.items() if backend.factory is not None):
        with pytest.raises(ValueError, match=f"backend '{name}'.*block of 16 weights.*backend='fake'"):
            to_backend(qmodel, name)
    with pytest.raises(ValueError, match="block of 16 weights.*backend='fake'"):
        load_quantized(tmp_path / "art", backend="int8")
    with pytest.raises(ValueError, match=f"{layer_name}: its weight has one step per block of 16 weights"):
        weight_codes(layer.weight_quantizer, layer.weight, layer_name)
    assert to_backend(qmodel, "fake") is qmodel


def _transformed_recipe(kind: str, calibration: CalibrationConfig):
    """A recipe whose every quantized layer the integer kernels cannot run: SVDQuant's smoothing and low-rank branch
    (transformed layers), or activations quantized per token at run time."""
    import tadq
    from tadq.quant import QScheme
    from tadq.svdquant import SVDQuantMethod

    deployments = (tadq.Deployment(calibration.sampler),)
    if kind == "svdquant":
        return tadq.Recipe(method=SVDQuantMethod(alpha_grid=(0.5,), search_samples=4),
                           weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=2),
                           activations=QScheme(bits=8, granularity="per_tensor", smoothing=True),
                           calibration=calibration, deployments=deployments)
    return tadq.Recipe(weights=QScheme(bits=4, granularity="per_channel"),
                       activations=QScheme(bits=8, granularity="per_token"), calibration=calibration,
                       deployments=deployments)


@needs_int8_cpu
@pytest.mark.parametrize("kind, message", [
    ("svdquant", "this model's quantized layers have smoothing and a rank-2 low-rank branch"),
    ("per-token", "this model's activations are quantized per_token at run time"),
])
def test_transformed_layers_and_dynamic_activations_are_refused_before_any_copy_or_load(
        tiny_unet, ddpm_scheduler, monkeypatch, tmp_path, kind, message):
    """SVDQuant's transformed layers and per-token activations have no integer kernel; they were refused only layer
    by layer while converting, i.e. after ``to_backend`` had deep-copied the model and after ``load_quantized`` /
    ``tadq sample --backend int8`` had built and read the whole artefact. Now from the config, as fp8 activations
    and block-wise weights are, by every integer backend, and through the CLI in one line."""
    from tadq.cli.app import app
    from tadq.io import load as load_module
    from tadq.io import load_quantized

    calibration = CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=2), num_trajectories=2,
                                    num_steps_kept=1, samples_per_step=2, batch_size=2)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, _transformed_recipe(kind, calibration), progress=False)
    qmodel.save_pretrained(tmp_path / "art", ddpm_scheduler)

    def built(*args, **kwargs):
        raise AssertionError("the artefact's model was built before the refusal")

    monkeypatch.setattr("copy.deepcopy", lambda *args, **kwargs: pytest.fail("copied before refusing"))
    monkeypatch.setattr(load_module, "_build_fp_model", built)
    for name in (name for name, backend in BACKENDS.items() if backend.factory is not None):
        with pytest.raises(ValueError, match=f"backend '{name}'.*{message}.*backend='fake'"):
            to_backend(qmodel, name)
    with pytest.raises(ValueError, match=f"backend 'int8'.*{message}"):
        load_quantized(tmp_path / "art", backend="int8")
    result = CliRunner().invoke(app, ["sample", str(tmp_path / "art"), "--backend", "int8", "--num-samples", "2",
                                      "--out", str(tmp_path / "s.png"), "--threads", "1"])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "s.png").exists()
    assert to_backend(qmodel, "fake") is qmodel
