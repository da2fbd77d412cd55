"""Activation granularities, smoothing, Hadamard rotation, the low-rank branch and SVDQuant's save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.dtype_probe import DtypeRecorder
from torch import nn

import tadq
from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.config import CalibrationConfig, QuantConfig
from tadq.quant import QScheme
from tadq.quant.granularity import dynamic_fake_quantize, kernel_status
from tadq.quant.lowrank import effective_rank, lowrank_split
from tadq.quant.quantizer import Quantizer, quantizers_bypassed
from tadq.quant.ranges import minmax_range
from tadq.quant.rotation import fold_rotation, hadamard_block_size, hadamard_matrix, rotate_channels
from tadq.quant.smoothing import channel_absmax, smooth_input, smooth_weight, smoothing_factors, weight_input_absmax
from tadq.quant.transformed import TransformedQuantConv2d, TransformedQuantLinear, quantize_layer
from tadq.recipe import Deployment, Recipe
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod

EPS = torch.finfo(torch.float32).eps
SAMPLER = SamplerConfig(kind="ddim", num_steps=4)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=8, num_steps_kept=2, samples_per_step=4, batch_size=8)


def _fp_bound(weight: torch.Tensor, x: torch.Tensor, conv: bool, length: int) -> torch.Tensor:
    """Rounding-error bound of y = W·x in float32: γ_n·(|W|·|x|) with γ_n ≈ n·eps for an n-term accumulation
    (Higham §3.1), n = every term chained into one output (transform products plus both dot products)."""
    if conv:
        magnitude = F.conv2d(x.abs(), weight.abs(), None, 1, 1)
    else:
        magnitude = F.linear(x.abs(), weight.abs())
    return length * EPS * magnitude + 1e-30


def _outlier_input(shape: tuple[int, ...], channel_dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    scale = torch.ones(shape[channel_dim])
    scale[[1, 5]] = 40.0  # two outlier channels, as in the activations SmoothQuant/SVDQuant target
    view = [1] * len(shape)
    view[channel_dim] = -1
    return x * scale.reshape(view)


# -- granularity -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,channel_dim", [((8, 16, 32), -1), ((4, 32, 6, 6), 1)])
def test_per_group_error_is_at_most_per_tensor_on_outlier_channels(shape, channel_dim):
    x = _outlier_input(shape, channel_dim)
    tensor_scheme = QScheme(bits=4, range_method="minmax")
    per_tensor = Quantizer(tensor_scheme)
    per_tensor.set_range(*minmax_range(x))
    errors = {"per_tensor": float((per_tensor(x) - x).pow(2).mean())}
    for granularity in ("per_token", "per_group"):
        scheme = QScheme(bits=4, granularity=granularity, group_size=8)
        errors[granularity] = float((dynamic_fake_quantize(x, scheme, channel_dim) - x).pow(2).mean())
    assert errors["per_group"] <= errors["per_token"] <= errors["per_tensor"]
    assert errors["per_group"] < 0.5 * errors["per_tensor"]  # the outliers stay inside their own two groups


def test_dynamic_groups_have_their_own_grid_and_a_short_last_group():
    scheme = QScheme(bits=4, granularity="per_group", group_size=4)
    x = torch.arange(10.0).reshape(1, 10) * torch.tensor([1.0] * 4 + [100.0] * 4 + [1.0] * 2)
    quantized = dynamic_fake_quantize(x, scheme, -1)
    assert torch.equal(quantized[0, :4], x[0, :4])  # 0..3 lies on the 4-bit grid of its own group [0, 3]
    assert torch.allclose(quantized[0, 8:], x[0, 8:], atol=9 / 15 / 2 + 1e-6)  # last group: {8, 9} with step 9/15
    quantizer = Quantizer(scheme, channel_dim=-1)
    assert bool(quantizer.initialized)
    quantizer.set_range(torch.zeros(1), torch.ones(1))  # a no-op: nothing to calibrate
    assert torch.equal(quantizer(x), quantized)


def test_kernel_status_is_precise_about_convolutions():
    per_token = QScheme(bits=4, granularity="per_token")
    assert kernel_status(per_token, linear=True).runnable == "int-gemm"
    assert kernel_status(per_token, kernel_size=(1, 1)).runnable == "int-gemm"
    assert kernel_status(per_token, kernel_size=(3, 3)).runnable == "group-wise"
    grouped = QScheme(bits=4, granularity="per_group", group_size=64)
    assert kernel_status(grouped, kernel_size=(3, 3), in_channels=128).runnable == "group-wise"
    assert kernel_status(grouped, kernel_size=(3, 3), in_channels=96).runnable == "simulation"
    assert kernel_status(QScheme(bits=8), kernel_size=(3, 3)).in_tadq


def test_schemes_put_each_field_where_it_belongs():
    with pytest.raises(ValueError, match="activation granularity"):
        Quantizer(QScheme(bits=4, granularity="per_token"), kind="weight")
    with pytest.raises(ValueError, match="weight scheme"):
        QuantConfig(activations=QScheme(bits=4, lowrank_rank=4), method="svdquant")
    with pytest.raises(ValueError, match="svdquant"):
        QuantConfig(weights=QScheme(bits=4, granularity="per_channel", lowrank_rank=4))
    with pytest.raises(ValueError, match="group_size"):
        QScheme(granularity="per_group", group_size=0)
    assert QScheme(bits=4).describe() == "int4-asym-per_tensor-mse"  # defaults describe as before
    assert QScheme(bits=4, granularity="per_group", group_size=16, rotation="hadamard").describe() == \
        "int4-asym-per_group16-dynamic+hadamard"


# -- smoothing, rotation, low-rank branch ------------------------------------------------------------------------
@pytest.mark.parametrize("conv", [False, True])
def test_smoothing_leaves_the_fp_output_unchanged(conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 8, 3, padding=1) if conv else nn.Linear(16, 8)
    x = _outlier_input((4, 16, 5, 5) if conv else (4, 7, 16), 1 if conv else -1)
    channel_dim = 1 if conv else -1
    factors = smoothing_factors(channel_absmax(x, channel_dim), weight_input_absmax(layer.weight), alpha=0.5)
    assert factors.max() / factors.min() > 5  # the outlier channels really are rescaled
    smoothed = smooth_weight(layer.weight, factors)
    op = (lambda v, w: F.conv2d(v, w, None, 1, 1)) if conv else F.linear
    reference, result = op(x, layer.weight), op(smooth_input(x, factors, channel_dim), smoothed)
    length = 16 * 9 + 2 if conv else 16 + 2  # the dot product plus the division and multiplication by s
    assert ((result - reference).abs() <= _fp_bound(layer.weight, x, conv, length)).all()


def test_hadamard_is_orthogonal_and_its_own_inverse():
    matrix = hadamard_matrix(16)
    assert torch.allclose(matrix @ matrix.T, torch.eye(16), atol=16 * EPS)
    assert hadamard_block_size(96) == 32 and hadamard_block_size(7) == 1
    x = torch.randn(3, 96)
    assert torch.allclose(rotate_channels(rotate_channels(x, -1), -1), x, atol=1e-5)
    spread = rotate_channels(_outlier_input((64, 32), -1), -1)
    assert channel_absmax(spread, -1).max() < 0.5 * channel_absmax(_outlier_input((64, 32), -1), -1).max()


@pytest.mark.parametrize("conv", [False, True])
def test_folded_rotation_leaves_the_fp_output_unchanged(conv):
    torch.manual_seed(0)
    module = nn.Conv2d(32, 8, 3, padding=1) if conv else nn.Linear(32, 8)
    x = _outlier_input((2, 32, 5, 5) if conv else (2, 3, 32), 1 if conv else -1)
    scheme = QScheme(bits=4, rotation="hadamard")
    layer = quantize_layer(module, QScheme(bits=4, granularity="per_channel"), scheme)
    assert isinstance(layer, TransformedQuantConv2d if conv else TransformedQuantLinear)
    assert not torch.equal(layer.weight, module.weight)  # folded: W·Hᵀ
    assert torch.allclose(fold_rotation(layer.weight), module.weight, atol=1e-5)  # H·H = I: unfolds back
    with quantizers_bypassed(layer):
        result = layer(x)
    reference = module(x)
    length = 2 * (32 * 9 if conv else 32) + 2 * 5  # both rotations (5 = log2 32 butterfly levels) and the product
    bound = _fp_bound(module.weight, x, conv, length) + length * EPS * module.bias.abs().reshape(
        (-1, 1, 1) if conv else (-1,))
    assert ((result - reference).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(24, 40), (16, 8, 3, 3)])
def test_lowrank_branch_plus_residual_equals_the_weight(shape):
    torch.manual_seed(0)
    weight = torch.randn(*shape)
    rank = effective_rank(shape[0], int(weight[0].numel()), 6)
    up, down, residual = lowrank_split(weight, rank, seed=3)
    assert up.shape == (shape[0], rank) and down.shape == (rank, *shape[1:])
    rebuilt = (up @ down.reshape(rank, -1)).reshape(shape) + residual
    length = rank + 2  # r-term product, one subtraction, one addition
    bound = length * EPS * ((up.abs() @ down.reshape(rank, -1).abs()).reshape(shape) + weight.abs())
    assert ((rebuilt - weight).abs() <= bound).all()
    # the branch takes the largest singular directions: the residual's spectral norm is what the SVD left
    singular = torch.linalg.svdvals(weight.reshape(shape[0], -1).double())
    assert torch.linalg.matrix_norm(residual.reshape(shape[0], -1).double(), 2) <= singular[rank] * 1.05
    again = lowrank_split(weight, rank, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((up, down, residual), again, strict=True))



def test_lowrank_split_on_a_device_without_float64_runs_in_float32(monkeypatch):
    """On MPS (no float64) the SVD's float64 copy of the weight raised; it follows ``wide_dtype`` (float32 there).
    Switched to float32: no float64 tensor, and a weight of clear rank r splits into a branch within float32
    rounding of the float64 one (reduction length × ε of the weight's scale, the power iterations' products)."""
    torch.manual_seed(3)
    weight = torch.randn(24, 4) @ torch.randn(4, 40) + 1e-3 * torch.randn(24, 40)
    up, down, _ = lowrank_split(weight, 4, seed=1)
    monkeypatch.setattr("tadq.quant.lowrank.wide_dtype", lambda device: torch.float32)
    with DtypeRecorder() as recorder:
        up32, down32, _ = lowrank_split(weight, 4, seed=1)
    # only the sketch is drawn in float64, by its CPU generator (on the host on every device), then cast
    assert recorder.float64_ops() <= {"aten.randn.generator"}
    tolerance = weight.shape[1] * torch.finfo(torch.float32).eps * float(weight.abs().max())
    assert torch.allclose(up32 @ down32, up @ down, rtol=0.0, atol=tolerance)


def test_lowrank_split_leaves_every_global_rng_alone(monkeypatch):
    """The sketch comes from a local generator: torch.manual_seed (which reseeds every CUDA device's generator,
    beyond what fork_rng(devices=[]) restores) is never called, and the caller's CPU stream is where it was."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("lowrank_split seeded a global torch RNG")

    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    before = torch.get_rng_state()
    for name in ("manual_seed", "seed"):
        monkeypatch.setattr(torch, name, refuse)
        monkeypatch.setattr(torch.random, name, refuse)
    for name in ("manual_seed", "manual_seed_all", "seed", "seed_all"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    first = lowrank_split(weight, 3, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(first, lowrank_split(weight, 3, seed=3), strict=True))


def test_lowrank_split_draws_its_sketch_on_the_cpu_whatever_the_weights_device(monkeypatch):
    """The test matrix came from a generator on the weight's device: a GPU drew another sketch than the CPU for the
    same seed (another split, other codes), and a device without generators (meta here) could not split at all.
    It is drawn on the CPU and moved, as sampler noise is."""
    drawn = []
    randn = torch.randn

    def spy(*args, generator=None, **kwargs):
        drawn.append(None if generator is None else generator.device)
        return randn(*args, generator=generator, **kwargs)

    weight = torch.randn(12, 20, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(torch, "randn", spy)
    up, down, residual = lowrank_split(weight.to("meta"), 3, seed=3)
    assert drawn == [torch.device("cpu")]
    assert {up.device.type, down.device.type, residual.device.type} == {"meta"}
    assert up.shape == (12, 3) and down.shape == (3, 20) and residual.shape == weight.shape


# -- SVDQuant end to end -----------------------------------------------------------------------------------------
@pytest.fixture
def calibration(tiny_unet, ddpm_scheduler):
    return collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)


def _svdquant_recipe(granularity: str = "per_group", rotation: str = "none") -> Recipe:
    weights = QScheme(bits=4, granularity="per_channel", lowrank_rank=2)
    activations = QScheme(bits=4, granularity=granularity, group_size=4, smoothing=True, rotation=rotation)
    return Recipe(method=SVDQuantMethod(alpha_grid=(0.3, 0.6), search_samples=8), weights=weights,
                  activations=activations, calibration=CALIB, deployments=(Deployment(SAMPLER),))


@pytest.mark.parametrize("granularity,rotation", [("per_group", "none"), ("per_tensor", "hadamard")])
def test_svdquant_saves_and_loads_bit_identically(tmp_path, tiny_unet, ddpm_scheduler, calibration, granularity,
                                                  rotation):
    recipe = _svdquant_recipe(granularity, rotation)
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, recipe, calibration=calibration, progress=False)
    layers = {n: m for n, m in qmodel.model.named_modules() if isinstance(m, (TransformedQuantConv2d,
                                                                               TransformedQuantLinear))}
    assert layers and any(m.rank for m in layers.values())
    assert any(not torch.equal(m.smooth, torch.ones_like(m.smooth)) for m in layers.values())
    # the fitted residual was written through the parameter, so caches keyed on version counters (the
    # cross-attention K/V memo) see the new weights; ``.data.copy_`` wrote them without moving the counter
    assert all(m.weight._version > 0 for m in layers.values())
    assert qmodel.svdquant_report["layers"]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 990])
    fp = tiny_unet(x, t).sample
    with quantizers_bypassed(qmodel.model):  # smoothing + branch + residual: still the FP network
        assert torch.allclose(qmodel(x, t), fp, atol=1e-4, rtol=1e-4)
    qmodel.save_pretrained(tmp_path / "q", ddpm_scheduler)
    loaded, _ = tadq.load(tmp_path / "q")
    assert loaded.recipe == recipe and loaded.config == qmodel.config
    assert torch.equal(loaded(x, t), qmodel(x, t))
    saved_state, loaded_state = qmodel.model.state_dict(), loaded.model.state_dict()
    for name in (k for k in saved_state if k.endswith(("smooth", "lowrank_up", "lowrank_down"))):
        assert torch.equal(saved_state[name], loaded_state[name]), name
    images = [api.sample(m, ddpm_scheduler, SAMPLER, num_samples=2, seed=5, progress=False).images
              for m in (qmodel, loaded)]
    assert torch.equal(images[0], images[1])


