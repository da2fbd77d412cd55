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
    assert QuantConfig.from_preset("W8A8-WSYM").label == "W8A8-WSYM"  # a different model: its rows must not merge


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


def test_fp_layers_and_keep_fp_roles_given_together_are_merged_and_checked():
    """fp_layers used to replace keep_fp_roles given beside it: the roles were dropped (every layer quantized) and an
    unknown role name was never checked."""
    both = QuantConfig.from_preset("W8A8", fp_layers="first_last", keep_fp_roles=("attention_qkv", "input_conv"))
    assert both.keep_fp_roles == ("input_conv", "output_conv", "attention_qkv")
    assert QuantConfig.from_preset("W8A8", fp_layers="none", keep_fp_roles=("attention_qkv",)).keep_fp_roles == (
        "attention_qkv",)
    with pytest.raises(ValueError, match="no_such_role"):
        QuantConfig.from_preset("W8A8", fp_layers="none", keep_fp_roles=("no_such_role",))
    with pytest.raises(TypeError, match="tuple of role names"):
        QuantConfig.from_preset("W8A8", fp_layers="none", keep_fp_roles="attention_qkv")


def test_layer_bits_survive_json_and_a_version_2_payload_means_none():
    config = QuantConfig.from_preset("W4A8", layer_bits=(("conv_in", 8, 8), ("conv_out", 6, 4)))
    payload = json.loads(json.dumps(config_to_dict(config)))
    assert payload["version"] == 3 and payload["data"]["layer_bits"] == [["conv_in", 8, 8], ["conv_out", 6, 4]]
    assert config_from_dict(payload) == config
    old = json.loads(json.dumps(config_to_dict(QuantConfig.from_preset("W4A8"))))
    old["version"] = 2
    del old["data"]["layer_bits"]
    assert config_from_dict(old) == QuantConfig.from_preset("W4A8")


