"""euler, dpmsolver++ and flow-euler against diffusers' own schedulers, step by step and over full sampling runs.

What is compared (docs/sampling.md#what-is-tested):

* dpmsolver++ (orders 1 and 2) and flow-euler take the same float32 operations as diffusers' ``step`` on the same
  state, so full runs of a tiny network from the same x_T are **bit-identical** (``torch.equal``).
* euler's state is the network input x = s/√(σ²+1), not diffusers' σ-space sample s; its kernel is bit-identical
  given the same s (x·√(σ²+1)), and a full run differs only by that round trip. Its tolerance is derived below
  from float32 rounding (u = 2⁻²⁴) propagated through the run with the network's own Jacobians.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from torch import nn

from tadq.sampling import (
    IdentityHooks,
    SamplerConfig,
    SamplingPlan,
    data_prediction,
    euler_ancestral_step,
    euler_step,
    initial_noise,
    make_scheduler,
    sample,
    sampler_step,
    step_contexts,
    step_noise,
    to_epsilon,
)

U = 2.0**-24  # unit roundoff of float32
SHAPE = (2, 4, 4)  # (C, H, W): 32 elements, so exact Jacobians are cheap
INDICES = (0, 1)
SEED = 7


class TinyNet(nn.Module):
    """0.8 x + 0.2 conv(tanh(conv(x) + sinusoidal time embedding)): a small nonlinear denoiser of any prediction
    type; the identity part keeps an ε model's trajectories bounded (ε ≈ x at high noise), as a trained one's are."""

    def __init__(self, channels: int = SHAPE[0], hidden: int = 8, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        for parameter in self.parameters():
            nn.init.normal_(parameter, std=0.3, generator=generator)
        self.register_buffer("freqs", torch.linspace(1.0, 8.0, hidden))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        embedding = torch.sin(t.float()[:, None] / 1000.0 * self.freqs.float()).to(x.dtype)  # (B, hidden)
        return 0.8 * x + 0.2 * self.out(torch.tanh(self.inp(x) + embedding[:, :, None, None]))


def _diffusers_run(scheduler, net: nn.Module, z: torch.Tensor, record: list | None = None) -> torch.Tensor:
    """The pipelines' loop: s_T = z·init_noise_sigma, the network on scale_model_input(s), then ``step``."""
    current = z * getattr(scheduler, "init_noise_sigma", 1.0)  # flow pipelines start from z itself
    for t in scheduler.timesteps:
        scale = getattr(scheduler, "scale_model_input", None)
        model_input = scale(current, t) if scale is not None else current
        output = net(model_input, t.expand(z.shape[0]), None)
        if record is not None:
            record.append((current, model_input, output, t))
        current = scheduler.step(output, t, current).prev_sample
    return current


def _tadq_run(train_config, sampler: SamplerConfig, net: nn.Module, hooks=()) -> torch.Tensor:
    plan = SamplingPlan.build(train_config, sampler)
    return sample(net, plan, indices=INDICES, seed=SEED, sample_shape=SHAPE, progress=False, hooks=hooks).images


def _z() -> torch.Tensor:
    return initial_noise(SEED, INDICES, SHAPE)


# -- bit-identical full runs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("steps", [8, 20])  # < 15 steps: lower_order_final; 20: the 2M update up to the last step
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmsolver_full_run_is_bit_identical_to_diffusers(order: int, steps: int, spacing: str) -> None:
    train = DPMSolverMultistepScheduler(timestep_spacing=spacing, solver_order=3)  # the sampler's order wins
    sampler = SamplerConfig("dpmsolver++", num_steps=steps, order=order)
    net = TinyNet()
    reference = _diffusers_run(make_scheduler(train, sampler), net, _z())
    assert make_scheduler(train, sampler).config.solver_order == order
    images = _tadq_run(train, sampler, net)
    assert torch.equal(images, reference)
    first_order = _tadq_run(train, SamplerConfig("dpmsolver++", num_steps=steps, order=1), net)
    assert order == 1 or not torch.equal(images, first_order)  # 2M really used the previous x̂_0


