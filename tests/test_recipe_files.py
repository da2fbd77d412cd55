"""The hand-edited recipe / config layer: ``Recipe``, ``QuantConfig``, the nested configs, presets,
``override_recipe`` / ``--set``, the quantize flags on top of ``--recipe``, and JSON round trips.

Contract checked (docs/recipes.md and the brief): every field refuses a wrong type, NaN/inf, an out-of-range value
and an unknown key with a ``ValueError`` that names the field, before any model is loaded; ints where floats are
expected behave like the float; bools never pass as ints; a saved recipe loads equal and re-saves byte-identically."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tadq.cli.app import app
from tadq.cli.quantize import QuantFlags, parse_settings, resolve_recipe
from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig, config_from_dict, config_to_dict
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.quant.qscheme import PRESETS
from tadq.recipe import (
    Deployment,
    QDiffusionMethod,
    Recipe,
    load_recipe,
    override_recipe,
    recipe_from_dict,
    save_recipe,
)
from tadq.sampling import SamplerConfig
from tadq.svdquant import SVDQuantMethod
from tadq.tfmq import TFMQMethod

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
SHIPPED = RECIPES / "qdiffusion+tac+tcec-W4A8.json"
NAN, INF = math.nan, math.inf
runner = CliRunner()


def _payload() -> dict:
    return json.loads(SHIPPED.read_text())


def _node(payload: dict, where: str) -> dict:
    """The ``data`` dict of one config inside a recipe payload."""
    data = payload["data"]
    return {
        "recipe": data,
        "weights": data["weights"]["data"],
        "activations": data["activations"]["data"],
        "calibration": data["calibration"]["data"],
        "reconstruction": data["method"]["data"]["reconstruction"]["data"],
        "deployment": data["deployments"][0]["data"],
        "sampler": data["deployments"][0]["data"]["sampler"]["data"],
        "tac": data["corrections"][0]["data"],
        "tcec": data["corrections"][1]["data"],
    }[where]


def _edited(where: str, field: str, value) -> dict:
    payload = _payload()
    _node(payload, where)[field] = value
    return payload


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


# ----------------------------------------------------------------------------------------------------------------
# 1. every field of a hand-written recipe refuses a bad value with a ValueError naming the field
# ----------------------------------------------------------------------------------------------------------------
BAD_VALUES = [
    # QScheme
    ("weights", "symmetric", 1),
    ("weights", "symmetric", "yes"),
    ("weights", "mse_p", NAN),
    ("weights", "mse_p", INF),
    ("weights", "mse_grid", 50.5),
    ("weights", "mse_grid", True),
    ("weights", "percentile", "99.9"),
    ("activations", "symmetric", "false"),
    # CalibrationConfig
    ("calibration", "num_trajectories", NAN),
    ("calibration", "num_trajectories", INF),
    ("calibration", "num_trajectories", 100.5),
    ("calibration", "num_trajectories", "256"),
    ("calibration", "samples_per_step", True),
    ("calibration", "num_steps_kept", 2.5),
    ("calibration", "batch_size", 1.5),
    ("calibration", "batch_size", True),
    # ReconstructionConfig
    ("reconstruction", "weight_iters", 2.5),
    ("reconstruction", "weight_iters", True),
    ("reconstruction", "weight_iters", NAN),
    ("reconstruction", "activation_iters", INF),
    ("reconstruction", "batch_size", True),
    ("reconstruction", "beta_start", INF),
    ("reconstruction", "beta_start", NAN),
    ("reconstruction", "rounding_weight", NAN),
    ("reconstruction", "rounding_weight", INF),
    ("reconstruction", "weight_lr", NAN),
    ("reconstruction", "weight_lr", INF),
    ("reconstruction", "activation_lr", NAN),
    ("reconstruction", "activation_p", NAN),
    ("reconstruction", "gptq_damp", INF),
    ("reconstruction", "gptq_target_damp", INF),
    ("reconstruction", "gptq_act_order", "no"),
    ("reconstruction", "gptq_inputs", 2.5),
    ("reconstruction", "warmup", "0.2"),
    # Recipe / QuantConfig structural fields
    ("recipe", "split_shortcut", "yes"),
    ("recipe", "quantize_attention", 1),
    ("recipe", "branch_ranges", "no"),
    ("recipe", "softmax_bits", 8.5),
    ("recipe", "exclude", "conv_in"),      # a string, not a list: became ('c', 'o', 'n', ...)
    ("recipe", "exclude", [1, 2]),
    ("recipe", "name", 5),
    ("recipe", "preset_name", ["W4A8"]),
    # TCECConfig candidate grids
    ("tcec", "mix_candidates", ["0.5"]),
    ("tcec", "mix_candidates", [True, 0.0]),
    ("tcec", "mix_candidates", 0.5),
]


@pytest.mark.parametrize(("where", "field", "value"), BAD_VALUES,
                         ids=[f"{w}.{f}={v!r}" for w, f, v in BAD_VALUES])
def test_bad_field_value_in_recipe_json_is_refused_naming_the_field(where, field, value):
    payload = _edited(where, field, value)
    with pytest.raises(ValueError, match=re.escape(field)):
        recipe_from_dict(payload)


def test_recipe_file_with_nan_literal_is_refused(tmp_path):
    """Python's json reads ``NaN``; a recipe file with ``"mse_p": NaN`` must not load."""
    text = SHIPPED.read_text().replace('"mse_p": 2.4', '"mse_p": NaN', 1)
    assert "NaN" in text
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ValueError, match="mse_p"):
        load_recipe(tmp_path / "r.json")


