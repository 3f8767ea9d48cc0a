"""PPO checks that need no model: train.epochs is refused by name, not silently ignored; the comparison's
reward-hacking diagnostics and the judge's verdict."""

import pytest
import yaml

from conftest import RECIPES
from ftl.config import load_recipe
from ftl.errors import RecipeError
from ftl.stages.ppo import check_iterations, run_ppo


def ppo_recipe(tmp_path, train: dict):
    raw = yaml.safe_load((RECIPES / "rlhf" / "ppo.yaml").read_text())
    raw.pop("profiles")
    raw["train"] = train
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def test_train_epochs_without_max_steps_is_refused_by_name(tmp_path):
    recipe = ppo_recipe(tmp_path, {"lr": 1e-4, "epochs": 3})
    with pytest.raises(RecipeError, match=r"train\.epochs: PPO counts iterations .*set train\.max_steps"):
        check_iterations(recipe)
    # run_ppo checks first: nothing is loaded, built or written
    with pytest.raises(RecipeError, match=r"train\.epochs"):
        run_ppo(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_max_steps_or_the_default_length_pass(tmp_path):
    check_iterations(ppo_recipe(tmp_path, {"lr": 1e-4, "epochs": 3, "max_steps": 5}))  # max_steps counts
    check_iterations(ppo_recipe(tmp_path, {"lr": 1e-4}))  # epochs left at its default: not set by the recipe


def test_a_response_that_repeats_its_question_counts_as_an_echo():
    from ftl.rl.compare import echoes

    prompt = "<|im_start|>user\nRobots<|im_end|>\n<|im_start|>assistant\n"
    assert echoes([prompt] * 4, ["Robots", " robots ", "Robots are machines", ""]) == [True, True, False, False]


def test_the_judge_verdict_separates_finished_answers_from_better_ones():
    from ftl.pipeline.policies import verdict

    own = {"win_rate": 0.70}
    judged = lambda win, raw, start: {"win_rate": win, "mean_raw_score": raw, "reference_mean_raw_score": start}  # noqa: E731
    assert verdict(own, judged(0.59, 0.10, -0.05)) == "win confirmed"
    # measured on small: judge win 0.59 from the SFT model's unfinished answers, judge score -0.07 vs -0.05
    assert verdict(own, judged(0.59, -0.07, -0.05)) == "win confirmed only by finished answers (judge score not higher)"
    assert verdict(own, judged(0.45, 0.10, -0.05)) == "reward-model win NOT confirmed by the judge"
    assert verdict({"win_rate": 0.4}, judged(0.6, 0.1, 0.0)) == "no win"
    assert verdict(own, None) == "-"
