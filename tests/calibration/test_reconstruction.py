import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler
from tests.dtype_probe import DtypeRecorder

from tadq import api
from tadq.calibration import collect_calibration_set
from tadq.calibration.reconstruction import reconstruct
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig
from tadq.registry import adapter_for
from tadq.sampling import SamplerConfig

SAMPLER = SamplerConfig(kind="ddim", num_steps=10)
CALIB = CalibrationConfig(sampler=SAMPLER, num_trajectories=16, num_steps_kept=4, samples_per_step=16, batch_size=16)
RECON = ReconstructionConfig(weight_iters=60, activation_iters=30, batch_size=16, rounding="adaround")


@pytest.fixture
def setup(tiny_unet, ddpm_scheduler):
    calib = collect_calibration_set(tiny_unet, adapter_for(tiny_unet), ddpm_scheduler.config, CALIB, progress=False)
    return tiny_unet, ddpm_scheduler, calib


def _naive(model, scheduler, calib, preset="W4A4"):
    return api.quantize(model, scheduler, QuantConfig.from_preset(preset, calibration=CALIB), calibration=calib,
                        progress=False)


def test_reconstruction_lowers_block_error_below_initialisation(setup):
    model, scheduler, calib = setup
    qmodel = _naive(model, scheduler, calib, "W4A16")
    config = ReconstructionConfig(weight_iters=200, activation_iters=0, batch_size=16, weight_lr=1e-2,
                                  rounding="adaround")
    reports = reconstruct(qmodel.model, model, qmodel.adapter, calib, config, progress=False)
    assert all(r.loss_after <= r.loss_before * (1 + 1e-6) for r in reports)
    before, after = sum(r.loss_before for r in reports), sum(r.loss_after for r in reports)
    assert after < 0.9 * before  # AdaRound beats the MSE-initialised nearest rounding, measured here


def test_reconstructed_weights_are_on_the_grid(setup):
    model, scheduler, calib = setup
    qmodel = _naive(model, scheduler, calib, "W4A16")
    reconstruct(qmodel.model, model, qmodel.adapter, calib, RECON, progress=False)
    layer = qmodel.model.get_submodule("down_blocks.0.resnets.0.conv1")
    assert layer.weight_quantizer.rounding is None
    assert torch.equal(layer.quantized_weight(), layer.weight)


@pytest.mark.parametrize("rounding", ["adaround", pytest.param("gptq", marks=pytest.mark.slow)])  # one resume path
def test_interrupted_reconstruction_resumes_to_the_same_model(setup, tmp_path, monkeypatch, rounding):
    import tadq.calibration.reconstruction as recon

    model, scheduler, calib = setup
    config = dataclasses.replace(RECON, rounding=rounding)
    reference = _naive(model, scheduler, calib)
    reconstruct(reference.model, model, reference.adapter, calib, config, progress=False)

    qmodel = _naive(model, scheduler, calib)
    original = recon._round_unit_weights
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(recon, "_round_unit_weights", flaky)
    checkpoint = tmp_path / "recon.pt"
    with pytest.raises(KeyboardInterrupt):
        reconstruct(qmodel.model, model, qmodel.adapter, calib, config, checkpoint=checkpoint, progress=False)
    assert checkpoint.exists()
    monkeypatch.setattr(recon, "_round_unit_weights", original)
    resumed = _naive(model, scheduler, calib)
    reconstruct(resumed.model, model, resumed.adapter, calib, config, checkpoint=checkpoint, progress=False)
    ref_state, state = reference.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(ref_state[k], state[k]) for k in ref_state)


