"""Old recipe spellings (before `reward:` and `sampling:` left the `ppo:` section) load as the new keys,
with a one-line note; new-style recipes load silently."""

import pytest

from conftest import RECIPES, tiny_recipe_dict, write_recipe
from ftl.config import load_recipe, resolved_dict
from ftl.config.legacy import new_key
from ftl.errors import RecipeError


def ppo_recipe_dict(tmp_path, **sections) -> dict:
    return tiny_recipe_dict(tmp_path / "run", stage="ppo",
                            data={"format": "prompts", "packing": False}, **sections)


def old_style(tmp_path) -> dict:
    return ppo_recipe_dict(tmp_path, ppo={"reward": {"kind": "model", "path": "rm"}, "max_new_tokens": 20,
                                          "top_k": 5, "missing_eos_penalty": -2.0, "kl_coef": 0.2},
                           profiles={"tiny": {"ppo": {"max_new_tokens": 12, "rollout_batch": 4}}})


def notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("ftl: note:")]


def test_old_style_recipe_loads_into_the_new_sections_with_one_note(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", old_style(tmp_path))
    recipe = load_recipe(path, "tiny")
    assert recipe.reward.kind == "model" and recipe.reward.path == str(tmp_path / "rm") and recipe.reward.missing_eos_penalty == -2.0
    assert recipe.sampling.max_new_tokens == 12 and recipe.sampling.top_k == 5 and recipe.sampling.temperature == 1.0
    assert recipe.ppo.kl_coef == 0.2 and recipe.ppo.rollout_batch == 4
    (note,) = notes(capsys)
    assert note.startswith(f"ftl: note: {path}: 'ppo.reward' is now 'reward', ")
    assert "'ppo.max_new_tokens' is now 'sampling.max_new_tokens'" in note and "(read as such)" in note
    assert "'ppo.missing_eos_penalty' is now 'reward.missing_eos_penalty'" in note
    resolved = resolved_dict(recipe)
    assert "reward" not in resolved["ppo"] and "max_new_tokens" not in resolved["ppo"]
    assert resolved["reward"]["path"] == str(tmp_path / "rm") and resolved["sampling"]["max_new_tokens"] == 12
    again = load_recipe(write_recipe(tmp_path / "resolved.yaml", resolved))
    assert resolved_dict(again) == resolved and notes(capsys) == []


def test_old_style_overrides_map_to_the_new_keys(tmp_path, capsys):
    path = write_recipe(tmp_path / "r.yaml", ppo_recipe_dict(tmp_path, reward={"path": "rm"}))
    recipe = load_recipe(path, overrides=["ppo.reward.path=/models/rm2", "ppo.temperature=0.7", "ppo.kl_coef=0.3"])
    assert recipe.reward.path == "/models/rm2" and recipe.sampling.temperature == 0.7 and recipe.ppo.kl_coef == 0.3
    first, second = notes(capsys)
    assert first == "ftl: note: override 'ppo.reward.path=/models/rm2': 'ppo.reward' is now 'reward' (read as such); " \
                    "use the new key"
    assert "'ppo.temperature' is now 'sampling.temperature'" in second
    function = "ftl.rl.reward_functions:count_substring"
    recipe = load_recipe(path, overrides=[f"ppo.reward={{kind: function, function: '{function}'}}",
                                          "ppo.missing_eos_penalty=null"])
    assert recipe.reward.kind == "function" and recipe.reward.missing_eos_penalty is None
    assert recipe.reward.function == function


@pytest.mark.parametrize("name", ["ppo", "dpo", "grpo"])
def test_new_style_recipes_load_without_a_note(name, capsys):
    for profile in (None, "tiny"):
        recipe = load_recipe(RECIPES / "rlhf" / f"{name}.yaml", profile)
        assert recipe.reward.path and recipe.sampling.max_new_tokens == (24 if profile is None else 12)
    assert notes(capsys) == []


def test_old_and_new_spelling_together_is_an_error(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", ppo_recipe_dict(tmp_path, reward={"path": "a"},
                                                             ppo={"reward": {"path": "b"}}))
    with pytest.raises(RecipeError, match=r"both 'ppo.reward' \(the old spelling\) and 'reward' are given"):
        load_recipe(path)


def test_errors_in_old_keys_name_the_new_key_and_the_line(tmp_path):
    recipe = ppo_recipe_dict(tmp_path, ppo={"reward": {"kind": "model"}})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "reward:")
    with pytest.raises(RecipeError, match=rf"{path}:{line}: reward: .*reward kind 'model' needs reward.path"):
        load_recipe(path)


def test_new_key_maps_dotted_keys_inside_profiles():
    assert new_key("ppo.reward.path") == "reward.path"
    assert new_key("profiles.tiny.ppo.top_k") == "profiles.tiny.sampling.top_k"
    assert new_key("ppo.kl_coef") == "ppo.kl_coef" and new_key("train.lr") == "train.lr"


# keys issue #15 added to the schema: a run started before them has none in its resume contract
KEYS_ADDED_SINCE = ("data.sources", "data.splits", "data.columns", "data.mix.stopping_strategy", "data.mix.seed",
                    "data.source.format", "data.source.columns", "data.source.weight", "data.source.name",
                    "data.source.revision", "model.name", "model.revision")


def contract_of(tmp_path, **sections) -> dict:
    from ftl.train.resume_contract import make_contract

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", **sections)))
    return make_contract(resolved_dict(recipe), {"train": "abc"})


def test_a_run_started_before_new_schema_keys_stays_resumable(tmp_path):
    from ftl.train.resume_contract import changes

    new = contract_of(tmp_path)
    old = {"recipe": {k: v for k, v in new["recipe"].items() if k not in KEYS_ADDED_SINCE}, "splits": new["splits"]}
    assert set(new["recipe"]) - set(old["recipe"]) == set(KEYS_ADDED_SINCE) & set(new["recipe"])
    assert len(set(new["recipe"]) - set(old["recipe"])) >= 8
    assert changes(old, new) == []


def test_a_new_key_set_away_from_its_default_is_still_a_change(tmp_path):
    from ftl.train.resume_contract import changes

    new = contract_of(tmp_path, data={"format": "chat", "mix": {"seed": 7}, "max_length": 64})
    old = {"recipe": {k: v for k, v in new["recipe"].items() if k not in KEYS_ADDED_SINCE}, "splits": new["splits"]}
    old["recipe"]["train.lr"] = 1.0
    assert changes(old, new) == ["data.mix.seed: '(unset)' → 7", f"train.lr: 1.0 → {new['recipe']['train.lr']!r}"]