@pytest.mark.parametrize("shift", [None, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_euler_full_run_is_bit_identical_to_diffusers(shift: float | None, steps: int) -> None:
    train = FlowMatchEulerDiscreteScheduler(shift=1.0 if shift is None else 2.0)
    sampler = SamplerConfig("flow-euler", num_steps=steps, shift=shift)
    scheduler = make_scheduler(train, sampler)
    assert scheduler.shift == (1.0 if shift is None else shift)
    net = TinyNet()
    assert torch.equal(_tadq_run(train, sampler, net), _diffusers_run(scheduler, net, _z()))


@pytest.mark.parametrize("shift_type", ["exponential", "linear"])
def test_flow_euler_takes_an_explicit_shift_for_a_dynamic_shifting_config(shift_type: str) -> None:
    """A resolution-dependent scheduler walks the grid the pipelines give it, set_timesteps(S, mu=μ): its σ range
    unshifted, the grid shifted once, by exp(μ) or (linear) μ; the sampler's shift s is that factor."""
    train = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=shift_type)
    with pytest.raises(NotImplementedError, match="shift"):
        SamplingPlan.build(train, SamplerConfig("flow-euler", num_steps=4))
    sampler = SamplerConfig("flow-euler", num_steps=4, shift=3.0)
    reference = FlowMatchEulerDiscreteScheduler.from_config(train.config)
    reference.set_timesteps(4, mu=3.0 if shift_type == "linear" else math.log(3.0))
    net = TinyNet()
    assert torch.equal(_tadq_run(train, sampler, net), _diffusers_run(reference, net, _z()))
    static = SamplingPlan.build(FlowMatchEulerDiscreteScheduler(shift=3.0), sampler)  # shifts σ_min too
    assert [s.sigma_t for s in SamplingPlan.build(train, sampler).steps] != [s.sigma_t for s in static.steps]


@pytest.mark.parametrize("shift", [None, 3.0])
def test_flow_euler_on_the_uniform_grid_is_the_flux_pipelines_scheduler_run(shift: float | None) -> None:
    """flow_sigmas="uniform": FluxPipeline's set_timesteps(sigmas=linspace(1, 1/S, S)), shifted by the scheduler;
    another grid than the scheduler's own (which ends near σ_min), with its own key."""
    import numpy as np

    train = FlowMatchEulerDiscreteScheduler(shift=2.0)
    sampler = SamplerConfig("flow-euler", num_steps=6, shift=shift, flow_sigmas="uniform")
    reference = make_scheduler(train, SamplerConfig("flow-euler", num_steps=6, shift=shift))
    reference.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))  # what FluxPipeline passes
    net = TinyNet()
    images = _tadq_run(train, sampler, net)
    assert torch.equal(images, _diffusers_run(reference, net, _z()))
    own = dataclasses.replace(sampler, flow_sigmas=None)
    assert not torch.equal(images, _tadq_run(train, own, net))
    assert sampler.key == own.key + "-uniform"


def test_flow_sigmas_is_written_only_when_set_and_checked() -> None:
    """A sampler without the grid serialises as before the field existed (so keys and recipes do not move); one
    with it round-trips; another kind or an unknown grid is refused."""
    from tadq.config import config_from_dict, config_to_dict

    assert "flow_sigmas" not in config_to_dict(SamplerConfig("flow-euler", 4))["data"]
    uniform = SamplerConfig("flow-euler", 4, flow_sigmas="uniform")
    assert config_to_dict(uniform)["data"]["flow_sigmas"] == "uniform"
    assert config_from_dict(config_to_dict(uniform)) == uniform
    with pytest.raises(ValueError, match="only applies to"):
        SamplerConfig("euler", 4, flow_sigmas="uniform")
    with pytest.raises(ValueError, match="flow_sigmas='linear'"):
        SamplerConfig("flow-euler", 4, flow_sigmas="linear")


