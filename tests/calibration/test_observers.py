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


def test_a_partial_last_batch_weighs_as_much_as_its_rows():
    """Calibration rows that batch_size does not divide end in a short batch. Its values must count in proportion
    to its size: kept at a full batch's count, 100 outliers (0.5 % of the data) made up 2.4 % of the samples and
    set the 99th-percentile range to the outlier."""
    from tadq.calibration.observers import RangeObserver

    generator = torch.Generator().manual_seed(0)
    observer = RangeObserver(QScheme(bits=8, range_method="percentile", percentile=99.0), values_per_batch=1000)
    full = [torch.randn(5000, generator=generator) for _ in range(4)]
    tail = torch.full((100,), 100.0)
    for batch in (*full, tail):
        observer.observe(batch)
    _, high = observer.range()
    assert float(high) < float(torch.cat(full).max())  # the 1 % tail cut removes the outliers
    equal = RangeObserver(QScheme(bits=8, range_method="percentile"), values_per_batch=1000)
    for batch in full:
        equal.observe(batch)
    assert [len(s) for s in equal.samples] == [1000] * 4  # equal batches: a full count each, as before


def test_an_infinite_activation_is_refused_naming_the_layer_whatever_the_range_method():
    """One overflowed activation among many: minmax and MSE ranges refused it, a percentile range accepted or
    refused it depending on whether the seeded subsample drew it (the observer's kept extreme alone sits above the
    interpolated quantile)."""
    import pytest

    x = torch.randn(1024, 64, generator=torch.Generator().manual_seed(0))
    x[7, 3] = float("inf")
    for method in ("minmax", "mse", "percentile"):
        for seed in range(4):
            layer = QuantLinear.from_module(nn.Linear(64, 4), QScheme(bits=8, granularity="per_channel"),
                                            QScheme(bits=8, range_method=method))
            with pytest.raises(ValueError, match=r"^activation range after calibration: input_quantizer: .*inf\]"):
                with Calibrate(layer, seed=seed):
                    layer(x)


def test_a_refused_layer_leaves_no_range_set_and_a_retry_recalibrates_every_layer():
    """An overflow in the second layer was refused after the first layer's range had been set from the failed pass;
    a plain ``Calibrate`` retry (which observes only uncalibrated layers) kept that stale range."""
    import pytest

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for index in range(2):
        model[index] = QuantLinear.from_module(model[index], QScheme(bits=8, granularity="per_channel"),
                                               QScheme(bits=8, range_method="minmax"))
    bad = torch.full((3, 4), 50.0)
    with pytest.raises(ValueError, match=r"^activation range after calibration: 1\.input_quantizer"):
        with Calibrate(model):
            model[0](bad)
            model[1](torch.tensor([[float("inf"), 0.0, 0.0, 0.0]]))
    assert [bool(model[i].input_quantizer.initialized) for i in range(2)] == [False, False]
    good = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    with Calibrate(model):
        model[0](good)
        model[1](good)
    expected = (good.max().clamp_min(0) - good.min().clamp_max(0)) / 255
    assert torch.allclose(model[0].input_quantizer.scale, expected.reshape(model[0].input_quantizer.scale.shape))


def test_a_small_first_batch_weighs_as_much_as_its_rows():
    """The mirror of the partial last batch: in a ``Calibrate`` loop whose first batch is the small one, that batch
    was the reference and kept all its values, while every later, larger batch was capped at the same count."""
    from tadq.calibration.observers import RangeObserver

    generator = torch.Generator().manual_seed(0)
    full = [torch.randn(5000, generator=generator) for _ in range(4)]
    head = torch.full((100,), 100.0)
    observer = RangeObserver(QScheme(bits=8, range_method="percentile", percentile=99.0), values_per_batch=1000)
    for batch in (head, *full):
        observer.observe(batch)
    _, high = observer.range()
    assert float(high) < float(torch.cat(full).max())  # 100 outliers in 20 100 values: the 1 % tail cut removes them
    assert observer.range()[1] == high  # reading the range twice gives the same range


def test_batches_in_tadqs_order_keep_the_samples_they_kept_before():
    """Largest batch first (tadq's own passes): no sample is cut again, so ranges are those of before."""
    from tadq.calibration.observers import RangeObserver

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(3000, generator=generator) for _ in range(3)] + [torch.randn(700, generator=generator)]
    observer = RangeObserver(QScheme(bits=4, range_method="mse"), values_per_batch=1000)
    for batch in batches:
        observer.observe(batch)
    assert [len(s) for s in observer._weighted_samples()] == [1000, 1000, 1000, 234]
    assert [s.data_ptr() for s in observer._weighted_samples()] == [s.data_ptr() for s in observer.samples]


def test_an_observer_moves_to_the_cpu_only_the_values_it_keeps(monkeypatch):
    """Each observed tensor was copied whole to the CPU before its 16384 kept values were drawn: on a GPU model,
    every layer's full input on every calibration forward. Only the extremes and the kept share may move now, and
    what is kept, and the range, are those of the whole tensor moved first."""
    from tadq.calibration.observers import RangeObserver

    moved = []
    cpu = torch.Tensor.cpu

    def spy(tensor, *args, **kwargs):
        moved.append(tensor.numel())
        return cpu(tensor, *args, **kwargs)

    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 500, generator=generator) for _ in range(3)] + [torch.randn(2, 500, generator=generator)]
    for method in ("mse", "percentile", "minmax"):
        scheme = QScheme(bits=8, range_method=method)
        observer, expected = RangeObserver(scheme, values_per_batch=300), RangeObserver(scheme, values_per_batch=300)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "cpu", spy)
            for batch in batches:
                observer.observe(batch)
        assert moved and max(moved) <= observer.values_per_batch, (method, max(moved))
        moved.clear()
        generator = expected.generator  # the same draws from indices made where the whole tensor was
        for batch in batches:
            flat = batch.reshape(-1)
            expected.low = flat.min() if expected.low is None else torch.minimum(expected.low, flat.min())
            expected.high = flat.max() if expected.high is None else torch.maximum(expected.high, flat.max())
            if method != "minmax":
                expected._reference = max(expected._reference or 1, flat.numel())
                keep = expected._share(flat.numel())
                expected._sizes.append(flat.numel())
                expected.samples.append(flat[torch.randint(0, flat.numel(), (keep,), generator=generator)])
        assert all(torch.equal(a, b) for a, b in zip(observer.samples, expected.samples, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(observer.range(), expected.range(), strict=True))