def test_checkpoint_of_another_run_raises(setup, tmp_path, monkeypatch):
    model, scheduler, calib = setup
    qmodel = _naive(model, scheduler, calib)
    checkpoint = tmp_path / "recon.pt"
    reconstruct(qmodel.model, model, qmodel.adapter, calib,
                ReconstructionConfig(weight_iters=2, activation_iters=0, batch_size=16), checkpoint=checkpoint,
                progress=False)
    with pytest.raises(ValueError, match="another run"):
        reconstruct(qmodel.model, model, qmodel.adapter, calib, RECON, checkpoint=checkpoint, progress=False)

    # through tadq.quantize the settings are compared before calibration (it used to sample the calibration
    # trajectories first); a method that reconstructs nothing refuses the checkpoint instead of ignoring it
    import tadq.methods

    config = QuantConfig.from_preset("W4A4", method="qdiffusion", calibration=CALIB, reconstruction=RECON)
    monkeypatch.setattr(tadq.methods, "collect_calibration_set", None)  # calibrating first would fail otherwise
    with pytest.raises(ValueError, match="another run: config .*weight_iters 2, this run 60"):
        api.quantize(model, scheduler, config, checkpoint=checkpoint, progress=False)
    naive = QuantConfig.from_preset("W4A4", calibration=CALIB)
    with pytest.raises(ValueError, match="method 'naive' runs none"):
        api.quantize(model, scheduler, naive, checkpoint=tmp_path / "new.pt", progress=False)
    assert not (tmp_path / "new.pt").exists()


@pytest.mark.parametrize("kw", [{"weight_iters": -1}, {"batch_size": 0}, {"warmup": 1.0}, {"beta_start": 1.0},
                                {"weight_lr": 0.0}])
def test_bad_reconstruction_config_raises(kw):
    with pytest.raises(ValueError):
        ReconstructionConfig(**kw)


def test_checkpoint_of_other_bits_is_refused_naming_the_field(setup, tmp_path):
    """A W4A8 checkpoint used to be accepted by a W8A8 run (its key left the bit-widths out)."""
    model, scheduler, calib = setup
    config = ReconstructionConfig(weight_iters=2, activation_iters=0, batch_size=16)
    checkpoint = tmp_path / "recon.safetensors"
    w4 = _naive(model, scheduler, calib, "W4A8")
    reconstruct(w4.model, model, w4.adapter, calib, config, checkpoint=checkpoint, progress=False)
    w8 = _naive(model, scheduler, calib, "W8A8")
    with pytest.raises(ValueError, match=r"quantizers \(.*bits 4, this run 8"):
        reconstruct(w8.model, model, w8.adapter, calib, config, checkpoint=checkpoint, progress=False)


def test_checkpoint_is_safetensors_not_pickle(setup, tmp_path):
    model, scheduler, calib = setup
    checkpoint = tmp_path / "recon.pt"
    qmodel = _naive(model, scheduler, calib, "W4A8")
    reconstruct(qmodel.model, model, qmodel.adapter, calib,
                ReconstructionConfig(weight_iters=2, activation_iters=0, batch_size=16), checkpoint=checkpoint,
                progress=False)
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as handle:  # raises for a pickle
        assert "tadq" in handle.metadata()


@pytest.mark.parametrize("rounding", [pytest.param("adaround", marks=pytest.mark.slow), "gptq"])  # one capture path
def test_fp_targets_captured_several_units_at_a_time_change_nothing(setup, rounding):
    """A capture budget of one byte (one unit per pass) and of a gigabyte (every unit in one pass) give the same
    model bit for bit: grouping only saves the FP prefix passes."""
    model, scheduler, calib = setup
    config = ReconstructionConfig(weight_iters=20, activation_iters=10, batch_size=16, rounding=rounding,
                                  gptq_inputs=32)
    states = []
    for budget in (1, 1 << 30):
        qmodel = _naive(model, scheduler, calib)
        reconstruct(qmodel.model, model, qmodel.adapter, calib, config, progress=False, capture_budget_bytes=budget)
        states.append(qmodel.model.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_gptq_rounds_a_grouped_conv_per_group_on_its_grid_and_beats_nearest():
    """A grouped convolution gets one Hessian per group; each output row keeps its own step."""
    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _gptq_weights
    from tadq.quant.modules import QuantConv2d
    from tadq.quant.qscheme import preset

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, groups=2)
    layer = QuantConv2d.from_module(conv, *preset("W4A16"))
    base = torch.randn(64, 1, 6, 6)
    x = base.repeat(1, 8, 1, 1) + 0.3 * torch.randn(64, 8, 6, 6)  # strongly correlated channels
    with torch.no_grad():
        target = conv(x)
        nearest_error = float((layer(x) - target).pow(2).mean())
    io = UnitIO(args=[x], output=target)
    _gptq_weights(layer, io, ReconstructionConfig(rounding="gptq", batch_size=16, gptq_inputs=0), seed=0)
    with torch.no_grad():
        assert torch.equal(layer.quantized_weight(), layer.weight)  # on the grid
        gptq_error = float((layer(x) - target).pow(2).mean())
    assert gptq_error < 0.8 * nearest_error, (gptq_error, nearest_error)