# a nested config written as a plain object (no type/version/data wrapper) or as a scalar
WRONG_SHAPES = [
    ("weights", {"bits": 4}),
    ("weights", {"type": "QScheme", "version": 1, "bits": 4}),   # forgot "data"
    ("weights", 4),
    ("activations", None),
    ("calibration", {"seed": 3}),
    ("calibration", "default"),
]


@pytest.mark.parametrize(("field", "value"), WRONG_SHAPES, ids=[f"{f}={v!r}" for f, v in WRONG_SHAPES])
def test_nested_config_of_the_wrong_shape_is_a_value_error_naming_it(field, value):
    """Before: ``AttributeError: 'dict' object has no attribute 'granularity'`` (a traceback from the CLI)."""
    payload = _payload()
    payload["data"][field] = value
    with pytest.raises(ValueError, match=field):
        recipe_from_dict(payload)


@pytest.mark.parametrize("value", [{"weight_iters": 3}, 3, None])
def test_qdiffusion_reconstruction_of_the_wrong_shape_is_refused(value):
    """Before: ``QDiffusionMethod(reconstruction={'weight_iters': 3})`` loaded and failed only when run."""
    payload = _payload()
    payload["data"]["method"]["data"]["reconstruction"] = value
    with pytest.raises(ValueError, match="reconstruction"):
        recipe_from_dict(payload)


def test_calibration_sampler_of_the_wrong_type_is_a_value_error():
    with pytest.raises(ValueError, match="sampler"):
        CalibrationConfig(sampler={"kind": "ddim", "num_steps": 50})


def test_nested_config_type_that_is_not_a_string_is_a_value_error():
    payload = _payload()
    payload["data"]["method"]["type"] = ["QDiffusionMethod"]
    with pytest.raises(ValueError, match="Recipe.method"):
        recipe_from_dict(payload)


def test_deployments_given_as_an_object_not_a_list_names_the_field():
    payload = _payload()
    payload["data"]["deployments"] = payload["data"]["deployments"][0]
    with pytest.raises(ValueError, match="deployments"):
        recipe_from_dict(payload)


def test_bool_version_is_not_taken_as_version_1():
    payload = _payload()
    payload["data"]["method"]["version"] = True
    with pytest.raises(ValueError, match="version"):
        recipe_from_dict(payload)


def test_missing_version_is_not_called_newer():
    payload = _payload()
    del payload["version"]
    with pytest.raises(ValueError, match="version") as caught:
        recipe_from_dict(payload)
    assert "newer" not in str(caught.value), str(caught.value)