# -- euler: bit-identical kernel, derived tolerance on a full run --------------------------------------------------
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_kernel_is_bit_identical_given_the_same_sigma_space_sample(spacing: str) -> None:
    sampler = SamplerConfig("euler", num_steps=10)
    scheduler = make_scheduler(EulerDiscreteScheduler(timestep_spacing=spacing), sampler)
    generator = torch.Generator().manual_seed(0)
    for step, t in zip(step_contexts(scheduler, sampler), scheduler.timesteps, strict=True):
        x, eps = torch.randn((3, *SHAPE), generator=generator), torch.randn((3, *SHAPE), generator=generator)
        sigma = torch.tensor(step.sigma_t, dtype=torch.float32)
        sigma_next = torch.tensor(step.sigma_prev, dtype=torch.float32)
        expected = scheduler.step(eps, t, x * ((sigma**2 + 1) ** 0.5)).prev_sample
        if not step.is_last:
            expected = expected / ((sigma_next**2 + 1) ** 0.5)
        assert torch.equal(euler_step(x, eps, step), expected)


def _euler_bound(scheduler, net: nn.Module, z: torch.Tensor, noises: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(diffusers' final sample, elementwise bound on |tadq - diffusers|), both (B, C, H, W).

    tadq's step from its state x computes s̃ = fl(x·c) (c = √(σ²+1)) where diffusers has s; x = fl(s/c), so
    |s̃ - s| ≤ 2u|s| (+u²). Both then evaluate the same chain F(s) = (s + ((s - (s - σε))/σ)(σ' - σ))/c', exactly
    linear in s with slope 1/c', so one step adds at most ρ = 2.01u|s|/c' + 2 e_F, where e_F bounds F's own rounding:
    ≤ 8 ops, each at most u × the largest magnitude it touches (|s|, |σε|, |x̂_0|, |s'|), scaled by max(1, |dt|/σ)
    for the ops before the multiplication by dt, divided by c'. A difference δ in the state reaches the next one
    through the step's Jacobian A I + B J (J = ∂ε/∂x of the network at diffusers' input, computed exactly), so
    bound_{n+1} = |A I + B J| bound_n + ρ_n elementwise (first order; δ ~ 1e-6 makes second-order terms ~1e-12).
    Euler ancestral (``noises``: the z of each step, shared by both runs) steps to σ_down and adds σ_up z in σ-space,
    one more operation whose size enters the magnitudes; the noise does not depend on the state, so J is unchanged.
    """
    record: list = []
    final = _diffusers_run(scheduler, net, z, record)
    ancestral = noises is not None
    sigmas = scheduler.sigmas.double()
    bound = torch.zeros(z.shape[0], z[0].numel(), dtype=torch.float64)  # (B, D)
    for n, (current, model_input, output, time) in enumerate(record):
        sigma, sigma_next = float(sigmas[n]), float(sigmas[n + 1])
        c = math.sqrt(sigma**2 + 1)
        c_next = 1.0 if n == len(record) - 1 else math.sqrt(sigma_next**2 + 1)  # the last step returns s' itself
        sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) if ancestral else 0.0
        sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
        coef_x, coef_eps = c / c_next, (sigma_down - sigma) / c_next
        s, eps = current.double().flatten(1), output.double().flatten(1)
        pred = s - sigma * eps
        kick = sigma_up * noises[n].double().flatten(1) if ancestral else torch.zeros_like(s)
        s_next = s + (sigma_down - sigma) * eps + kick
        touched = s.abs() + (sigma * eps).abs() + pred.abs() + s_next.abs() + kick.abs()
        e_f = 9 * U * touched * max(1.0, abs(sigma_down - sigma) / sigma) / c_next
        rho = 2.01 * U * s.abs() / c_next + 2 * e_f
        propagated = []
        for b in range(z.shape[0]):
            jacobian = torch.autograd.functional.jacobian(
                lambda v, t=time: net(v.view(1, *SHAPE), t.expand(1), None).flatten(), model_input[b].flatten()
            ).double()  # (D, D)
            step_map = coef_x * torch.eye(jacobian.shape[0], dtype=torch.float64) + coef_eps * jacobian
            propagated.append(step_map.abs() @ bound[b])
        bound = torch.stack(propagated) + rho
    return final, bound.view_as(z)


@pytest.mark.parametrize(("spacing", "final"), [("linspace", "zero"), ("leading", "zero"), ("leading", "sigma_min")])
def test_euler_full_run_matches_diffusers_within_the_derived_bound(spacing: str, final: str) -> None:
    train = EulerDiscreteScheduler(timestep_spacing=spacing, final_sigmas_type=final)
    sampler = SamplerConfig("euler", num_steps=12)
    net = TinyNet()
    with torch.no_grad():
        reference, bound = _euler_bound(make_scheduler(train, sampler), net, _z())
    images = _tadq_run(train, sampler, net)
    difference = (images.double() - reference.double()).abs()
    assert bool((difference <= 1.5 * bound).all()), float((difference / bound).max())
    assert float(bound.max()) < 2e-4 * float(reference.abs().max())  # tight enough that a wrong step would fail
    plan = SamplingPlan.build(train, sampler)
    assert torch.equal(plan.initial_state(_z()), _z() * make_scheduler(train, sampler).init_noise_sigma
                       / ((torch.tensor(plan.steps[0].sigma_t) ** 2 + 1) ** 0.5))


def test_euler_on_a_ddpm_training_config_uses_its_betas_and_fractional_timesteps() -> None:
    train = DDPMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")
    plan = SamplingPlan.build(train, SamplerConfig("euler", num_steps=7))
    assert any(isinstance(step.t, float) for step in plan.steps)  # linspace over 999 in 7 steps is fractional
    assert plan.timesteps().dtype == torch.float32
    euler = make_scheduler(train, SamplerConfig("euler", num_steps=7))
    assert torch.equal(euler.alphas_cumprod, train.alphas_cumprod)
    seen = []

    def net(x, t, cond=None):
        seen.append(t)
        return torch.zeros_like(x)

    sample(net, plan, indices=[0], seed=0, sample_shape=SHAPE, progress=False)
    assert all(t.dtype == torch.float32 for t in seen) and float(seen[1][0]) == float(euler.timesteps[1])


# -- prediction types ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["euler", "dpmsolver++"])
def test_v_prediction_steps_match_diffusers_within_the_conversion_rounding(kind: str) -> None:
    """tadq converts v to ε (ᾱ = fl(1/(σ²+1))) before the step; diffusers converts v to x̂_0 directly. The two agree
    to the rounding of a dozen float32 operations on terms no larger than (|x| + |v|)(1 + σ): the bound below is
    32u of that, times the step's largest coefficient."""
    train = DDPMScheduler(prediction_type="v_prediction")
    sampler = SamplerConfig(kind, num_steps=10, order=1 if kind == "dpmsolver++" else None)
    scheduler = make_scheduler(train, sampler)
    generator = torch.Generator().manual_seed(1)
    for step, t in zip(step_contexts(scheduler, sampler), scheduler.timesteps, strict=True):
        x, v = torch.randn((3, *SHAPE), generator=generator), torch.randn((3, *SHAPE), generator=generator)
        c = math.sqrt(step.sigma_t**2 + 1)
        if kind == "euler":
            expected = scheduler.step(v, t, x * c).prev_sample / (1.0 if step.is_last else
                                                                   math.sqrt(step.sigma_prev**2 + 1))
        else:
            expected = scheduler.step(v, t, x).prev_sample
        got = sampler_step(x, to_epsilon(v, x, step), step)
        scale = max(abs(step.coef_x), abs(step.coef_eps), 1.0) * (x.abs() + v.abs()) * (1 + step.sigma_t)
        assert bool(((got - expected).abs() <= 32 * U * scale + 1e-30).all()), step.index


# -- linear form used by the corrections ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [SamplerConfig("euler", 10), SamplerConfig("dpmsolver++", 10, order=1),
                                     SamplerConfig("dpmsolver++", 20, order=2), SamplerConfig("flow-euler", 10)],
                         ids=lambda s: s.key)
def test_coefficients_state_the_update(sampler: SamplerConfig) -> None:
    """x' = A x + B ε (+ C_x x_before + C_ε ε_before for 2M): the (A, B) corrections use, checked in float64."""
    train = FlowMatchEulerDiscreteScheduler(shift=3.0) if sampler.kind == "flow-euler" else DDPMScheduler()
    steps = SamplingPlan.build(train, sampler).steps
    generator = torch.Generator().manual_seed(2)
    x_before = eps_before = previous = None
    for step in steps:
        x, eps = torch.randn((3, *SHAPE), generator=generator), torch.randn((3, *SHAPE), generator=generator)
        got = sampler_step(x, eps, step, previous=previous).double()
        terms = [step.coef_x * x.double(), step.coef_eps * eps.double()]
        if step.order == 2:
            terms += [step.coef_prev_x * x_before.double(), step.coef_prev_eps * eps_before.double()]
        else:
            assert step.coef_prev_x == 0.0 and step.coef_prev_eps == 0.0
        magnitude = sum(term.abs() for term in terms) * (1 + (step.sigma_t or 0.0))
        assert bool(((got - sum(terms)).abs() <= 64 * U * magnitude).all()), step.index
        x_before, eps_before = x, eps
        previous = data_prediction(x, eps, step) if sampler.kind == "dpmsolver++" else None
    assert (sampler.order == 2) == any(step.order == 2 for step in steps)


# -- keys and refusals ---------------------------------------------------------------------------------------------
def test_keys_are_distinct_per_kind_order_steps_and_shift() -> None:
    configs = [SamplerConfig("ddim", 20), SamplerConfig("ddim", 20, eta=1.0), SamplerConfig("ddpm", 20),
               SamplerConfig("euler", 20), SamplerConfig("euler", 30), SamplerConfig("euler-ancestral", 20),
               SamplerConfig("dpmsolver++", 20),
               SamplerConfig("dpmsolver++", 20, order=1), SamplerConfig("dpmsolver++", 30),
               SamplerConfig("flow-euler", 20), SamplerConfig("flow-euler", 20, shift=3.0),
               SamplerConfig("flow-euler", 20, flow_sigmas="uniform")]
    keys = [config.key for config in configs]
    assert len(set(keys)) == len(keys)
    assert SamplerConfig("ddim", 50).key == "ddim-50-eta0.0" and SamplerConfig("ddpm", 1000).key == "ddpm-1000"
    assert SamplerConfig("dpmsolver++", 20) == SamplerConfig("dpmsolver++", 20, order=2)
    assert SamplerConfig("euler", 20, order=1) == SamplerConfig("euler", 20)


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "euler", "euler-ancestral", "dpmsolver++"])
def test_a_flow_model_is_never_sampled_with_an_epsilon_kind(kind: str) -> None:
    with pytest.raises(NotImplementedError, match="flow"):
        SamplingPlan.build(FlowMatchEulerDiscreteScheduler(), SamplerConfig(kind, num_steps=4))
    with pytest.raises(NotImplementedError, match="flow"):
        SamplingPlan.build({**FlowMatchEulerDiscreteScheduler().config,
                            "_class_name": "FlowMatchEulerDiscreteScheduler"}, SamplerConfig(kind, num_steps=4))