def test_fp_output_weight_undoes_a_linear_drift_of_the_inputs():
    """If the quantized path's inputs are x̂ = A x, W* = W A⁻¹ reproduces the FP outputs W x exactly; without drift
    W* = W."""
    from tadq.calibration.reconstruction import _fp_output_weight

    torch.manual_seed(0)
    weight, x = torch.randn(5, 12, dtype=torch.float64), torch.randn(4000, 12, dtype=torch.float64)
    drift = torch.eye(12, dtype=torch.float64) + 0.1 * torch.randn(12, 12, dtype=torch.float64)
    x_hat = x @ drift.T
    hessian, cross = x_hat.T @ x_hat / 4000, x.T @ x_hat / 4000
    corrected = _fp_output_weight(weight, hessian, cross, damp=1e-12)
    assert torch.allclose(x_hat @ corrected.T, x @ weight.T, atol=1e-8)
    same = _fp_output_weight(weight, x.T @ x / 4000, x.T @ x / 4000, damp=1e-12)
    assert torch.allclose(same, weight, atol=1e-9)


def test_fp_output_weight_on_a_device_without_float64_solves_in_float32(monkeypatch):
    """On MPS (no float64) the W* solve and the cross-moment sums made float64 tensors and raised; they follow
    ``wide_dtype`` (float32 there). Switched to float32: no float64 tensor, and W* within float32 rounding of the
    float64 solve (columns × ε × cond(H) of the weight's scale)."""
    from tadq.calibration.reconstruction import _fp_output_weight

    torch.manual_seed(0)
    weight, x = torch.randn(5, 12), torch.randn(400, 12)
    x_hat = x @ (torch.eye(12) + 0.1 * torch.randn(12, 12)).T
    hessian, cross = x_hat.T @ x_hat / 400, x.T @ x_hat / 400
    expected = _fp_output_weight(weight, hessian, cross, damp=0.01)
    monkeypatch.setattr("tadq.calibration.reconstruction.wide_dtype", lambda device: torch.float32)
    with DtypeRecorder() as recorder:
        got = _fp_output_weight(weight, hessian, cross, damp=0.01)
    assert not recorder.float64_ops()
    damped = hessian.double() + 0.01 * torch.diagonal(hessian).double().mean() * torch.eye(12, dtype=torch.float64)
    eps = torch.finfo(torch.float32).eps
    tolerance = 12 * eps * float(torch.linalg.cond(damped)) * float(expected.abs().max())
    assert torch.allclose(got, expected, rtol=0.0, atol=tolerance)


