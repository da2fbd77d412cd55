"""The recipe: JSON form, validation with the place named, overrides, and the shipped recipes/ files."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from tadq.config import CalibrationConfig, QuantConfig, ReconstructionConfig, config_from_dict, config_to_dict
from tadq.corrections import PTQDConfig, TACConfig, TCECConfig
from tadq.experiments.rows.best import best_recipes
from tadq.experiments.rows.recipes import shipped_recipes
from tadq.recipe import (
    Deployment,
    NaiveMethod,
    QDiffusionMethod,
    Recipe,
    load_recipe,
    override_recipe,
    recipe_from_dict,
)
from tadq.sampling import SamplerConfig
from tadq.tfmq import TFMQConfig, TFMQMethod

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _recipe(**fields) -> Recipe:
    return Recipe.from_preset("W4A8", method=QDiffusionMethod(), corrections=(TACConfig(), TCECConfig()), **fields)


def test_recipe_survives_json():
    for recipe in (_recipe(), Recipe(), Recipe.from_preset("W4A4", method=TFMQMethod(tfmq=TFMQConfig(fsc="model")),
                                                           corrections=(PTQDConfig(seed=3),))):
        assert recipe_from_dict(json.loads(json.dumps(config_to_dict(recipe)))) == recipe


def test_quant_config_view_and_back():
    recipe = _recipe(split_shortcut=True, keep_fp_roles=("input_conv",))
    config = recipe.quant_config()
    assert (config.method, config.label, config.split_shortcut, config.keep_fp_roles) == (
        "qdiffusion", "W4A8", True, ("input_conv",))
    assert Recipe.from_quant_config(config).quant_config() == config
    assert recipe.base().corrections == () and recipe.base().quant_config() == config
    assert isinstance(Recipe.from_quant_config(QuantConfig()).method, NaiveMethod)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["data"].update(bogus=1), r"Recipe has no fields \['bogus'\]"),
    (lambda d: d.update(version=4), "Recipe version 4 is newer"),
    (lambda d: d.update(version=0), "Recipe version 0 cannot be read"),
    (lambda d: d["data"]["method"]["data"]["reconstruction"]["data"].update(iters=3),
     r"Recipe.method.reconstruction: ReconstructionConfig has no fields \['iters'\]"),
    (lambda d: d["data"]["corrections"][1].update(version=9), r"Recipe.corrections\[1\]: TCECConfig version 9"),
    (lambda d: d["data"]["method"].update(type="Magic"), "Recipe.method: unknown config type 'Magic'"),
])
def test_bad_recipe_names_the_place(change, message):
    payload = json.loads(json.dumps(config_to_dict(_recipe())))
    change(payload)
    with pytest.raises(ValueError, match=message):
        recipe_from_dict(payload)


def test_recipe_validates_itself():
    other = SamplerConfig(kind="ddim", num_steps=10)
    with pytest.raises(ValueError, match="calibration.sampler"):
        _recipe(deployments=(Deployment(other),))
    with pytest.raises(ValueError, match="one recipe per deployment"):
        _recipe(deployments=(Deployment(), Deployment(other)))
    with pytest.raises(ValueError, match="TFMQ is a quantization method"):
        Recipe(corrections=(TFMQConfig(),))
    with pytest.raises(ValueError, match="not a registered quantization method"):
        Recipe(method=ReconstructionConfig())
    with pytest.raises(ValueError, match="guidance_scale"):
        Deployment(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="per_tensor"):
        Recipe.from_preset("W8A8", activations=Recipe().weights)


def test_override_by_dotted_path():
    recipe = override_recipe(_recipe(), {"method.reconstruction.weight_iters": 2, "corrections.1.num_samples": 8,
                                         "keep_fp_roles": ["output_conv"]})
    assert recipe.method.reconstruction.weight_iters == 2 and recipe.corrections[1].num_samples == 8
    assert recipe.keep_fp_roles == ("output_conv",)
    with pytest.raises(ValueError, match="ReconstructionConfig has no field 'iters'"):
        override_recipe(recipe, {"method.reconstruction.iters": 2})
    with pytest.raises(ValueError, match="not an index"):
        override_recipe(recipe, {"corrections.5.seed": 1})


def test_override_errors_name_the_setting_as_the_caller_wrote_it():
    """From Python the errors said ``--set PATH``, a flag the caller never used."""
    with pytest.raises(ValueError, match=re.escape("changes['method.reconstruction.iters']: ReconstructionConfig")):
        override_recipe(_recipe(), {"method.reconstruction.iters": 2})
    with pytest.raises(ValueError, match=re.escape("--set calibration and --set calibration.seed overlap")):
        override_recipe(_recipe(), {"calibration": {}, "calibration.seed": 3}, flag="--set")


def test_every_shipped_recipe_parses_validates_and_matches_its_row():
    files = sorted(RECIPES.glob("*.json"))
    expected = {**shipped_recipes(), **best_recipes()}
    assert [f.name for f in files] == sorted(expected), "recipes/ and the README rows disagree"
    for file in files:
        recipe = load_recipe(file)
        assert recipe == expected[file.name], f"{file.name} differs from its row's recipe; regenerate recipes/"
        assert recipe.name == file.stem
        assert recipe.calibration == CalibrationConfig(sampler=recipe.sampler)


def test_the_best_recipes_are_the_headline_rows_at_todays_defaults():
    """recipes/best-<preset>.json: what ``tadq run --methods best`` builds at each preset, so ``tadq quantize
    --recipe`` gives make run's best rows (the other files hold the former defaults' rows)."""
    from tadq.experiments.rows import BEST_ROWS, recipes_for_row
    from tadq.experiments.run import RunConfig

    best = best_recipes()
    assert sorted(best) == sorted(f"best-{preset}.json" for preset in BEST_ROWS)
    config = RunConfig()
    for preset_name, row in BEST_ROWS.items():
        recipe = best[f"best-{preset_name}.json"]
        assert recipe == dataclasses.replace(recipes_for_row(row, preset_name, config), name=recipe.name)
        assert recipe.keep_fp_roles == ("input_conv", "output_conv") and recipe.corrections


def test_load_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_recipe(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps(config_to_dict(QuantConfig())))
    with pytest.raises(ValueError, match="bad.json holds a 'QuantConfig', not a Recipe"):
        load_recipe(tmp_path / "bad.json")


@pytest.mark.parametrize(("document", "said"), [
    ({}, 'an object without a "type"'), ([], "a JSON list"), ({"type": "QuantConfig"}, "tadq quantize --config")])
def test_a_file_that_is_not_a_recipe_says_what_it_holds(tmp_path, document, said):
    """``{}`` was "holds a None, not a Recipe"; a QuantConfig file did not say which flag reads it."""
    (tmp_path / "bad.json").write_text(json.dumps(document))
    with pytest.raises(ValueError, match="not a Recipe") as caught:
        load_recipe(tmp_path / "bad.json")
    assert said in str(caught.value) and "None" not in str(caught.value), caught.value


def test_docs_fields_table_has_a_row_for_every_recipe_field():
    """docs/recipes.md "Fields" is where a hand-written recipe's fields are looked up; softmax_granularity,
    branch_ranges and layer_bits had no row."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    table = page.split("\n## Fields\n", 1)[1].split("\n#", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \|", table, flags=re.MULTILINE))
    assert "method" in rows and "name" in rows  # the table was found
    assert rows == {field.name for field in dataclasses.fields(Recipe)}