def test_an_epsilon_model_is_never_sampled_with_flow_euler_and_flow_prediction_needs_a_flow_class() -> None:
    with pytest.raises(NotImplementedError, match="flow"):
        SamplingPlan.build(DDPMScheduler(), SamplerConfig("flow-euler", num_steps=4))
    with pytest.raises(NotImplementedError, match="flow_prediction"):
        SamplingPlan.build({**DDPMScheduler().config, "_class_name": "DDPMScheduler",
                            "prediction_type": "flow_prediction"}, SamplerConfig("ddim", num_steps=4))
    flow_step = SamplingPlan.build(FlowMatchEulerDiscreteScheduler(), SamplerConfig("flow-euler", 4)).steps[0]
    import dataclasses
    with pytest.raises(NotImplementedError, match="flow"):
        to_epsilon(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE), dataclasses.replace(flow_step, kind="ddim"))
    with pytest.raises(NotImplementedError, match="flow"):
        to_epsilon(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE),
                   dataclasses.replace(flow_step, prediction_type="epsilon"))
    velocity = torch.randn(1, *SHAPE)
    assert to_epsilon(velocity, torch.zeros(1, *SHAPE), flow_step) is velocity  # passed through, never converted


def test_dpmsolver_options_tadq_does_not_implement_are_refused() -> None:
    sampler = SamplerConfig("dpmsolver++", num_steps=10)
    with pytest.raises(NotImplementedError, match="thresholding"):
        SamplingPlan.build(DPMSolverMultistepScheduler(thresholding=True), sampler)
    with pytest.raises(NotImplementedError, match="midpoint"):
        SamplingPlan.build(DPMSolverMultistepScheduler(solver_type="heun"), sampler)
    with pytest.raises(NotImplementedError, match="use_flow_sigmas"):
        SamplingPlan.build(DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"),
                           sampler)
    step = SamplingPlan.build(DDPMScheduler(), sampler).steps[1]
    assert step.order == 2
    with pytest.raises(NotImplementedError, match="previous"):
        sampler_step(torch.zeros(1, *SHAPE), torch.zeros(1, *SHAPE), step)


