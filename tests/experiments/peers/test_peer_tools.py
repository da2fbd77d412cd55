"""Each peer tool on the tiny UNet: a quantized copy close to FP, the FP model untouched, coverage counted right.

Skipped for a tool that is not installed (the optional extra: ``pip install -e .[peers]``).
"""

from __future__ import annotations

import importlib.metadata
from types import SimpleNamespace

import pytest
import torch

from tadq.experiments.peers import peer_report
from tadq.experiments.peers.base import layer_counts
from tadq.experiments.rows import row_for
from tadq.experiments.run import RunConfig


def _relative_error(model, reference, x, t) -> float:
    with torch.no_grad():
        out, ref = model(x, t).sample, reference(x, t).sample
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def probe():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 1000, (16,), generator=generator)


def _check(quantize, tiny_unet, probe, bound: float):
    """Quantize, then: FP model unchanged, output different from FP but within ``bound``; returns the report."""
    before = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    kinds = [type(m) for m in tiny_unet.modules()]
    with torch.no_grad():
        fp_out = tiny_unet(*probe).sample
    qmodel = quantize()
    assert qmodel is not tiny_unet
    error = _relative_error(qmodel, tiny_unet, *probe)
    assert 0 < error < bound
    assert [type(m) for m in tiny_unet.modules()] == kinds
    assert all(torch.equal(v, tiny_unet.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(tiny_unet(*probe).sample, fp_out)
    return peer_report(qmodel)


def test_quanto_w8a8_quantizes_every_weight_but_only_linear_inputs(tiny_unet, tiny_calibration, probe):
    """quanto 0.2.7's QConv2d does not quantize its input (only QLinear does), and streamline drops the output
    quantizations an add/SiLU/norm consumes: on a UNet every conv keeps floating-point inputs. The report must
    count what a forward does, not the activation setting every layer carries."""
    pytest.importorskip("optimum.quanto")
    from tadq.experiments.peers import quantize_quanto

    report = _check(lambda: quantize_quanto(tiny_unet, tiny_calibration, "W8A8", 32), tiny_unet, probe, 0.2)
    convs, linears = layer_counts(tiny_unet)
    assert (report.weights, report.total) == (convs + linears,) * 2
    assert report.activations == linears
    assert f"{convs} layers ({convs} Conv2d) take floating-point inputs" in report.notes
    assert f"inputs quantized in {linears}" in report.summary
    assert report.scope == "all Conv2d + Linear"
    assert report.version == importlib.metadata.version("optimum-quanto")


def test_quanto_weight_only_needs_no_calibration(tiny_unet, probe):
    pytest.importorskip("optimum.quanto")
    from tadq.experiments.peers import quantize_quanto

    report = _check(lambda: quantize_quanto(tiny_unet, None, "W8A16"), tiny_unet, probe, 0.2)
    assert report.activations == 0 and report.weights == sum(layer_counts(tiny_unet))


@pytest.mark.parametrize("config", ["INT8_DEFAULT_CFG", "INT8_SMOOTHQUANT_CFG"])
def test_modelopt_int8(config, tiny_unet, tiny_calibration, probe):
    pytest.importorskip("modelopt.torch.quantization")
    from tadq.experiments.peers import quantize_modelopt

    report = _check(lambda: quantize_modelopt(tiny_unet, tiny_calibration, config, 32, preset="W8A8"), tiny_unet,
                    probe, 0.2)
    convs, linears = layer_counts(tiny_unet)
    assert (report.weights, report.activations, report.convs, report.linears) == (convs + linears,) * 2 + (
        convs, linears)
    assert config in report.setting
    if config == "INT8_SMOOTHQUANT_CFG":
        assert f"{linears} layers with a smoothing" in report.notes  # ModelOpt smooths the Linear layers only


def test_modelopt_w4a8_awq_runs_on_cpu(tiny_unet, tiny_calibration, probe):
    pytest.importorskip("modelopt.torch.quantization")
    from tadq.experiments.peers import quantize_modelopt

    report = _check(lambda: quantize_modelopt(tiny_unet, tiny_calibration, "W4A8_AWQ_BETA_CFG", 32, preset="W4A8"),
                    tiny_unet, probe, 0.5)
    assert report.weights == sum(layer_counts(tiny_unet)) and "FP8" in report.setting


def test_modelopt_preset_retargets_bit_widths():
    pytest.importorskip("modelopt.torch.quantization")
    from tadq.experiments.peers.modelopt import modelopt_config

    def entry(cfg, name):
        return next(e for e in cfg["quant_cfg"] if e.get("quantizer_name") == name)

    cfg, described = modelopt_config("INT8_DEFAULT_CFG", "W4A8")
    assert entry(cfg, "*weight_quantizer")["cfg"]["num_bits"] == 4
    assert entry(cfg, "*input_quantizer")["cfg"]["num_bits"] == 8 and "int4 weights" in described
    cfg, _ = modelopt_config("INT8_DEFAULT_CFG", "W8A16")
    assert entry(cfg, "*input_quantizer")["enable"] is False
    import modelopt.torch.quantization as mtq

    assert entry(mtq.INT8_DEFAULT_CFG, "*weight_quantizer")["cfg"]["num_bits"] == 8  # the shipped recipe untouched


@pytest.mark.parametrize("preset", ["W8A8", "W4A8"])
def test_torchao_touches_linear_only(preset, tiny_unet, tiny_calibration, probe):
    pytest.importorskip("torchao.quantization")
    from tadq.experiments.peers import quantize_torchao

    report = _check(lambda: quantize_torchao(tiny_unet, tiny_calibration, preset), tiny_unet, probe, 0.2)
    convs, linears = layer_counts(tiny_unet)
    assert (report.weights, report.convs, report.linears, report.total) == (linears, 0, linears, convs + linears)
    assert report.scope == "Linear only" and f"{convs} Conv2d left in FP" in report.notes


def test_peer_row_builds_and_describes(tiny_unet, tiny_calibration):
    pytest.importorskip("torchao.quantization")
    bases = SimpleNamespace(model=tiny_unet, calibration=tiny_calibration)
    variant = row_for("torchao-int8-dynamic", bases, RunConfig(), "W8A8")
    assert variant.bits == "W8A8" and "Linear only" in variant.name
    assert variant.settings["version"] == importlib.metadata.version("torchao")
    peer = variant.describe(variant.build())["peer"]
    assert peer["scope"] == "Linear only" and peer["weights"] == layer_counts(tiny_unet)[1]


def _kept(tiny_unet, roles=("input_conv", "output_conv")) -> tuple[str, ...]:
    from tadq.experiments.peers.base import kept_fp_layers

    names = kept_fp_layers(tiny_unet, roles)
    assert names  # the tiny UNet has both roles
    return names


@pytest.mark.parametrize("tool", ["quanto", "modelopt"])
def test_peers_keep_tadqs_fp_layers_in_float(tool, tiny_unet, tiny_calibration, probe):
    if tool == "quanto":
        pytest.importorskip("optimum.quanto")
        from tadq.experiments.peers import quantize_quanto as quantize
        args = (tiny_unet, tiny_calibration, "W8A8", 32)
    else:
        pytest.importorskip("modelopt.torch.quantization")
        from tadq.experiments.peers import quantize_modelopt as quantize
        args = (tiny_unet, tiny_calibration, "INT8_DEFAULT_CFG", 32)
    kept = _kept(tiny_unet)
    report = _check(lambda: quantize(*args, keep_fp=kept), tiny_unet, probe, 0.2)
    total = sum(layer_counts(tiny_unet))
    assert report.weights == total - len(kept)
    if tool == "modelopt":  # quanto quantizes Linear inputs only (test above)
        assert report.activations == total - len(kept)
    assert "kept in FP" in report.notes + report.setting
    with pytest.raises(ValueError, match="not Conv2d/Linear"):
        quantize(*args, keep_fp=("conv_inn",))


def test_torchao_keeps_a_named_linear_in_float(tiny_unet, tiny_calibration, probe):
    pytest.importorskip("torchao.quantization")
    from tadq.experiments.peers import quantize_torchao

    kept = _kept(tiny_unet, ("time_embedding",))
    report = _check(lambda: quantize_torchao(tiny_unet, tiny_calibration, "W8A8", keep_fp=kept), tiny_unet, probe,
                    0.2)
    assert report.linears == layer_counts(tiny_unet)[1] - len(kept)


def test_peer_rows_keep_the_runs_fp_layers(tiny_unet, tiny_calibration):
    pytest.importorskip("optimum.quanto")
    bases = SimpleNamespace(model=tiny_unet, calibration=tiny_calibration)
    variant = row_for("quanto", bases, RunConfig(fp_layers="first_last"), "W8A8")
    assert variant.settings["keep_fp"] == list(_kept(tiny_unet))
    peer = variant.describe(variant.build())["peer"]
    assert peer["weights"] == sum(layer_counts(tiny_unet)) - 2
    # unchanged without kept layers
    assert "keep_fp" not in row_for("quanto", bases, RunConfig(fp_layers="none"), "W8A8").settings
