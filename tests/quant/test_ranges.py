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
