"""Critic-free advantage estimators on PPO's machinery (`ppo.advantage: rloo | reinforce_pp`): each estimator
against hand-computed advantages, REINFORCE++'s normalisation over the tokens of 2 real gloo ranks, and short
runs on the tiny model raising a known reward (the count of letter 'e') without building a value model."""

import json
import statistics

import pytest
import torch

from conftest import read_jsonl, run_ftl, tiny_ppo_recipe, torchrun_two_ranks
from ftl.config.schema import PPOConfig
from ftl.rl.advantages import advantages

# 2 prompts x k=3 samples (a prompt's samples on contiguous rows), responses of 3, 2, 4, 1, 3 and 2 tokens
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]],
                    dtype=torch.float32)
SCORES = torch.tensor([1.0, 2.0, 0.0, 3.0, -1.0, 1.0])
KL = torch.tensor([[0.5, 0.5, 1.0, 0.0],    # sum 2
                   [1.0, 1.0, 0.0, 0.0],    # sum 2
                   [0.0, 0.0, 0.0, 0.0],    # sum 0
                   [2.0, 0.0, 0.0, 0.0],    # sum 2
                   [0.0, 1.0, 1.0, 0.0],    # sum 2
                   [-1.0, 1.0, 0.0, 0.0]])  # sum 0
KL_COEF = 0.5


def test_rloo_is_the_kl_penalised_reward_minus_the_mean_of_the_other_samples():
    # sequence rewards score - 0.5 * sum(KL): prompt 1: 1-1=0, 2-1=1, 0-0=0; prompt 2: 3-1=2, -1-1=-2, 1-0=1
    # leave-one-out baselines: prompt 1: (1+0)/2=0.5, (0+0)/2=0, (0+1)/2=0.5; prompt 2: (-2+1)/2=-0.5,
    # (2+1)/2=1.5, (2-2)/2=0  ->  advantages -0.5, 1, -0.5; 2.5, -3.5, 1 on every token of the response
    expected = torch.tensor([[-0.5, -0.5, -0.5, 0.0],
                             [1.0, 1.0, 0.0, 0.0],
                             [-0.5, -0.5, -0.5, -0.5],
                             [2.5, 0.0, 0.0, 0.0],
                             [-3.5, -3.5, -3.5, 0.0],
                             [1.0, 1.0, 0.0, 0.0]])
    cfg = PPOConfig(advantage="rloo", samples_per_prompt=3, kl_coef=KL_COEF)
    adv, returns = advantages("rloo", SCORES, KL, MASK, None, cfg)
    assert returns is None
    torch.testing.assert_close(adv, expected)


# per-token rewards -0.5 * KL, plus the score on the last token; returns-to-go with gamma 1:
#   row 0: r = -0.25, -0.25, -0.5+1   -> G = 0, 0.25, 0.5
#   row 1: r = -0.5, -0.5+2           -> G = 1, 1.5
#   row 2: r = 0, 0, 0, 0+0           -> G = 0, 0, 0, 0
#   row 3: r = -1+3                   -> G = 2
#   row 4: r = 0, -0.5, -0.5-1        -> G = -2, -2, -1.5
#   row 5: r = 0.5, -0.5+1            -> G = 1, 0.5
RETURNS = torch.tensor([[0.0, 0.25, 0.5, 0.0],
                        [1.0, 1.5, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0],
                        [2.0, 0.0, 0.0, 0.0],
                        [-2.0, -2.0, -1.5, 0.0],
                        [1.0, 0.5, 0.0, 0.0]])
TOKENS = [0.0, 0.25, 0.5, 1.0, 1.5, 0.0, 0.0, 0.0, 0.0, 2.0, -2.0, -2.0, -1.5, 1.0, 0.5]  # the 15 real tokens


def test_reinforce_pp_normalises_the_returns_to_go_over_every_response_token():
    mean, std = statistics.mean(TOKENS), statistics.stdev(TOKENS)  # 1.25/15; unbiased, over 15 tokens
    assert mean == pytest.approx(1 / 12)
    cfg = PPOConfig(advantage="reinforce_pp", kl_coef=KL_COEF)
    adv, returns = advantages("reinforce_pp", SCORES, KL, MASK, None, cfg)
    assert returns is None
    torch.testing.assert_close(adv, (RETURNS - mean) / std * MASK)
    assert adv[MASK.bool()].mean().abs() < 1e-6  # the same tokens, not the same rows, share a baseline


def test_gae_with_lam_1_and_no_value_is_the_same_returns_to_go():
    # gamma = lam = 1, values 0, no whitening: GAE's advantages are the returns-to-go above (the default
    # estimator is the PPO code of before: tests/test_ppo_maths.py checks its pieces)
    cfg = PPOConfig(kl_coef=KL_COEF, lam=1.0, whiten_advantages=False)
    adv, returns = advantages("gae", SCORES, KL, MASK, torch.zeros_like(KL), cfg)
    torch.testing.assert_close(adv, RETURNS)
    torch.testing.assert_close(returns, RETURNS)


def test_reinforce_pp_normalises_over_the_tokens_of_both_ranks(tmp_path):
    out = tmp_path / "ranks.json"
    report = torchrun_two_ranks("critic_free_ranks.py", out, timeout=300)
    assert report["world_size"] == 2
    # returns-to-go (kl_coef 0.5): rank 0: rows [1, 1, 1] and [3, 3, -]; rank 1: [2, 2, 2] and [-1-1 = -2, -, -]
    tokens = [1.0, 1.0, 1.0, 3.0, 3.0, 2.0, 2.0, 2.0, -2.0]
    mean, std = statistics.mean(tokens), statistics.stdev(tokens)  # 13/9 over 9 tokens (locally 9/5 and 4/4)
    z = [(x - mean) / std for x in tokens]
    expected = [[[z[0], z[1], z[2]], [z[3], z[4], 0.0]], [[z[5], z[6], z[7]], [z[8], 0.0, 0.0]]]
    assert torch.allclose(torch.tensor(report["advantages"]), torch.tensor(expected), atol=1e-5), report


@pytest.mark.slow
@pytest.mark.parametrize("advantage,k", [("rloo", 4), ("reinforce_pp", 1)])
def test_a_critic_free_estimator_raises_a_known_reward_without_a_value_model(tiny_recipe, tmp_path, advantage, k):
    recipe = tiny_ppo_recipe(tiny_recipe, advantage, advantage, k)
    proc = run_ftl("run", str(recipe), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    rows = read_jsonl(run / "metrics.jsonl")
    rewards = [r["reward"] for r in rows]
    assert len(rows) == 20 and all(r["episodes"] == 16 for r in rows)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 1.5, rewards  # ~1.2 'e' per response at the start
    for key in ("reward", "kl", "policy_loss", "clip_fraction", "entropy", "response_length"):
        assert key in rows[0], key
    assert "value_loss" not in rows[0] and "value_clip_fraction" not in rows[0]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ppo"] | {"reference": None} == {"reference": None, "reward": "function", "advantage": advantage,
                                                     "samples_per_prompt": k, "value_model": False}
    checkpoint = next((run / "checkpoints").iterdir())
    assert (checkpoint / "model.safetensors").exists()
    assert not list(checkpoint.glob("model_1*")) and not list(checkpoint.glob("pytorch_model_1*"))  # no value model
    result = json.loads((run / "eval.json").read_text())["after"]
    assert result["mean_reward"] > result["reference_mean_reward"]