def test_gptq_target_damping_decides_whether_8bit_gptq_beats_nearest():
    """W* is a ridge solve: with 1 % of the mean diagonal (gptq_damp, what gptq_target_damp=None uses) it is pulled
    toward zero along the inputs' weak directions by more than an 8-bit step, so GPTQ's rounding loses to nearest
    rounding (every unit of the shipped digits model at W8A8); a small target damping removes that bias (here, with
    no drift to undo, it lands about level with nearest)."""
    import copy

    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _gptq_weights
    from tadq.quant.modules import QuantLinear
    from tadq.quant.qscheme import preset

    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 16)
    scales = torch.logspace(0, -2.5, 48)  # input energy spread over 5 decades, as after a norm + SiLU
    x = torch.randn(2048, 48) @ torch.linalg.qr(torch.randn(48, 48))[0] * scales
    with torch.no_grad():
        target = linear(x)
    errors = {}
    for damp in (None, 1e-6):
        layer = QuantLinear.from_module(copy.deepcopy(linear), *preset("W8A16"))
        with torch.no_grad():
            nearest = float((layer(x) - target).pow(2).mean())
        io = UnitIO(args=[x], output=target)
        config = ReconstructionConfig(rounding="gptq", batch_size=64, gptq_inputs=0, gptq_target_damp=damp,
                                      gptq_target_prior="zero")
        _gptq_weights(layer, io, config, seed=0, fp_unit=linear, fp_io=io)
        with torch.no_grad():
            errors[damp] = float((layer(x) - target).pow(2).mean()) / nearest
    assert errors[None] > 1.0 and errors[1e-6] < 0.1 * errors[None], errors


def test_gptq_onto_fp_outputs_does_not_delete_what_calibration_left_out():
    """W*'s ridge used to shrink W toward zero along the input directions the calibration set barely covers (the
    shipped DiT with 16 calibration trajectories: its W8A8 base 7 dB under naive PTQ). On the calibration inputs the
    result even beats nearest rounding, so the unit-loss guard keeps it, but an input with components in those
    directions meets a layer that lost them. Shrunk toward W (``gptq_target_prior="weight"``, the default), W* is W
    itself when there is no drift to undo, so GPTQ onto the FP outputs rounds exactly as plain GPTQ does."""
    import copy

    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _gptq_weights
    from tadq.quant.modules import QuantLinear
    from tadq.quant.qscheme import preset

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    basis = torch.randn(32, 32)
    x = torch.randn(256, 4) @ basis[:4] + 1e-3 * torch.randn(256, 32) @ basis  # 4 strong directions, a faint rest
    held_out = torch.randn(256, 32) @ basis  # every direction, as inputs calibration did not see
    io = UnitIO(args=[x], output=linear(x).detach())
    weights, errors = {}, {}
    for name, config in {"zero": ReconstructionConfig(rounding="gptq", gptq_inputs=0, gptq_target_prior="zero"),
                         "default": ReconstructionConfig(rounding="gptq", gptq_inputs=0),
                         "own_inputs": ReconstructionConfig(rounding="gptq", gptq_inputs=0,
                                                            gptq_target="own_inputs")}.items():
        layer = QuantLinear.from_module(copy.deepcopy(linear), *preset("W8A16"))
        with torch.no_grad():
            nearest = [float((layer(v) - linear(v)).pow(2).mean()) for v in (x, held_out)]
        fp = (linear, io) if config.gptq_target == "fp_output" else (None, None)
        _gptq_weights(layer, io, config, seed=0, fp_unit=fp[0], fp_io=fp[1])
        with torch.no_grad():
            weights[name] = layer.weight.clone()
            errors[name] = [float((layer(v) - linear(v)).pow(2).mean()) / n
                            for v, n in zip((x, held_out), nearest, strict=True)]
    # the guard's blind spot: below nearest on the calibration inputs, far above plain GPTQ on the held-out ones
    assert errors["zero"][0] < 1.0 < 100 * errors["own_inputs"][1] < errors["zero"][1], errors
    assert torch.equal(weights["default"], weights["own_inputs"])


def test_gptq_onto_fp_outputs_keeps_the_weights_of_a_dead_input():
    """An input channel that is zero on every calibration vector gives W* no data: the ridge solve set its column
    to 0, deleting those weights for any input calibration did not cover (the loss on the calibration set cannot
    see it). The column keeps W's nearest rounding, as GPTQ's own handling of a dead column does."""
    import copy

    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _gptq_weights
    from tadq.quant.modules import QuantLinear
    from tadq.quant.qscheme import preset

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 6)
    x = torch.randn(512, 12) @ (torch.eye(12) + 0.2 * torch.randn(12, 12))
    x[:, 5] = 0.0  # dead in calibration
    with torch.no_grad():
        target = linear(x)
    layer = QuantLinear.from_module(copy.deepcopy(linear), *preset("W4A16"))
    with torch.no_grad():
        nearest = layer.quantized_weight()[:, 5].clone()
    io = UnitIO(args=[x], output=target)
    _gptq_weights(layer, io, ReconstructionConfig(rounding="gptq", batch_size=64, gptq_inputs=0), seed=0,
                  fp_unit=linear, fp_io=io)
    assert bool((nearest != 0).any())
    assert torch.equal(layer.weight[:, 5], nearest)


