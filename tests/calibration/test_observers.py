import torch
from torch import nn

from tadq.calibration import Calibrate, activation_quantizers
from tadq.quant import QScheme, QuantLinear


def test_calibrate_sets_ranges_only_on_clean_exit():
    layer = QuantLinear.from_module(nn.Linear(4, 4), QScheme(bits=8, granularity="per_channel"),
                                    QScheme(bits=8, range_method="minmax"))
    try:
        with Calibrate(layer):
            layer(torch.randn(3, 4))
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert not bool(layer.input_quantizer.initialized)
    x = torch.randn(64, 4)
    with Calibrate(layer):
        out_fp = layer(x)  # observation passes values through unquantized
    assert torch.allclose(out_fp, nn.functional.linear(x, layer.quantized_weight(), layer.bias))
    assert bool(layer.input_quantizer.initialized)
    scale = layer.input_quantizer.scale.item()
    assert abs(scale - (x.max().clamp_min(0) - x.min().clamp_max(0)).item() / 255) < 1e-6


def test_mse_calibration_is_reproducible():
    def run():
        layer = QuantLinear.from_module(nn.Linear(8, 8), QScheme(bits=8, granularity="per_channel"),
                                        QScheme(bits=4, range_method="mse"))
        with Calibrate(layer, seed=3):
            for i in range(3):
                layer(torch.randn(512, 8, generator=torch.Generator().manual_seed(i)))
        return layer.input_quantizer.scale.clone()

    torch.manual_seed(0)
    assert torch.equal(run(), run())


def test_activation_quantizers_skips_disabled():
    layer = QuantLinear.from_module(nn.Linear(4, 4), QScheme(bits=8, granularity="per_channel"), QScheme.off())
    assert activation_quantizers(layer) == {}


def test_a_layer_the_calibration_never_reached_is_named():
    """A branch the calibration forwards skip (a UNet input the adapter does not pass) fails naming the layer."""
    import pytest

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for index in range(2):
        model[index] = QuantLinear.from_module(model[index], QScheme(bits=8, granularity="per_channel"),
                                               QScheme(bits=8, range_method="minmax"))
    with pytest.raises(RuntimeError, match=r"^1\.input_quantizer: observer saw no data"):
        with Calibrate(model):
            model[0](torch.randn(3, 4))