class _Noisy(IdentityHooks):
    def noise_std(self, std, step):
        return std + 0.1


def test_a_noise_std_hook_cannot_add_noise_to_a_deterministic_ode_step() -> None:
    with pytest.raises(ValueError, match="deterministic"):
        _tadq_run(DDPMScheduler(), SamplerConfig("euler", num_steps=3), TinyNet(), hooks=[_Noisy()])


def test_default_sampler_follows_the_folder_class_and_refuses_where_tadq_has_none() -> None:
    from diffusers import PNDMScheduler

    from tadq.sampling import default_sampler

    assert default_sampler(EulerDiscreteScheduler(), 30) == SamplerConfig("euler", 30)
    assert default_sampler(EulerAncestralDiscreteScheduler(), 30) == SamplerConfig("euler-ancestral", 30)
    dpm = SamplerConfig("dpmsolver++", 20, order=1)
    assert default_sampler(DPMSolverMultistepScheduler(solver_order=1), 20) == dpm
    assert default_sampler(FlowMatchEulerDiscreteScheduler(), 28).kind == "flow-euler"
    assert default_sampler(DDPMScheduler()).kind == "ddpm"
    with pytest.raises(NotImplementedError, match="PNDMScheduler"):
        default_sampler(PNDMScheduler())
    with pytest.raises(NotImplementedError, match="solver_order=3"):
        default_sampler(DPMSolverMultistepScheduler(solver_order=3))