def test_the_fp_output_cross_moments_are_summed_on_the_layers_device():
    """gptq_target="fp_output" summed E[x x̂ᵀ] into CPU tensors beside Hessians on the layer's device: on a GPU the
    first batch's moment could not be added. On the meta device (which the sums silently let through on the CPU)
    the cross moments must come back where the Hessians are."""
    import copy

    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _layer_hessians

    fp = torch.nn.Linear(12, 6).to("meta")
    layer = copy.deepcopy(fp)
    io = UnitIO(args=[torch.randn(64, 12).to("meta")])
    accumulators, cross = _layer_hessians(layer, layer, 1, io, torch.arange(64), 32, fp, fp, io)
    assert [a.sum.device.type for a in accumulators] == ["meta"]
    assert [c.device.type for c in cross] == ["meta"] and cross[0].shape == (12, 12)


@pytest.mark.parametrize("phase", ["weights", "activations"])
def test_an_interrupted_unit_is_left_as_it_was_and_the_run_resumes_in_place(setup, tmp_path, monkeypatch, phase):
    """Ctrl-C in the middle of a unit (a notebook, or out of memory) used to leave AdaRound's soft rounding attached to
    its quantizers: the model sampled with a half-rounded unit, and resuming on it refused the checkpoint just written
    as one that "does not fit this model" (its state held the AdaRound variables). The unit now keeps what it had."""
    import tadq.calibration.reconstruction as recon
    from tadq.quant.quantizer import Quantizer
    from tadq.safefiles import load_checked

    model, scheduler, calib = setup
    config = dataclasses.replace(RECON, weight_iters=8, activation_iters=8)
    qmodel = _naive(model, scheduler, calib)
    target = recon.with_rounding_penalty if phase == "weights" else torch.optim.lr_scheduler.CosineAnnealingLR.step
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == config.weight_iters + 3:  # inside the phase of the second unit that has one
            raise KeyboardInterrupt
        return target(*args, **kwargs)

    if phase == "weights":
        monkeypatch.setattr(recon, "with_rounding_penalty", interrupted)
    else:
        monkeypatch.setattr(torch.optim.lr_scheduler.CosineAnnealingLR, "step", interrupted)
    checkpoint = tmp_path / "recon.safetensors"
    with pytest.raises(KeyboardInterrupt):
        reconstruct(qmodel.model, model, qmodel.adapter, calib, config, checkpoint=checkpoint, progress=False)
    monkeypatch.undo()
    assert not [name for name, q in qmodel.model.named_modules() if isinstance(q, Quantizer) and q.rounding]
    saved, _ = load_checked(checkpoint, "reconstruction checkpoint")
    state = qmodel.model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[name], saved[name]) for name in saved)  # as the last finished step left it
    reconstruct(qmodel.model, model, qmodel.adapter, calib, config, checkpoint=checkpoint, progress=False)


def test_a_reference_left_in_training_mode_reconstructs_as_in_eval_mode(ddpm_scheduler):
    """Block reconstruction called directly with an FP model in training mode took its dropout's random draws as
    the targets; it now runs both models in eval mode and gives each its mode back."""
    from tests.conftest import build_tiny_unet

    model = build_tiny_unet(dropout=0.5)
    small = dataclasses.replace(CALIB, num_trajectories=4, num_steps_kept=2, samples_per_step=4)
    calib = collect_calibration_set(model, adapter_for(model), ddpm_scheduler.config, small, progress=False)
    config = dataclasses.replace(RECON, weight_iters=4, activation_iters=0, batch_size=4)
    states = []
    for training in (False, True):
        qmodel = api.quantize(model, ddpm_scheduler, QuantConfig.from_preset("W4A16", calibration=small),
                              calibration=calib, progress=False)
        model.train(training)
        reconstruct(qmodel.model, model, qmodel.adapter, calib, config, progress=False)
        assert model.training == training and not qmodel.model.training
        states.append(qmodel.model.state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])


