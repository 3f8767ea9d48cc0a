"""Recipe loading: profiles, overrides, and errors that name the file, key path, line and fix."""

import pytest
import yaml

from conftest import RECIPES, tiny_recipe_dict, write_recipe
from ftl.config import load_recipe, resolved_dict
from ftl.errors import RecipeError


def test_unknown_key_names_file_path_line_and_closest_key(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run")
    recipe["train"]["lrr"] = 0.1
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "lrr" in text)
    assert f"{path}:{line}" in message
    assert "unknown key 'train.lrr'" in message and "did you mean 'train.lr'" in message


def test_unknown_key_inside_profile_names_profile_path(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", profiles={"tiny": {"model": {"sorce": "tiny"}}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError, match=r"profiles\.tiny\.model\.sorce'; did you mean 'profiles\.tiny\.model\.source'"):
        load_recipe(path)


def test_wrong_type_and_impossible_value_say_what_was_expected(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run")
    recipe["train"]["batch_size"] = "eight"
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with pytest.raises(RecipeError, match=r"train\.batch_size: Input should be a valid integer.*got 'eight'"):
        load_recipe(path)
    recipe["train"]["batch_size"] = 2
    recipe["data"]["split"] = {"validation": 0.6, "test": 0.5}
    write_recipe(path, recipe)
    with pytest.raises(RecipeError, match=r"data\.split.*validation \+ test must leave some data"):
        load_recipe(path)


def test_missing_profile_lists_the_ones_there(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", profiles={"a": {}, "b": {}}))
    with pytest.raises(RecipeError, match=r"no profile 'c' \(this recipe has: a, b\)"):
        load_recipe(path, "c")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain:\n  lr: [1, 2\n")
    with pytest.raises(RecipeError, match=rf"{path}:\d+: not valid YAML"):
        load_recipe(path)


def test_profile_then_overrides_apply_in_order(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", profiles={"p": {"train": {"lr": 0.5, "batch_size": 3}}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    loaded = load_recipe(path, "p", ["train.lr=1e-4", "method.kind=lora"])
    assert loaded.train.lr == 1e-4 and loaded.train.batch_size == 3
    assert loaded.method.kind == "lora" and loaded.profile == "p"
    with pytest.raises(RecipeError, match=r"override 'train.lrate=1': unknown key 'train.lrate'"):
        load_recipe(path, "p", ["train.lrate=1"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, "p", ["train.lr"])


def test_resolved_recipe_is_a_valid_recipe_that_loads_identically(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", profiles={"p": {"train": {"lr": 0.5}}})
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe), "p", ["train.seed=7"])
    resolved = resolved_dict(loaded)
    assert "profiles" not in resolved
    again = load_recipe(write_recipe(tmp_path / "resolved.yaml", resolved))
    assert resolved_dict(again) == resolved


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.rglob("*.yaml") if p.name != "pipeline.yaml"),
                         ids=lambda p: p.name)
def test_every_shipped_recipe_and_profile_validates(path):
    profiles = yaml.safe_load(path.read_text()).get("profiles", {})
    assert "tiny" in profiles, f"{path} has no tiny profile"
    for profile in profiles:
        recipe = load_recipe(path, profile)
        assert recipe.profile == profile


def test_shipped_pipelines_name_existing_recipes_and_earlier_stages():
    from ftl.pipeline import load_pipeline

    for path in RECIPES.rglob("pipeline.yaml"):
        spec = load_pipeline(path)
        for stage in spec.stages:
            assert (path.parent / stage.recipe).exists(), stage.recipe
            load_recipe(path.parent / stage.recipe, "tiny")


def test_pipeline_input_from_a_later_stage_is_rejected(tmp_path):
    from ftl.pipeline import PipelineError, load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  - {name: a, recipe: a.yaml, inputs: {model.path: b}}\n"
                    "  - {name: b, recipe: b.yaml}\n")
    with pytest.raises(PipelineError, match="stage 'a' input model.path ← 'b': no earlier stage"):
        load_pipeline(path)
