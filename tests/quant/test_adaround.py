import torch

from tadq.quant import QScheme, Quantizer
from tadq.quant.adaround import AdaRound


def _weight_quantizer(weight):
    q = Quantizer(QScheme(bits=4, granularity="per_channel", range_method="minmax"), weight.shape[0], kind="weight")
    q.set_range(weight.flatten(1).min(1).values, weight.flatten(1).max(1).values)
    return q


def test_initial_soft_weight_equals_float_weight():
    w = torch.randn(6, 10)
    q = _weight_quantizer(w)
    q.rounding = AdaRound(w, q._broadcast(q.scale, w))
    codes = w / q.scale[:, None] + q.zero_point[:, None]
    inside = (codes > 0) & (codes < 15)  # the rounded zero point can push the extremes just off the grid
    assert inside.float().mean() > 0.8
    assert torch.allclose(q(w)[inside], w[inside], atol=1e-3 * q.scale.max().item())


def test_hard_rounding_is_floor_or_ceil_and_on_the_grid():
    w = torch.randn(6, 10)
    q = _weight_quantizer(w)
    nearest = q(w)
    q.rounding = AdaRound(w, q._broadcast(q.scale, w))
    q.rounding.hard = True
    hard = q(w)
    step = q.scale[:, None]
    assert torch.all((hard - w).abs() <= step + 1e-6)
    assert torch.equal(hard, nearest)  # V initialised at frac(W/Δ): hard rounding starts as nearest rounding
    q.rounding = None
    assert torch.equal(q(hard), hard)


def test_regularizer_vanishes_only_at_binary_h():
    w = torch.randn(4, 4)
    r = AdaRound(w, torch.ones(4, 1) * 0.1)
    assert r.regularizer(2.0) > 0
    with torch.no_grad():
        r.v.copy_(torch.where(r.v >= 0, 10.0, -10.0))
    assert r.regularizer(2.0).item() == 0.0