def test_smoothing_search_never_does_worse_than_no_smoothing(tiny_unet, ddpm_scheduler, calibration):
    qmodel = api.quantize(tiny_unet, ddpm_scheduler, _svdquant_recipe("per_tensor"), calibration=calibration,
                          progress=False)
    for fit in qmodel.svdquant_report["layers"]:
        assert fit["mse_chosen"] <= fit["mse_plain"], fit["name"]


def test_cost_counts_the_branch_and_the_kernel_status(tiny_unet, ddpm_scheduler, calibration):
    from tadq.corrections.ptqd.bitops import bit_operations
    from tadq.svdquant.cost import cost_summary, layer_costs

    qmodel = api.quantize(tiny_unet, ddpm_scheduler, _svdquant_recipe("per_token"), calibration=calibration,
                          progress=False)
    costs = layer_costs(qmodel)
    conv = next(c for n, c in costs.items() if c["rank"] and c["kernel"] == [3, 3])
    reduction, out = conv["in_channels"] * 9, conv["out_features"]
    positions = conv["macs"] // (reduction * out)
    assert positions > 0 and conv["branch_macs"] == positions * conv["rank"] * (reduction + out)
    assert conv["kernel_runnable"] == "group-wise"  # per-pixel scales on a 3×3 conv do not factor out
    summary = cost_summary(qmodel, steps=2)
    assert summary["bitops_quantized_gemms"] == 2 * bit_operations(qmodel)
    assert summary["bitops"] == summary["bitops_quantized_gemms"] + summary["branch_macs"] * 32 * 32
    assert summary["branch_macs"] == 2 * sum(c["branch_macs"] for c in costs.values())