def test_svdquant_alpha_grid_refuses_strings_and_empty():
    with pytest.raises(ValueError, match="alpha_grid"):
        SVDQuantMethod(alpha_grid=("0.5",))
    with pytest.raises(ValueError, match="alpha_grid"):
        SVDQuantMethod(alpha_grid=())


def test_recipe_exclude_string_is_not_split_into_characters():
    with pytest.raises(ValueError, match="exclude"):
        Recipe(exclude="conv_in")
    with pytest.raises(ValueError, match="exclude"):
        QuantConfig(exclude="conv_in")


# ----------------------------------------------------------------------------------------------------------------
# 2. what works: wrong values that are refused by name, ints for floats, unknown keys/types/versions
# ----------------------------------------------------------------------------------------------------------------
REFUSED_OK = [
    ("weights", "bits", 8.0, "bits"),
    ("weights", "bits", True, "bits"),
    ("weights", "bits", 9, "bits"),
    ("weights", "granularity", "per_row", "granularity"),
    ("weights", "range_method", "max", "range_method"),
    ("weights", "percentile", NAN, "percentile"),
    ("activations", "granularity", "per_channel", "per_tensor"),
    ("calibration", "seed", True, "seed"),
    ("calibration", "seed", 1.0, "seed"),
    ("calibration", "seed", -1, "seed"),
    ("reconstruction", "warmup", NAN, "warmup"),
    ("reconstruction", "rounding", "nearest", "rounding"),
    ("sampler", "num_steps", 50.0, "num_steps"),
    ("sampler", "eta", NAN, "eta"),
    ("sampler", "kind", "plms", "kind"),
    ("deployment", "guidance_scale", INF, "guidance_scale"),
    ("deployment", "guidance_scale", True, "guidance_scale"),
    ("deployment", "null_class", True, "null_class"),
    ("tac", "ner", 1, "ner"),
    ("tac", "ridge", NAN, "ridge"),
    ("tac", "num_samples", 8.0, "num_samples"),
    ("tcec", "mix", INF, "mix"),
    ("tcec", "selection_seed", True, "selection_seed"),
    ("recipe", "softmax_bits", True, "softmax_bits"),
    ("recipe", "softmax_granularity", "per_col", "softmax_granularity"),
    ("recipe", "keep_fp_roles", ["first_conv"], "roles"),
]


@pytest.mark.parametrize(("where", "field", "value", "message"), REFUSED_OK,
                         ids=[f"{w}.{f}={v!r}" for w, f, v, _ in REFUSED_OK])
