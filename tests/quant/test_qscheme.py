import dataclasses

import pytest

from tadq.quant import PRESETS, QScheme, preset


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0, True])
def test_bits_outside_2_to_8_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        QScheme(bits=bits)


def test_off_scheme_is_disabled():
    assert not QScheme.off().enabled
    with pytest.raises(ValueError):
        _ = QScheme.off().qmax


def test_grids():
    assert (QScheme(bits=4).qmin, QScheme(bits=4).qmax) == (0, 15)
    assert (QScheme(bits=4, symmetric=True).qmin, QScheme(bits=4, symmetric=True).qmax) == (-8, 7)


def test_presets():
    weights, activations = preset("w4a8")
    assert (weights.bits, activations.bits) == (4, 8)
    assert weights.granularity == "per_channel" and activations.granularity == "per_tensor"
    assert not preset("W4A16")[1].enabled
    assert set(PRESETS) >= {"W8A8", "W4A8", "W4A4", "W4A16", "W8A8-WSYM"}
    symmetric, activations_sym = preset("w8a8-wsym")
    assert symmetric.symmetric and (symmetric.qmin, symmetric.qmax) == (-128, 127)
    assert symmetric == dataclasses.replace(preset("W8A8")[0], symmetric=True)  # only the weight grid differs
    assert activations_sym == preset("W8A8")[1]


def test_unknown_preset_raises_with_choices():
    with pytest.raises(ValueError, match="W4A8"):
        preset("W3A5")


@pytest.mark.parametrize("kwargs", [{"granularity": "per_row"}, {"range_method": "kl"}, {"percentile": 10.0},
                                    {"mse_grid": 0}])
def test_bad_fields_raise(kwargs):
    with pytest.raises(ValueError):
        QScheme(**kwargs)