def test_the_skeleton_the_not_a_recipe_error_shows_is_todays_recipe(tmp_path):
    """The error showed ``"version": 1``: a recipe written from it was migrated as a version-1 one (per-tensor
    softmax steps where today's default is per row), not the recipe docs/recipes.md describes."""
    (tmp_path / "bad.json").write_text(json.dumps({"type": "QuantConfig", "version": 1, "data": {}}))
    with pytest.raises(ValueError, match="not a Recipe") as caught:
        load_recipe(tmp_path / "bad.json")
    version = int(re.search(r'"version": (\d+)', str(caught.value)).group(1))
    skeleton = {"type": "Recipe", "version": version, "data": {"quantize_attention": True}}
    assert recipe_from_dict(skeleton) == Recipe(quantize_attention=True)


def test_a_version_1_recipe_and_config_mean_the_per_tensor_softmax_they_were_written_with():
    """A field added later takes the value the old payload was written with, not the new default."""
    payload = json.loads(json.dumps(config_to_dict(dataclasses.replace(_recipe(), quantize_attention=True))))
    payload["version"] = 1
    del payload["data"]["softmax_granularity"]
    old = recipe_from_dict(payload)
    assert old.softmax_granularity == "per_tensor" and old.quant_config().softmax_granularity == "per_tensor"
    config = json.loads(json.dumps(config_to_dict(QuantConfig(quantize_attention=True))))
    assert config["version"] == 3 and config["data"]["softmax_granularity"] == "per_row"
    config["version"] = 1
    del config["data"]["softmax_granularity"]
    assert config_from_dict(config).softmax_granularity == "per_tensor"


def test_layer_bits_travel_through_the_recipe_and_a_version_2_recipe_has_none():
    raised = (("conv_in", 8, 8), ("mid_block.resnets.0.conv1", 8, 6))
    recipe = _recipe(layer_bits=raised)
    assert recipe.quant_config().layer_bits == raised
    assert Recipe.from_quant_config(recipe.quant_config()).layer_bits == raised
    payload = json.loads(json.dumps(config_to_dict(recipe)))
    assert payload["version"] == 3 and recipe_from_dict(payload) == recipe
    assert override_recipe(_recipe(), {"layer_bits": [list(e) for e in raised]}) == recipe
    old = json.loads(json.dumps(config_to_dict(_recipe())))
    old["version"] = 2
    del old["data"]["layer_bits"]
    assert recipe_from_dict(old) == _recipe()
    with pytest.raises(ValueError, match="more than once"):
        _recipe(layer_bits=(("conv_in", 8, 8), ("conv_in", 8, 8)))


def test_a_search_folder_is_read_through_its_recipe_json(tmp_path):
    """`tadq quantize --recipe FOLDER` on a `tadq recipe --out` folder said "recipe FOLDER does not exist"."""
    recipe = Recipe.from_quant_config(QuantConfig.from_preset("W8A8"))
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "recipe.json").write_text(json.dumps(config_to_dict(recipe)))
    assert load_recipe(tmp_path / "search") == recipe
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is a folder without a recipe.json"):
        load_recipe(tmp_path / "empty")


def test_describe_names_bits_method_and_the_correction_stack():
    """The CLI's one name for an artefact (`tadq quantize`, `tadq sample`, `tadq evaluate`): sample and evaluate
    dropped the corrections ("W8A8 Naive" for a TAC artefact)."""
    base = Recipe.from_quant_config(QuantConfig.from_preset("W8A8"))
    assert base.describe() == f"W8A8 {type(base.method).__name__.removesuffix('Method')}"
    stacked = dataclasses.replace(base, corrections=(TACConfig(), TCECConfig()))
    assert stacked.describe() == base.describe() + " + TAC + TCEC"