def test_reconstruction_walks_the_network_a_fixed_number_of_times_whatever_its_depth(monkeypatch):
    """Each unit's weight phase walked every module of the network to bypass the activation quantizers: the
    bookkeeping grew with units × modules. The whole-network walks must not grow with the number of units."""
    from tests.adapters.test_transformer2d import build_tiny_dit

    from tadq.sampling import ClassLabels

    scheduler = DDIMScheduler(num_train_timesteps=1000)
    small = CalibrationConfig(sampler=SamplerConfig("ddim", num_steps=4), num_trajectories=2, num_steps_kept=2,
                              samples_per_step=2, batch_size=4)
    config = ReconstructionConfig(batch_size=4, gptq_inputs=8)
    named_modules = torch.nn.Module.named_modules
    walks = {}
    for depth in (1, 3):
        model = build_tiny_dit(num_layers=depth)
        labels = ClassLabels(tuple(range(4)), null_class=10)
        calib = collect_calibration_set(model, adapter_for(model), scheduler.config, small, progress=False,
                                        conditions=labels)
        qmodel = api.quantize(model, scheduler, QuantConfig.from_preset("W8A8", calibration=small),
                              calibration=calib, progress=False, conditions=labels)
        root, count = qmodel.model, [0]

        def spy(self, *args, root=root, count=count, **kwargs):
            count[0] += self is root
            return named_modules(self, *args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(torch.nn.Module, "named_modules", spy)
            reports = reconstruct(root, model, qmodel.adapter, calib, config, progress=False)
        walks[len(reports)] = count[0]
    assert len(set(walks)) == 2 and len(set(walks.values())) == 1, walks


@pytest.mark.parametrize("granularity", ["per_block", "per_channel"])
def test_gptq_onto_fp_outputs_searches_block_ranges_on_the_weight_it_rounds(monkeypatch, granularity):
    """Block-wise weights hold a few weights per (Δ, z): W*, which GPTQ rounds, moves many of them outside the ranges
    searched on W, so their ranges are searched again on W*; per-channel ranges keep W's (measured that way). W* is
    stood in for by 1.5 W, so the ranges can be checked exactly."""
    import copy

    from tadq.calibration import reconstruction as recon
    from tadq.calibration.capture import UnitIO
    from tadq.quant import QScheme
    from tadq.quant.modules import QuantLinear
    from tadq.quant.ranges import estimate_range

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 6)
    x = torch.randn(256, 12)
    scheme = QScheme(bits=4, granularity=granularity, group_size=4)
    layer = QuantLinear.from_module(copy.deepcopy(linear), scheme, QScheme.off())
    before = layer.weight_quantizer.scale.clone()
    monkeypatch.setattr(recon, "_fp_output_weight", lambda weight, *args: 1.5 * weight)
    with torch.no_grad():
        io = UnitIO(args=[x], output=linear(x))
    recon._gptq_weights(layer, io, ReconstructionConfig(rounding="gptq", batch_size=64, gptq_inputs=0), seed=0,
                        fp_unit=linear, fp_io=io)
    expected = estimate_range(1.5 * linear.weight.detach(), scheme) if granularity == "per_block" else None
    if expected is None:
        assert torch.equal(layer.weight_quantizer.scale, before)
    else:
        probe = QuantLinear.from_module(copy.deepcopy(linear), scheme, QScheme.off())
        probe.weight_quantizer.set_range(*expected)
        assert torch.equal(layer.weight_quantizer.scale, probe.weight_quantizer.scale)
        assert not torch.equal(layer.weight_quantizer.scale, before)


