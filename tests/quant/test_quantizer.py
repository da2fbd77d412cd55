"""``Quantizer``'s per-forward memo: whether a range is set and the fused kernel's (Δ, z) are remembered with the
buffers' identity and version counter, so a forward reads ``initialized`` back to the host once, not at every call
(a device sync per layer on a GPU), and anything that sets, loads, clears or moves a range is seen by the next
forward."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tadq.quant import QScheme, Quantizer

UNSET = "before its range was set"


def _quantizer(low: float = -1.0, high: float = 1.0, bits: int = 4, **scheme) -> Quantizer:
    quantizer = Quantizer(QScheme(bits=bits, range_method="minmax", **scheme))
    quantizer.set_range(torch.tensor([low]), torch.tensor([high]))
    return quantizer


def _reference(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """The fused kernel on the quantizer's current buffers, computed afresh (what a forward must return)."""
    scale = quantizer.scale.float().clamp_min(1e-8).reshape(())
    zero_point = quantizer.zero_point.to(torch.int32).reshape(())
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quantizer.scheme.qmin, quantizer.scheme.qmax)


@pytest.fixture
def reads(monkeypatch):
    """Counts ``bool()`` of each quantizer's ``initialized`` (the host read the memo saves), keyed by tensor id."""
    counts: dict[int, int] = {}
    original = torch.Tensor.__bool__

    def counting(tensor):
        counts[id(tensor)] = counts.get(id(tensor), 0) + 1
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting)
    return counts


def test_a_forward_reads_initialized_once_while_nothing_writes_it(reads):
    quantizer, x = _quantizer(), torch.linspace(-2, 2, 33)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(quantizer(x), _reference(quantizer, x))
    assert reads.get(id(quantizer.initialized)) == 1
    quantizer.set_range(torch.tensor([-0.5]), torch.tensor([0.5]))  # a write: the next forward reads it again
    with torch.no_grad():
        assert torch.equal(quantizer(x), _reference(quantizer, x))
        quantizer(x)
    assert reads[id(quantizer.initialized)] == 2


def test_a_range_set_or_written_after_a_forward_is_the_one_used():
    quantizer, x = _quantizer(), torch.linspace(-2, 2, 33)
    with torch.no_grad():
        before = quantizer(x)
        quantizer.set_range(torch.tensor([-0.5]), torch.tensor([0.5]))
        after = quantizer(x)
        assert not torch.equal(after, before) and torch.equal(after, _reference(quantizer, x))
        quantizer.scale.mul_(2)  # written in place, as BranchRanges and learned steps do
        assert torch.equal(quantizer(x), _reference(quantizer, x)) and not torch.equal(quantizer(x), after)
        quantizer.zero_point.fill_(3)
        assert torch.equal(quantizer(x), _reference(quantizer, x))


def test_a_state_loaded_into_a_fresh_quantizer_is_used_at_once():
    calibrated, x = _quantizer(-0.3, 0.7), torch.linspace(-2, 2, 33)
    fresh = Quantizer(calibrated.scheme)
    with torch.no_grad(), pytest.raises(RuntimeError, match=UNSET):
        fresh(x)
    fresh.load_state_dict(calibrated.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), calibrated(x))
    other = _quantizer(-1.5, 0.2)  # a used quantizer (its memo filled) takes another state
    with torch.no_grad():
        other(x)
        other.load_state_dict(calibrated.state_dict())
        assert torch.equal(other(x), calibrated(x))
    assigned = _quantizer(-1.5, 0.2)  # the state's own tensors: other objects, at the same version as the old ones
    with torch.no_grad():
        assigned(x)
        state = calibrated.state_dict()
        assert state["scale"]._version == assigned.scale._version
        assigned.load_state_dict(state, assign=True)
        assert assigned.scale is not None and torch.equal(assigned(x), calibrated(x))


def test_a_cleared_or_unset_state_is_refused_after_a_calibrated_forward():
    quantizer, x = _quantizer(), torch.linspace(-2, 2, 33)
    with torch.no_grad():
        quantizer(x)
        quantizer.initialized.fill_(False)  # reset in place
        with pytest.raises(RuntimeError, match=UNSET):
            quantizer(x)
    used = _quantizer()
    with torch.no_grad():
        used(x)
        used.load_state_dict(Quantizer(used.scheme).state_dict())  # an uncalibrated state loaded over it
        with pytest.raises(RuntimeError, match=UNSET):
            used(x)
    kept = _quantizer()  # a state dict edited in place shares the buffers' version counters
    with torch.no_grad():
        kept(x)
        kept.state_dict()["initialized"].fill_(False)
        with pytest.raises(RuntimeError, match=UNSET):
            kept(x)


def test_moved_copied_and_pickled_quantizers_read_their_own_buffers():
    quantizer, x = _quantizer(-0.3, 0.7), torch.linspace(-2, 2, 33)
    with torch.no_grad():
        quantizer(x)
        double = copy.deepcopy(quantizer).to(torch.float64)  # new buffers: Δ and z of the new dtype
        assert double.scale.dtype == torch.float64 and torch.equal(double(x), _reference(double, x))
        twin = copy.deepcopy(quantizer)
        twin.initialized.fill_(False)
        with pytest.raises(RuntimeError, match=UNSET):
            twin(x)
        assert torch.equal(quantizer(x), _reference(quantizer, x))  # the original is untouched
        # cleared after a forward, then copied: a copy's buffers start again at version 1, the version the
        # original's memo was taken at (set_range's fill_), so a memo carried into the copy would match them
        cleared = _quantizer()
        cleared(x)
        cleared.initialized.fill_(False)
        buffer = io.BytesIO()
        torch.save(cleared, buffer)
        buffer.seek(0)
        for twin in (copy.deepcopy(cleared), torch.load(buffer, weights_only=False)):
            with pytest.raises(RuntimeError, match=UNSET):
                twin(x)


def test_quantizers_built_in_inference_mode_still_check_their_range():
    x = torch.linspace(-2, 2, 33)
    with torch.inference_mode():  # inference tensors keep no version counter: read every time
        quantizer = Quantizer(QScheme(bits=4, range_method="minmax"))
        with pytest.raises(RuntimeError, match=UNSET):
            quantizer(x)
        quantizer.set_range(torch.tensor([-1.0]), torch.tensor([1.0]))
        assert torch.equal(quantizer(x), _reference(quantizer, x))
        quantizer.initialized.fill_(False)
        with pytest.raises(RuntimeError, match=UNSET):
            quantizer(x)
    used = _quantizer()
    with torch.no_grad():
        expected = used(x)
    with torch.inference_mode():  # a normal quantizer used inside inference mode, then outside it
        assert torch.equal(used(x), expected)
    with torch.no_grad():
        assert torch.equal(used(x), expected)