@pytest.mark.parametrize("sampler", [SamplerConfig("euler", 6), SamplerConfig("dpmsolver++", 6),
                                     SamplerConfig("flow-euler", 6)], ids=lambda s: s.key)
def test_a_bfloat16_run_keeps_the_model_dtype_and_follows_the_float32_run(sampler: SamplerConfig) -> None:
    """The updates run in float32 (as diffusers upcasts) and hand the state back in the model's dtype; a bfloat16
    run stays within a few bfloat16 ulps (2⁻⁸ relative) per step of the float32 one."""
    train = FlowMatchEulerDiscreteScheduler() if sampler.is_flow else DDPMScheduler()
    plan = SamplingPlan.build(train, sampler)
    net = TinyNet()
    options = {"indices": INDICES, "seed": SEED, "sample_shape": SHAPE, "progress": False, "record_trajectory": True}
    low = sample(net.to(torch.bfloat16), plan, dtype=torch.bfloat16, **options)
    full = sample(net.to(torch.float32), plan, **options).images
    assert low.trajectory.states.dtype == torch.bfloat16
    error = (low.images.float() - full).abs().max() / full.abs().max()
    assert float(error) < 4 * sampler.num_steps * 2.0**-8


def test_sharded_run_keys_tell_dpmsolver_orders_and_flow_shifts_apart_and_keep_ddim_keys() -> None:
    from tadq.distributed.key import run_key

    def key(sampler: SamplerConfig) -> dict:
        return run_key("m", "s", sampler, seed=0, sample_shape=SHAPE, batch_size=2, chunk_size=2,
                       record_trajectory=False, device_type="cpu")

    assert key(SamplerConfig("dpmsolver++", 20, order=1)) != key(SamplerConfig("dpmsolver++", 20, order=2))
    assert key(SamplerConfig("flow-euler", 20)) != key(SamplerConfig("flow-euler", 20, shift=3.0))
    assert key(SamplerConfig("ddim", 20))["sampler"] == {"kind": "ddim", "num_steps": 20, "eta": 0.0,
                                                         "clip_sample": None}