def test_a_unit_that_keeps_nearest_rounding_keeps_the_ranges_it_was_scored_with(monkeypatch):
    """When GPTQ's rounding loses to nearest rounding the unit's weights are put back, and with them the block ranges
    GPTQ searched again: nearest rounding is the candidate scored with the original ranges."""
    import copy

    from tadq.calibration import reconstruction as recon
    from tadq.calibration.capture import UnitIO
    from tadq.quant import QScheme
    from tadq.quant.modules import QuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 6)
    x = torch.randn(256, 12)
    layer = QuantLinear.from_module(copy.deepcopy(linear), QScheme(bits=4, granularity="per_block", group_size=4),
                                    QScheme.off())
    unit = torch.nn.Sequential(layer)
    scale, zero_point = layer.weight_quantizer.scale.clone(), layer.weight_quantizer.zero_point.clone()
    weight = layer.weight.detach().clone()
    monkeypatch.setattr(recon, "_fp_output_weight", lambda weight, *args: 1.5 * weight)
    monkeypatch.setattr(recon, "_eval_loss", lambda *args: float("inf"))  # GPTQ's result loses
    with torch.no_grad():
        io = UnitIO(args=[x], output=linear(x))
    config = ReconstructionConfig(rounding="gptq", batch_size=64, gptq_inputs=0)
    recon._round_unit_weights(unit, io, config, seed=0, before=1.0, fp_unit=torch.nn.Sequential(linear), fp_io=io)
    assert torch.equal(layer.weight, weight)
    assert torch.equal(layer.weight_quantizer.scale, scale) and torch.equal(layer.weight_quantizer.zero_point,
                                                                            zero_point)


class _ChunkedFeedForward(torch.nn.Module):
    """Calls its layer once per chunk of tokens, as diffusers' ``set_chunk_feed_forward`` /
    ``enable_forward_chunking`` run a feed-forward."""

    def __init__(self, layer: torch.nn.Module, chunks: int) -> None:
        super().__init__()
        self.layer, self.chunks = layer, chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layer(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


@pytest.mark.parametrize("fp_output", [False, True], ids=["hessian", "with-fp-cross-moment"])
def test_gptq_hessian_of_a_layer_called_once_per_chunk_holds_every_chunk(fp_output):
    """A feed-forward chunked along the tokens calls its layers once per chunk in one unit run: the Hessian (and
    the FP cross moment) held the last chunk's rows only; now every row, as the unchunked unit gives them."""
    from tadq.calibration.capture import UnitIO
    from tadq.calibration.reconstruction import _layer_hessians
    from tadq.quant.modules import QuantLinear
    from tadq.quant.qscheme import preset

    torch.manual_seed(0)
    layer = QuantLinear.from_module(torch.nn.Linear(6, 5), *preset("W4A16"))
    x = torch.randn(8, 12, 6)  # (N, tokens, width)
    io = UnitIO(args=[x], output=torch.zeros(8))
    rows = torch.arange(8)
    results = {}
    for chunks in (1, 4):
        unit = _ChunkedFeedForward(layer, chunks)
        fp = _ChunkedFeedForward(torch.nn.Linear(6, 5), chunks) if fp_output else None
        results[chunks] = _layer_hessians(unit, layer, 1, io, rows, 4, None if fp is None else fp.layer, fp, io)
    (whole, whole_cross), (chunked, chunked_cross) = results[1], results[4]
    assert chunked[0].count == whole[0].count == 8 * 12
    # the same float32 products summed in another order: |Σ x xᵀ| error ≤ n·eps·Σ|x||xᵀ| over the n = 96 rows
    rows_x = x.reshape(-1, 6).double()
    bound = rows_x.shape[0] * torch.finfo(torch.float32).eps * (rows_x.abs().T @ rows_x.abs())
    assert ((chunked[0].sum - whole[0].sum).abs() <= bound).all()
    if fp_output:
        assert ((chunked_cross[0] - whole_cross[0]).abs() <= bound / rows_x.shape[0]).all()