def test_checked_fields_refuse_bad_values(where, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        recipe_from_dict(_edited(where, field, value))


@pytest.mark.parametrize(("where", "field", "value"), [
    ("recipe", "ibc", True), ("weights", "bits_", 4), ("calibration", "trajectories", 3), ("tcec", "ner", True),
])
def test_unknown_key_is_refused_naming_the_place(where, field, value):
    with pytest.raises(ValueError, match=rf"has no fields \['{field}'\]"):
        recipe_from_dict(_edited(where, field, value))


def test_unknown_type_and_newer_version_are_named():
    payload = _payload()
    payload["data"]["corrections"][1]["version"] = 9
    with pytest.raises(ValueError, match=r"Recipe.corrections\[1\]: TCECConfig version 9 is newer"):
        recipe_from_dict(payload)
    payload = _payload()
    payload["data"]["method"]["type"] = "MagicMethod"
    with pytest.raises(ValueError, match="Recipe.method: unknown config type 'MagicMethod'"):
        recipe_from_dict(payload)
    with pytest.raises(ValueError, match="not a Recipe"):
        recipe_from_dict(config_to_dict(QuantConfig()))


def test_ints_for_floats_load_equal_to_the_floats():
    as_int = recipe_from_dict(_edited("deployment", "guidance_scale", 2))
    assert as_int.guidance_scale == 2.0 and isinstance(as_int.guidance_scale, float)
    as_int = recipe_from_dict(_edited("sampler", "eta", 0))
    assert isinstance(as_int.sampler.eta, float)


@pytest.mark.parametrize(("where", "field", "value"), [
    ("weights", "percentile", 100),
    ("reconstruction", "beta_start", 20),
    ("reconstruction", "weight_lr", 1),
    ("tac", "ridge", 0),
])
def test_ints_for_floats_give_the_same_json_as_the_floats(where, field, value):
    """An int where a float is expected loads equal to the float, so it should also write (and hash: calibration
    and reconstruction cache keys use ``config_to_dict``) the same. Before: ``100`` vs ``100.0``."""
    as_int = recipe_from_dict(_edited(where, field, value))
    as_float = recipe_from_dict(_edited(where, field, float(value)))
    assert as_int == as_float
    assert json.dumps(config_to_dict(as_int)) == json.dumps(config_to_dict(as_float))


# ----------------------------------------------------------------------------------------------------------------
# 3. round trips and old recipes
# ----------------------------------------------------------------------------------------------------------------
def _variants() -> list[Recipe]:
    sampler = SamplerConfig(kind="dpmsolver++", num_steps=20)
    return [
        Recipe(),
        Recipe.from_preset("W4A16", method=QDiffusionMethod(), exclude=("conv_in",), keep_fp_roles=("input_conv",)),
        Recipe.from_preset("W8A8-WSYM", method=TFMQMethod(), name="t"),
        Recipe.from_preset("W4A8", corrections=(PTQDConfig(select=True), TACConfig(select_ner=True), TCECConfig()),
                           layer_bits=(("down.0", 8, 8),), deployments=(Deployment(guidance_scale=3.5,
                                                                                    null_class=10),)),
        Recipe(calibration=CalibrationConfig(sampler=sampler, num_steps_kept=10), deployments=(
            Deployment(sampler), Deployment(SamplerConfig(kind="euler", num_steps=30)))),
    ]


@pytest.mark.parametrize("recipe", _variants(), ids=lambda r: r.describe())
def test_recipe_save_load_is_equal_and_byte_identical(tmp_path, recipe):
    save_recipe(recipe, tmp_path / "a.json")
    loaded = load_recipe(tmp_path / "a.json")
    assert loaded == recipe
    save_recipe(loaded, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_shipped_recipe_files_are_what_save_recipe_writes(tmp_path):
    """docs: recipes/ are generated from the rows; re-saving one should not change it. Before: every shipped file
    lacks ``"null_class": null``, which ``save_recipe`` writes (files written before the field existed)."""
    stale = []
    for file in sorted(RECIPES.glob("*.json")):
        save_recipe(load_recipe(file), tmp_path / "r.json")
        if (tmp_path / "r.json").read_text() != file.read_text():
            stale.append(file.name)
    assert not stale, f"{len(stale)} shipped recipes differ from what save_recipe writes, e.g. {stale[:3]}"


def test_old_recipe_versions_migrate_to_what_they_meant():
    payload = _payload()
    payload["version"] = 1
    del payload["data"]["softmax_granularity"], payload["data"]["layer_bits"]
    recon = payload["data"]["method"]["data"]["reconstruction"]
    recon["version"] = 1
    for key in ("rounding", "gptq_damp", "gptq_act_order", "gptq_target", "gptq_inputs", "gptq_target_damp"):
        recon["data"].pop(key, None)
    recipe = recipe_from_dict(payload)
    assert recipe.softmax_granularity == "per_tensor" and recipe.layer_bits == ()
    assert recipe.method.reconstruction.rounding == "adaround"
    assert recipe.method.reconstruction.gptq_target_damp is None
    payload = _payload()
    payload["version"] = 0
    with pytest.raises(ValueError, match="Recipe version 0"):
        recipe_from_dict(payload)


def test_docs_hand_written_example_uses_the_current_recipe_version():
    """docs/recipes.md tells users "Recipe is at version 1" and its short example says ``"version": 1``; a version-1
    Recipe is migrated to ``softmax_granularity="per_tensor"``, so the example (``quantize_attention: true``) silently
    gets the old per-tensor softmax step instead of today's default per-row one."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    example = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))
    recipe = recipe_from_dict(example)
    assert recipe.softmax_granularity == Recipe().softmax_granularity, (
        f"the docs' example loads with softmax_granularity={recipe.softmax_granularity!r}; it writes version "
        f"{example['version']}, Recipe is at {Recipe.config_version}")


# ----------------------------------------------------------------------------------------------------------------
# 4. presets
# ----------------------------------------------------------------------------------------------------------------
DOC_PRESETS = ["W8A8", "W4A8", "W4A4", "W4A16", "W8A16", "W8A8-WSYM"]


@pytest.mark.parametrize("name", DOC_PRESETS)
def test_documented_presets_exist_in_both_constructors(name):
    assert name in PRESETS
    recipe = Recipe.from_preset(name.lower())
    config = QuantConfig.from_preset(name.lower(), fp_layers="first_last")
    assert recipe.preset_name == config.preset_name == name
    assert recipe.label == config.label == name
    assert recipe.quant_config().weights == config.weights


def test_unknown_preset_lists_the_valid_ones():
    for build in (Recipe.from_preset, QuantConfig.from_preset):
        with pytest.raises(ValueError) as caught:
            build("W3A8")
        assert all(name in str(caught.value) for name in DOC_PRESETS)
    with pytest.raises(ValueError, match="first_last_time"):
        QuantConfig.from_preset("W8A8", fp_layers="firstlast")


# ----------------------------------------------------------------------------------------------------------------
# 5. override_recipe / --set
# ----------------------------------------------------------------------------------------------------------------
def _base() -> Recipe:
    return load_recipe(SHIPPED)


def test_set_nested_paths_that_work():
    recipe = override_recipe(_base(), {"method.reconstruction.weight_iters": 20, "corrections.0.ner": False,
                                       "calibration.seed": 7, "corrections.1.mix_candidates": [1, 0],
                                       "deployments.0.guidance_scale": 3, "weights.percentile": 100})
    assert recipe.method.reconstruction.weight_iters == 20 and recipe.corrections[0].ner is False
    assert recipe.calibration.seed == 7 and recipe.corrections[1].mix_candidates == (1.0, 0.0)
    assert recipe.guidance_scale == 3.0 and recipe.weights.percentile == 100.0
    both = override_recipe(_base(), {"calibration.num_steps_kept": 10, "sampler.num_steps": 10})
    assert both.sampler.num_steps == both.calibration.sampler.num_steps == 10
    tfmq = override_recipe(Recipe(method=TFMQMethod()), {"method.tfmq.fsc": "model"})
    assert tfmq.method.tfmq.fsc == "model"


@pytest.mark.parametrize(("path", "value", "message"), [
    ("method.reconstruction.weight_iter", 20, "ReconstructionConfig has no field 'weight_iter'"),
    ("corrections.5.ner", False, "'5' is not an index of a 2-item list"),
    ("corrections.-1.ner", False, "'-1' is not an index"),
    ("corrections.1.ner", False, "TCECConfig has no field 'ner'"),
    ("calibration.seed", True, "calibration.seed"),
    ("calibration.seed", 7.0, "calibration.seed"),
    ("deployments.0.sampler.num_steps", 20, "deployments.0.sampler.num_steps"),
    ("sampler.num_step", 20, "SamplerConfig has no field 'num_step'"),
    ("name.x", 1, "str has no field 'x'"),
    ("method", "tfmq", "not a registered quantization method"),
])
def test_set_bad_paths_are_refused_naming_the_path(path, value, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        override_recipe(_base(), {path: value})
    assert path in str(caught.value)


def test_set_naive_method_reconstruction_is_refused():
    with pytest.raises(ValueError, match="NaiveMethod has no field 'reconstruction'"):
        override_recipe(Recipe(), {"method.reconstruction.weight_iters": 3})


@pytest.mark.parametrize(("path", "value"), [
    ("weights", {"bits": 4}),
    ("weights", 4),
    ("calibration", 4),
    ("method.reconstruction", 3),
    ("exclude", "conv_in"),
    ("method.reconstruction.weight_iters", 2.5),
    ("method.reconstruction.weight_iters", True),
    ("weights.mse_p", NAN),
    ("method.reconstruction.weight_lr", INF),
])
def test_set_wrong_value_is_a_value_error_naming_the_path(path, value):
    """Before: AttributeError for a dict/int where a config belongs; silently accepted for the others."""
    with pytest.raises(ValueError, match=re.escape(path)):
        override_recipe(_base(), {path: value})


def test_set_replaces_a_list_item_with_a_config_object():
    """docs: ``override_recipe`` replaces fields by dotted path, list items by index. A whole list takes config
    objects (``corrections=[{...}]``) but one item does not: ``corrections.0={...}`` was refused as
    ``dict is not a registered correction``."""
    ptqd = config_to_dict(PTQDConfig())
    assert type(override_recipe(_base(), {"corrections": [ptqd]}).corrections[0]) is PTQDConfig
    recipe = override_recipe(_base(), {"corrections.0": ptqd})
    assert type(recipe.corrections[0]) is PTQDConfig and type(recipe.corrections[1]) is TCECConfig


def test_set_result_validates_as_a_whole_not_item_by_item():
    """docs: flags, then every --set, then "the result validates as a whole". Lowering the trajectories below the
    default 64 samples per step together with the samples per step was refused or accepted by --set order."""
    settings = parse_settings(["calibration.num_trajectories=32", "calibration.samples_per_step=16"])
    recipe = resolve_recipe(SHIPPED, None, QuantFlags(), settings)
    assert (recipe.calibration.num_trajectories, recipe.calibration.samples_per_step) == (32, 16)


def test_parse_settings_values():
    assert parse_settings(["name=foo", " calibration.seed = 3", "exclude=[\"conv_in\"]"]) == {
        "name": "foo", "calibration.seed": 3, "exclude": ["conv_in"]}
    with pytest.raises(ValueError, match="FIELD.PATH=VALUE"):
        parse_settings(["novalue"])


# ----------------------------------------------------------------------------------------------------------------
# 6. flags on top of --recipe (docs: the recipe, then every flag, then every --set)
# ----------------------------------------------------------------------------------------------------------------
def test_flags_override_the_recipe():
    recipe = resolve_recipe(SHIPPED, None, QuantFlags(preset="w4a4", method="tfmq", steps=10, eta=0.5,
                                                      calib_seed=3, correct=("ptqd",)))
    assert recipe.label == "W4A4" and recipe.preset_name == "W4A4"
    assert type(recipe.method) is TFMQMethod
    assert recipe.method.reconstruction == _base().method.reconstruction  # kept from the file
    assert recipe.sampler.key == recipe.calibration.sampler.key == "ddim-10-eta0.5"
    assert recipe.calibration.num_steps_kept == 10  # capped
    assert [type(c) for c in recipe.corrections] == [PTQDConfig] and recipe.corrections[0].seed == 3
    assert recipe.keep_fp_roles == _base().keep_fp_roles  # the file's, not the preset default


def test_flag_then_set_order():
    recipe = resolve_recipe(SHIPPED, None, QuantFlags(calib_seed=3), {"calibration.seed": 9})
    assert recipe.calibration.seed == 9


@pytest.mark.parametrize(("recipe_file", "config_file", "flags", "message"), [
    (SHIPPED, SHIPPED, QuantFlags(), "not both"),
    (SHIPPED, None, QuantFlags(fp_layers="none", keep_fp_roles=("input_conv",)), "not both"),
    (SHIPPED, None, QuantFlags(method="naive", recon_iters=3), "apply to --method qdiffusion or tfmq"),
    (SHIPPED, None, QuantFlags(method="svdquant"), "--method must be one of"),
    (SHIPPED, None, QuantFlags(sampler="ddpm", eta=0.5), "eta"),
    (SHIPPED, None, QuantFlags(correct=("magic",)), "unknown corrections"),
    (SHIPPED, None, QuantFlags(preset="W3A8"), "unknown preset"),
])
def test_contradictory_flags_are_refused(recipe_file, config_file, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_recipe(recipe_file, config_file, flags)


def test_config_file_with_a_recipe_is_refused(tmp_path):
    with pytest.raises(ValueError, match="expected a QuantConfig"):
        resolve_recipe(None, SHIPPED, QuantFlags())


def test_recipe_with_two_deployments_refuses_correct_flag(tmp_path):
    two = _variants()[4]
    save_recipe(two, tmp_path / "two.json")
    with pytest.raises(ValueError, match="2 deployments and a correction stack"):
        resolve_recipe(tmp_path / "two.json", None, QuantFlags(correct=("tac",)))


# ----------------------------------------------------------------------------------------------------------------
# 7. the CLI refuses bad recipe input before the model is loaded (exit 2, field named)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if quantize gets as far as loading the model."""
    import tadq.experiments.workload  # noqa: F401  imported first: importing it under the patch bound the refusal
    import tadq.models  # into it for the rest of the session (a later test_cli run then failed 'MODEL LOADED')

    def refuse(*args, **kwargs):
        raise RuntimeError("MODEL LOADED: the recipe was not validated first")

    monkeypatch.setattr(tadq.models, "load_pipeline_parts", refuse)


@pytest.mark.parametrize(("args", "field"), [
    (["--set", "weights.mse_p=NaN"], "mse_p"),
    (["--set", "method.reconstruction.weight_iters=2.5", "--method", "qdiffusion"], "weight_iters"),
    (["--set", "weights=4"], "weights"),
    (["--set", "split_shortcut=\"yes\""], "split_shortcut"),
    (["--set", "calibration.seed=true"], "seed"),          # works: bool seed refused
    (["--set", "method.reconstruction.weight_iter=2", "--method", "qdiffusion"], "weight_iter"),  # works
    (["--steps", "0"], "--steps must be >= 1"),              # named by its flag, not SamplerConfig.num_steps
])
def test_cli_refuses_bad_recipe_before_loading_the_model(tmp_path, tiny_model_dir, no_model_load, args, field):
    out = tmp_path / "q"
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--out", str(out), "--cache-dir",
                                 str(tmp_path / "cache"), *args])
    text = _flat(result.output) + " " + repr(result.exception)
    assert "MODEL LOADED" not in text, text
    assert result.exit_code == 2, text
    assert field in text and not out.exists()