def test_the_cli_sampler_flag_builds_each_kind_with_its_own_defaults() -> None:
    from tadq.cli.sample import deployment_sampler

    assert deployment_sampler(None, "euler", 10, None) == SamplerConfig("euler", 10)
    assert deployment_sampler(None, "dpmsolver++", 20, None) == SamplerConfig("dpmsolver++", 20, order=2)
    assert deployment_sampler(None, "flow-euler", 28, None) == SamplerConfig("flow-euler", 28)
    with pytest.raises(ValueError, match="eta"):
        deployment_sampler(None, "euler", 10, 0.5)  # η is DDIM's alone: refused, not dropped


def _patched_noise(monkeypatch, noises: torch.Tensor) -> None:
    """Make diffusers' Euler ancestral draw tadq's per-sample step noise z_s (steps in order)."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    draws = iter(noises)
    monkeypatch.setattr(module, "randn_tensor", lambda shape, **kwargs: next(draws).to(kwargs.get("dtype")))


@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_ancestral_kernel_is_bit_identical_given_the_same_sample_and_noise(spacing: str, monkeypatch) -> None:
    sampler = SamplerConfig("euler-ancestral", num_steps=10)
    scheduler = make_scheduler(EulerAncestralDiscreteScheduler(timestep_spacing=spacing), sampler)
    generator = torch.Generator().manual_seed(0)
    steps = step_contexts(scheduler, sampler)
    noises = torch.randn((len(steps), 3, *SHAPE), generator=generator)
    _patched_noise(monkeypatch, noises)
    assert steps[0].std_dev_t > 0.5 and steps[-1].std_dev_t == 0.0
    for step, t in zip(steps, scheduler.timesteps, strict=True):
        x, eps = torch.randn((3, *SHAPE), generator=generator), torch.randn((3, *SHAPE), generator=generator)
        sigma, sigma_next = (torch.tensor(v, dtype=torch.float32) for v in (step.sigma_t, step.sigma_prev))
        expected = scheduler.step(eps, t, x * ((sigma**2 + 1) ** 0.5)).prev_sample
        if not step.is_last:
            expected = expected / ((sigma_next**2 + 1) ** 0.5)
        walker_std = torch.tensor(step.std_dev_t, dtype=torch.float32)  # what hooked_step passes without hooks
        assert torch.equal(euler_ancestral_step(x, eps, step, noise=noises[step.index], std=walker_std), expected)
        halved = euler_ancestral_step(x, eps, step, noise=noises[step.index], std=walker_std / 2)
        deterministic = euler_ancestral_step(x, eps, step, noise=noises[step.index], std=0.0)
        torch.testing.assert_close(halved, (expected + deterministic) / 2, atol=1e-5, rtol=1e-5)


def test_euler_ancestral_full_run_matches_diffusers_within_the_derived_bound(monkeypatch) -> None:
    train = EulerAncestralDiscreteScheduler(timestep_spacing="leading")
    sampler = SamplerConfig("euler-ancestral", num_steps=12)
    net = TinyNet()
    noises = step_noise(SEED, INDICES, sampler.num_steps, SHAPE)  # (S, B, C, H, W), what the walker adds
    _patched_noise(monkeypatch, noises)
    with torch.no_grad():
        reference, bound = _euler_bound(make_scheduler(train, sampler), net, _z(), noises)
    images = _tadq_run(train, sampler, net)
    difference = (images.double() - reference.double()).abs()
    assert bool((difference <= 1.5 * bound).all()), float((difference / bound).max())
    assert float(bound.max()) < 1e-3 * float(reference.abs().max())  # the noise kicks make intermediates larger
    deterministic = _tadq_run(train, SamplerConfig("euler", num_steps=12), net)
    assert float((images - deterministic).abs().max()) > 0.1  # the noise was really added
