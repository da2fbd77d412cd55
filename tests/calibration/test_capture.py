"""Capturing several units in one pass must give exactly what one unit at a time gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tadq.calibration.capture import capture_unit_io, capture_units_io


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x, t, cond):
        del cond
        self.calls += 1
        h = self.a(x + t[:, None])
        return self.c(torch.relu(self.b(h)))


def test_several_units_in_one_pass_equal_one_unit_at_a_time():
    model = _Chain()
    x, t = torch.randn(10, 4), torch.arange(10).float()
    together = capture_units_io(model, [model.a, model.b], x, t, batch_size=4)
    for module, io in zip([model.a, model.b], together, strict=True):
        alone = capture_unit_io(model, module, x, t, batch_size=4)
        assert torch.equal(io.output, alone.output)
        assert torch.equal(io.args[0], alone.args[0])


def test_a_pass_stops_after_the_last_unit_and_an_unused_unit_raises():
    model = _Chain()
    x, t = torch.randn(8, 4), torch.zeros(8)
    stopped = []
    model.c.register_forward_hook(lambda *_: stopped.append(True))
    capture_units_io(model, [model.a, model.b], x, t, batch_size=4)
    assert not stopped  # c comes after the last captured unit: never run
    with pytest.raises(RuntimeError, match="never fired"):
        capture_units_io(model, [model.a, nn.Linear(2, 2)], x, t, batch_size=4)


def test_a_failing_forward_leaves_no_hook_attached():
    """A forward that raises part-way (the second batch here) must not leave the capture hooks on the modules: a
    later plain forward would still record into, or stop at, a capture that is over."""
    model = _Chain()
    x, t = torch.randn(8, 4), torch.zeros(8)

    def failing(x, t, cond):
        if model.calls == 1:
            model.calls += 1
            raise ValueError("out of memory")
        return model(x, t, cond)

    with pytest.raises(ValueError, match="out of memory"):
        capture_units_io(failing, [model.a, model.b], x, t, batch_size=4)
    assert not model.a._forward_hooks and not model.b._forward_hooks
    assert torch.equal(model(x, t, None), model(x, t, None))  # runs to its end: no _StopForward raised