def test_cli_refuses_bad_recipe_file_before_loading_the_model(tmp_path, tiny_model_dir, no_model_load):
    payload = _payload()
    payload["data"]["calibration"] = {"seed": 3}  # hand-written without the type/version/data wrapper
    (tmp_path / "r.json").write_text(json.dumps(payload))
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--recipe", str(tmp_path / "r.json"), "--out",
                                 str(tmp_path / "q"), "--cache-dir", str(tmp_path / "cache")])
    text = _flat(result.output) + " " + repr(result.exception)
    assert result.exit_code == 2, text
    assert "calibration" in text


def test_cli_config_file_bad_value_refused(tmp_path, tiny_model_dir, no_model_load):
    config = copy.deepcopy(config_to_dict(QuantConfig.from_preset("W8A8")))
    config["data"]["reconstruction"]["data"]["weight_lr"] = INF
    (tmp_path / "c.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["quantize", str(tiny_model_dir), "--config", str(tmp_path / "c.json"), "--out",
                                 str(tmp_path / "q"), "--method", "qdiffusion", "--cache-dir",
                                 str(tmp_path / "cache")])
    text = _flat(result.output) + " " + repr(result.exception)
    assert "MODEL LOADED" not in text, text
    assert result.exit_code == 2 and "weight_lr" in text, text


def test_direct_construction_refuses_non_int_counts():
    """Direct construction, as ``tadq.quantize`` users do: the same contract as JSON."""
    for field, value in (("weight_iters", 1.5), ("gptq_inputs", True), ("batch_size", 32.0)):
        with pytest.raises(ValueError, match=field):
            ReconstructionConfig(**{field: value})
    with pytest.raises(ValueError, match="seed"):
        config_from_dict(config_to_dict(CalibrationConfig()) | {"data": {"seed": "0"}})
