import json

import pytest

from tadq.config import CalibrationConfig, QuantConfig, config_from_dict, config_to_dict
from tadq.sampling import SamplerConfig


def test_config_survives_json():
    config = QuantConfig.from_preset("W4A8", exclude=("conv_in",), keep_fp_roles=("output_conv",),
                                     calibration=CalibrationConfig(sampler=SamplerConfig(kind="ddim", num_steps=20,
                                                                                         eta=0.5),
                                                                 num_steps_kept=10))
    restored = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert restored == config


def test_label():
    assert QuantConfig.from_preset("W4A16").label == "W4A16"
    assert QuantConfig.from_preset("w8a8").label == "W8A8"


@pytest.mark.parametrize("payload", [
    {"type": "Nope", "version": 1, "data": {}},
    {"type": "QuantConfig", "version": 99, "data": {}},
    {"type": "QuantConfig", "version": 1, "data": {"bogus": 1}},
])
def test_bad_payload_raises(payload):
    with pytest.raises(ValueError):
        config_from_dict(payload)


def test_unknown_role_raises():
    with pytest.raises(ValueError, match="roles"):
        QuantConfig(keep_fp_roles=("decoder",))


def test_fp_layer_presets():
    assert QuantConfig.from_preset("W4A8", fp_layers="first_last").keep_fp_roles == ("input_conv", "output_conv")
    assert QuantConfig.from_preset("W4A8").keep_fp_roles == ()
    with pytest.raises(ValueError, match="first_last"):
        QuantConfig.from_preset("W4A8", fp_layers="everything")
