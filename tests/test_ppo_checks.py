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


def test_where_both_answers_finished_the_judge_compares_content_only():
    from ftl.pipeline.policies import finished_cell, verdict

    own = {"win_rate": 0.70}
    # the judge's raw score fell (unfinished starting answers score high), yet among pairs where both finished
    # it prefers the policy: better answers, not only finished ones
    judged = {"win_rate": 0.59, "mean_raw_score": -0.07, "reference_mean_raw_score": -0.05,
              "finished_win_rate": 0.56, "finished_pairs": 50}
    assert verdict(own, judged) == "win confirmed"
    assert finished_cell(judged) == "0.56 ± 0.07 (50)"  # sqrt(0.56 * 0.44 / 50) = 0.070
    judged["finished_win_rate"] = 0.5
    assert verdict(own, judged).startswith("win confirmed only by finished answers (where both finished")
    judged["finished_win_rate"] = None  # no pair where both finished: the raw means decide
    assert verdict(own, judged) == "win confirmed only by finished answers (judge score not higher)"
    assert finished_cell(judged) == "-"


def test_the_finished_win_rate_takes_out_the_missing_eos_penalty():
    import torch

    from ftl.rl.compare import summary

    policy_raw, ref_raw = torch.tensor([0.2, 0.1, 0.9, 0.3]), torch.tensor([0.5, 0.4, 0.1, 0.3])
    finished_policy, finished_ref = torch.tensor([True, True, True, True]), torch.tensor([False, False, True, True])
    # as optimised: the start's two unfinished answers pay a penalty of 1.0
    policy_scores, ref_scores = policy_raw.clone(), ref_raw - 1.0 * ~finished_ref
    out = summary(policy_scores, policy_raw, ref_scores, ref_raw, finished_policy & finished_ref)
    assert out["win_rate"] == 0.875        # wins 0, 1 (penalty), 2; tie 3
    assert out["finished_pairs"] == 2
    assert out["finished_win_rate"] == 0.75  # pair 2 won, pair 3 tied
    none = summary(policy_scores, policy_raw, ref_scores, ref_raw, torch.zeros(4, dtype=torch.bool))
    assert none["finished_pairs"] == 0 and none["finished_win_rate"] is None
