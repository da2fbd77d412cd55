import pytest
import torch
from tests.dtype_probe import DtypeRecorder
from torch.utils._python_dispatch import TorchDispatchMode

from tadq.quant import QScheme, fake_quantize, minmax_range, mse_range, percentile_range, scale_and_zero_point


def _error(x, low, high, scheme, p=2.4):
    scale, zp = scale_and_zero_point(low, high, scheme.bits, scheme.symmetric)
    return (x - fake_quantize(x, scale[:, None], zp[:, None], scheme.qmin, scheme.qmax)).abs().pow(p).mean(dim=1)


def test_mse_range_never_worse_than_minmax_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 200) * torch.linspace(0.1, 3, 16)[:, None]
    w[0, 0] = 40.0  # an outlier that minmax must cover
    scheme = QScheme(bits=4, granularity="per_channel", range_method="mse")
    mse_err = _error(w, *mse_range(w, scheme, per_channel=True), scheme)
    mm_err = _error(w, *minmax_range(w, per_channel=True), scheme)
    assert torch.all(mse_err <= mm_err + 1e-9)
    assert mse_err[0] < mm_err[0]  # the outlier channel gains


def test_percentile_range_inside_minmax():
    x = torch.randn(1, 10000)
    low, high = percentile_range(x, 99.0)
    mlow, mhigh = minmax_range(x)
    assert mlow <= low < high <= mhigh


def test_mse_range_of_huge_values_is_the_scaled_range_of_ordinary_ones():
    """|x − Q(x)|^2.4 overflowed float32 past ~1e16, every shrink factor's error was inf and min/max was kept.
    Scaling by a power of two is exact, so 2^k·x must choose exactly 2^k times x's range (channels' |x| in
    [1, 2), where the search divides huge values back down to them)."""
    torch.manual_seed(1)
    x = torch.randn(6, 300) * 0.3
    x[:, 0] = 1.5  # an outlier per channel: mse shrinks below it
    scheme = QScheme(bits=4, granularity="per_channel", range_method="mse")
    low, high = mse_range(x, scheme, per_channel=True)
    assert torch.all(high < 1.5)
    factor = 2.0 ** 70  # ~1.2e21
    huge_low, huge_high = mse_range(x * factor, scheme, per_channel=True)
    assert torch.equal(huge_low, low * factor) and torch.equal(huge_high, high * factor)


class _NewTensorsOfSize(TorchDispatchMode):
    """Counts the ops that return a new tensor of ``numel`` elements (not an in-place or ``out=`` write)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        writes = func._schema.name.endswith("_") or "out" in kwargs
        if not writes and isinstance(result, torch.Tensor) and result.numel() == self.numel:
            self.count += 1
        return result


@pytest.mark.parametrize("per_channel, scale", [(False, 1.0), (True, 1.0), (True, 2.0**70)])
def test_mse_range_allocates_no_whole_tensor_per_candidate(per_channel, scale):
    """Each of the 80 candidates allocated a dozen temporaries the size of the observed values (the search was most
    of a naive quantization's time): the whole-tensor allocations must not grow with the grid, and the range must be
    the composed expression's, bit for bit."""
    torch.manual_seed(2)
    x = torch.randn(4, 257) * scale
    x[:, 0] = 3.0 * scale

    def reference(scheme):
        flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
        low0, high0 = flat.min(dim=1).values, flat.max(dim=1).values
        best = (torch.full_like(low0, float("inf")), low0, high0)
        for i in range(scheme.mse_grid):
            low, high = low0 * (1.0 - 0.01 * i), high0 * (1.0 - 0.01 * i)
            err = _error(flat, low, high, scheme, scheme.mse_p)
            better = err < best[0]
            best = tuple(torch.where(better, new, old) for new, old in zip((err, low, high), best, strict=True))
        return best[1:]

    counts = []
    for grid in (10, 80):
        scheme = QScheme(bits=4, granularity="per_channel" if per_channel else "per_tensor", range_method="mse",
                         mse_grid=grid)
        with _NewTensorsOfSize(x.numel()) as counter:
            got = mse_range(x, scheme, per_channel=per_channel)
        counts.append(counter.count)
        if scale == 1.0:  # (huge values: the search's error unit, test above)
            assert all(torch.equal(a, b) for a, b in zip(got, reference(scheme), strict=True))
    assert counts[0] == counts[1] <= 3, counts


@pytest.mark.parametrize("long_rows", [False, True])
def test_percentile_range_stays_on_the_tensors_device(long_rows, monkeypatch):
    """The quantile levels were built on the CPU: a weight on a GPU with range_method="percentile" raised in
    torch.quantile ("q tensor must be on the same device"), and the long-row path mixed devices in its lerp. A
    tensor on the meta device refuses a CPU operand the same way."""
    if long_rows:  # rows longer than torch.quantile takes: the sort-and-interpolate path
        monkeypatch.setattr("tadq.quant.ranges.QUANTILE_MAX", 8)
    x = torch.randn(3, 40)
    expected = percentile_range(x, 99.0, per_channel=True)
    low, high = percentile_range(x.to("meta"), 99.0, per_channel=True)
    assert low.device.type == high.device.type == "meta"
    assert low.shape == expected[0].shape and high.shape == expected[1].shape


@pytest.mark.parametrize("p", [2.4, 2.0, 1.0, 0.5, 3.7, 64 / 27, 64 / 26.999999999, 1e-3, 100.0])
def test_error_unit_needs_no_float64_and_keeps_its_choice(p):
    """The error unit's overflow test was a float64 product on the amax's device: MPS has no float64, so every
    mse range (the default weight range) raised there. It is an integer comparison now, with the float64
    product's answer at every float32 exponent (checked here against that product)."""
    from tadq.quant.ranges import ERROR_HEADROOM_BITS, _error_unit

    exponents = torch.arange(-149, 129, dtype=torch.int32)
    amax = torch.ldexp(torch.full(exponents.shape, 0.75), exponents)
    amax = torch.cat([amax, torch.tensor([0.0, float("inf"), float("nan"), torch.finfo(torch.float32).max])])
    _, exponent = torch.frexp(amax)
    overflows = torch.isfinite(amax) & ((exponent + 1).double() * p > ERROR_HEADROOM_BITS)
    expected = torch.where(overflows, torch.ldexp(torch.ones_like(amax), exponent - 1), torch.ones_like(amax))
    assert torch.equal(_error_unit(amax, p), expected)
    with DtypeRecorder() as recorder:
        _error_unit(amax, p)
    assert not recorder.float64_ops()


@pytest.mark.parametrize("long_rows", [False, True])
def test_percentile_range_makes_no_float64_tensor_on_the_device(long_rows, monkeypatch):
    """The long-row quantile's ranks were float64 on the values' device, which MPS refuses; they are computed on the
    CPU (a few numbers) and only the indices and weights move (meta stands in for the device here)."""
    if long_rows:
        monkeypatch.setattr("tadq.quant.ranges.QUANTILE_MAX", 8)
    x = torch.randn(3, 40)
    with DtypeRecorder() as recorder:
        percentile_range(x.to("meta"), 99.0, per_channel=True)
    assert not recorder.float64_ops("meta")