@pytest.mark.parametrize(("preset_name", "layer_bits", "message"), [
    ("W4A8", (("conv_in", 8, 8), ("conv_in", 6, 6)), "more than once"),
    ("W4A8", (("conv_in", 9, 8),), "weight bits must be an integer in 2..8"),
    ("W4A8", (("conv_in", 8, 1),), "activation bits must be an integer in 2..8"),
    ("W4A8", (("conv_in", True, 8),), "weight bits"),
    ("W4A8", (("conv_in", 8, None),), "activation bits"),
    ("W4A16", (("conv_in", 8, 8),), "activations are off"),
    ("W4A8", (("conv_in", 8),), "entries are"),
    ("W4A8", (("", 8, 8),), "entries are"),
])
def test_bad_layer_bits_raise(preset_name, layer_bits, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.from_preset(preset_name, layer_bits=layer_bits)


def test_weight_only_layer_bits_leave_activations_off():
    assert QuantConfig.from_preset("W4A16", layer_bits=(("conv_in", 8, None),)).layer_bits == (("conv_in", 8, None),)


def test_reconstruction_rounding_survives_json_and_a_version_1_payload_means_adaround():
    from tadq.config import ReconstructionConfig

    config = QuantConfig.from_preset("W4A8", method="qdiffusion", reconstruction=ReconstructionConfig(
        rounding="gptq_adaround", gptq_damp=0.05, gptq_act_order=False, gptq_inputs=128))
    payload = json.loads(json.dumps(config_to_dict(config)))
    assert payload["data"]["reconstruction"]["version"] == 4
    assert config_from_dict(payload) == config
    old = json.loads(json.dumps(config_to_dict(QuantConfig.from_preset("W4A8", method="qdiffusion"))))
    old["data"]["reconstruction"]["version"] = 1
    for name in ("rounding", "gptq_damp", "gptq_target_damp", "gptq_target_prior", "gptq_act_order", "gptq_target",
                 "gptq_inputs"):
        del old["data"]["reconstruction"]["data"][name]
    restored = config_from_dict(old)
    assert restored.reconstruction.rounding == "adaround" and restored == QuantConfig.from_preset(
        "W4A8", method="qdiffusion", reconstruction=ReconstructionConfig(rounding="adaround", gptq_target_damp=None,
                                                                         gptq_target_prior="zero"))


def test_a_version_2_reconstruction_solves_the_fp_output_target_with_gptq_damp():
    """Files written before gptq_target_damp existed solved W* with gptq_damp: they load as exactly that."""
    from tadq.config import ReconstructionConfig

    tuned = QuantConfig.from_preset("W8A8", method="qdiffusion",
                                    reconstruction=ReconstructionConfig(gptq_target_damp=1e-4))
    payload = json.loads(json.dumps(config_to_dict(tuned)))
    assert config_from_dict(payload).reconstruction.gptq_target_damp == 1e-4
    payload["data"]["reconstruction"]["version"] = 2
    del payload["data"]["reconstruction"]["data"]["gptq_target_damp"]
    del payload["data"]["reconstruction"]["data"]["gptq_target_prior"]
    assert config_from_dict(payload).reconstruction.gptq_target_damp is None


def test_a_version_3_reconstruction_shrinks_the_fp_output_target_toward_zero():
    """Files written before gptq_target_prior existed solved W* with the plain ridge (toward zero): they load as
    that, while a new config shrinks toward W."""
    from tadq.config import ReconstructionConfig

    assert ReconstructionConfig().gptq_target_prior == "weight"
    payload = json.loads(json.dumps(config_to_dict(QuantConfig.from_preset("W8A8", method="qdiffusion"))))
    assert config_from_dict(payload).reconstruction.gptq_target_prior == "weight"
    payload["data"]["reconstruction"]["version"] = 3
    del payload["data"]["reconstruction"]["data"]["gptq_target_prior"]
    assert config_from_dict(payload).reconstruction.gptq_target_prior == "zero"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rounding", "brecq", "rounding must be"), ("gptq_damp", 0.0, "gptq_damp"), ("gptq_inputs", -1, "gptq_inputs"),
    ("gptq_target_damp", 0.0, "gptq_target_damp"), ("gptq_target_damp", True, "gptq_target_damp"),
    ("gptq_target_prior", "mean", "gptq_target_prior"),
])
def test_bad_reconstruction_rounding_fields_raise(field, value, message):
    from tadq.config import ReconstructionConfig

    with pytest.raises(ValueError, match=message):
        ReconstructionConfig(**{field: value})


@pytest.mark.parametrize("field", ["keep_fp_roles", "exclude", "layer_bits"])
@pytest.mark.parametrize("make", ["QuantConfig", "Recipe"])
def test_a_string_given_for_a_list_field_is_refused_as_a_string_not_by_its_letters(make, field):
    """``keep_fp_roles="input_conv"`` was refused as 'unknown roles ['i', 'n', 'p', ...]' and ``layer_bits="conv_in"``
    as 'entries are (layer name, ...), got 'c'': the class's own check, which wins over the field-type check, ran
    on the string's letters. The message names the field and the string."""
    from tadq.recipe import Recipe

    klass = {"QuantConfig": QuantConfig, "Recipe": Recipe}[make]
    with pytest.raises(ValueError, match=rf"{make}\.{field} .*the string 'input_conv'"):
        klass(**{field: "input_conv"})


def test_from_preset_takes_a_field_of_the_preset_as_recipe_from_preset_does():
    """``QuantConfig.from_preset("W8A8", weights=...)`` raised "got multiple values for keyword argument 'weights'"
    where ``Recipe.from_preset`` replaces the preset's field with the one given."""
    from tadq.quant.qscheme import QScheme
    from tadq.recipe import Recipe

    weights = QScheme(bits=6, symmetric=True, granularity="per_channel")
    config = QuantConfig.from_preset("W8A8", weights=weights)
    assert config.weights == weights == Recipe.from_preset("W8A8", weights=weights).weights
    assert config.activations == QuantConfig.from_preset("W8A8").activations
