import torch

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
