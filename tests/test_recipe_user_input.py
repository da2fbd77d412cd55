"""Recipes and configs as a user writes them by hand: what a JSON reader would otherwise take silently or refuse
without naming the file (a key given twice, a field beside ``data``, a file in another encoding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tadq.cli.quantize import QuantFlags, parse_settings, resolve_recipe
from tadq.config import QuantConfig, config_from_dict, config_to_dict
from tadq.recipe import Recipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "recipes" / "qdiffusion+tac+tcec-W4A8.json"


def test_recipe_key_given_twice_is_refused_naming_the_key(tmp_path):
    """json.loads keeps the last of two equal keys: the hand-added ``"bits": 4`` above the file's own
    ``"bits": 8`` was dropped and the recipe quantized at 8 bits without a word."""
    text = SHIPPED.read_text()
    assert text.count('"bits": 4,') == 1
    edited = text.replace('"bits": 4,', '"bits": 4, "bits": 8,', 1)
    (tmp_path / "r.json").write_text(edited)
    with pytest.raises(ValueError, match=r"'bits' appears twice") as error:
        load_recipe(tmp_path / "r.json")
    assert str(tmp_path / "r.json") in str(error.value)


def test_config_file_key_given_twice_is_refused(tmp_path):
    body = json.dumps(config_to_dict(QuantConfig()))
    (tmp_path / "c.json").write_text(body.replace('"split_shortcut": false', '"split_shortcut": true, '
                                                  '"split_shortcut": false', 1))
    with pytest.raises(ValueError, match=r"'split_shortcut' appears twice"):
        resolve_recipe(None, tmp_path / "c.json", QuantFlags())


def test_set_value_with_a_key_given_twice_is_refused():
    value = '{"type": "QScheme", "version": 1, "data": {"bits": 4, "bits": 8}}'
    with pytest.raises(ValueError, match=r"--set .*'bits' appears twice"):
        parse_settings([f"weights={value}"])


@pytest.mark.parametrize("where", ["top", "nested"])
def test_field_beside_data_is_refused_not_ignored(where):
    """A field written next to ``data`` (``{"type": "QScheme", "version": 1, "data": {...}, "bits": 4}``) was
    ignored: the scheme kept its 8 bits."""
    payload = config_to_dict(Recipe.from_preset("W8A8"))
    if where == "top":
        payload["name"] = "mine"
        expected = r"Recipe has keys \['name'\] beside"
    else:
        payload["data"]["weights"]["bits"] = 4
        expected = r"Recipe.weights: QScheme has keys \['bits'\] beside"
    with pytest.raises(ValueError, match=expected):
        recipe_from_dict(payload)


def test_written_configs_have_nothing_beside_data():
    """What tadq writes reads back (the check refuses only hand-written keys)."""
    recipe = load_recipe(SHIPPED)
    assert config_from_dict(config_to_dict(recipe)) == recipe


def test_recipe_not_utf8_names_the_file(tmp_path):
    """A recipe saved as UTF-16 (a Windows editor) raised a bare UnicodeDecodeError naming neither file nor fix."""
    (tmp_path / "r.json").write_bytes(SHIPPED.read_text().encode("utf-16"))
    with pytest.raises(ValueError, match="not UTF-8") as error:
        load_recipe(tmp_path / "r.json")
    assert str(tmp_path / "r.json") in str(error.value)


def test_recipe_that_is_a_device_is_refused(tmp_path):
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    with pytest.raises(ValueError, match="not a regular file"):
        load_recipe("/dev/null")


def test_tfmq_recipe_with_two_deployments_is_refused():
    """TFMQ's per-step tables are built for the first deployment's sampler and tadq sample refuses any other: a
    second deployment could never be used, yet the recipe was accepted (a correction stack was already refused)."""
    from tadq.recipe import Deployment
    from tadq.sampling import SamplerConfig
    from tadq.tfmq import TFMQMethod

    two = (Deployment(), Deployment(SamplerConfig(kind="ddim", num_steps=20, eta=0.0)))
    with pytest.raises(ValueError, match="2 deployments and method TFMQMethod"):
        Recipe.from_preset("W4A8", method=TFMQMethod(), deployments=two)
    with pytest.raises(ValueError, match="2 deployments and method TFMQMethod"):
        resolve_recipe(SHIPPED, None, QuantFlags(method="tfmq", correct=()),
                       {"deployments": [config_to_dict(d) for d in two]})
    assert len(Recipe.from_preset("W4A8", deployments=two).deployments) == 2  # a plain method: both kept


def _quantize_cli(tmp_path, model_dir, *args):
    from typer.testing import CliRunner

    from tadq.cli.app import app

    result = CliRunner().invoke(app, ["quantize", str(model_dir), "--out", str(tmp_path / "q"), "--cache-dir",
                                      str(tmp_path / "cache"), "--steps", "2", "--calib-trajectories", "2", *args])
    return result, " ".join((result.output + " " + repr(result.exception)).split())


def test_keep_fp_role_no_layer_has_is_refused_before_calibration(tmp_path, tiny_model_dir, monkeypatch):
    """``--keep-fp-role class_embedding`` on an unconditional UNet kept nothing in floating point and quantized the
    whole model without a word."""
    import tadq.methods

    def refuse(*args, **kwargs):
        raise RuntimeError("CALIBRATION STARTED")

    monkeypatch.setattr(tadq.methods, "collect_calibration_set", refuse)
    result, text = _quantize_cli(tmp_path, tiny_model_dir, "--keep-fp-role", "input_conv", "--keep-fp-role",
                                 "class_embedding")
    assert "CALIBRATION STARTED" not in text
    assert result.exit_code == 2, text
    assert "--keep-fp-role ['class_embedding']" in text and "input_conv" in text  # its roles are listed
    assert not (tmp_path / "q").exists()
    result, text = _quantize_cli(tmp_path, tiny_model_dir, "--keep-fp-role", "input_conv")
    assert "CALIBRATION STARTED" in text  # a role the model has passes the check


def test_config_without_post_init_checks_its_fields():
    """A dataclass's generated __init__ calls __post_init__ only if the class had one when it was made: the field
    checks registration installs never ran for QDiffusionMethod or a user's method config (docs/recipes.md says
    every registered config's fields are checked)."""
    import dataclasses

    from tadq.config import register_config_type
    from tadq.recipe import QDiffusionMethod
    from tadq.registry import registered_config_types

    with pytest.raises(ValueError, match=r"QDiffusionMethod\.reconstruction must be a config object"):
        QDiffusionMethod(reconstruction={"weight_iters": 5})

    @dataclasses.dataclass(frozen=True)
    class UserHuntMethodConfig:
        iters: int = 3

    register_config_type(UserHuntMethodConfig)
    try:
        with pytest.raises(ValueError, match=r"UserHuntMethodConfig\.iters must be an int"):
            UserHuntMethodConfig(iters=2.5)
        assert UserHuntMethodConfig(iters=4).iters == 4
        assert dataclasses.replace(UserHuntMethodConfig(), iters=5).iters == 5
    finally:  # the table is process-wide: other tests list it
        registered_config_types().pop("UserHuntMethodConfig")
