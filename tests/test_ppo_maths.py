"""PPO arithmetic against values computed by hand."""

import math

import pytest
import torch

from ftl.rl.maths import (entropy_from_logits, gae, kl_estimate, masked_mean, policy_loss, token_rewards, value_loss,
                          whiten)

T = torch.tensor


def test_gae_by_hand():
    # one response of 3 tokens, then padding; gamma 0.9, lambda 0.5
    rewards = T([[0.0, 0.0, 1.0, 0.0]])
    values = T([[0.5, 0.4, 0.3, 9.9]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0 - 0.3                  # 0.7 (no value after the end)
    d1 = 0.0 + 0.9 * 0.3 - 0.4                # -0.13
    d0 = 0.0 + 0.9 * 0.4 - 0.5                # -0.14
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2                  # 0.185
    a0 = d0 + 0.9 * 0.5 * a1                  # -0.05675
    torch.testing.assert_close(adv, T([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, T([[a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0]]))


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards, values, mask = T([[1.0, 2.0, 3.0]]), T([[0.5, 0.5, 0.5]]), T([[1.0, 1.0, 1.0]])
    adv, _ = gae(rewards, values, mask, 1.0, 1.0)
    torch.testing.assert_close(adv, T([[6.0 - 0.5, 5.0 - 0.5, 3.0 - 0.5]]))


def test_whitening_uses_only_real_tokens():
    values, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    out = whiten(values, mask)
    # mean 2, unbiased var 1 → (x - 2) / 1, padding stays 0
    torch.testing.assert_close(out, T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_clipped_policy_loss_by_hand():
    adv = T([[1.0, -1.0]])
    old = T([[0.0, 0.0]])
    new = T([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5, clip range 0.2
    loss, clipfrac = policy_loss(new, old, adv, T([[1.0, 1.0]]), clip_range=0.2)
    # token 1: max(-1*1.5, -1*1.2) = -1.2 (clipped); token 2: max(1*0.5, 1*0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)
    inside, frac = policy_loss(T([[math.log(1.1)]]), T([[0.0]]), T([[2.0]]), T([[1.0]]), 0.2)
    assert inside.item() == pytest.approx(-2.2) and frac.item() == 0.0


def test_clipped_value_loss_by_hand():
    old, new, returns = T([[1.0, 1.0]]), T([[2.0, 1.1]]), T([[3.0, 1.0]])
    loss, frac = value_loss(new, old, returns, T([[1.0, 1.0]]), clip_range_value=0.2)
    # token 1: clipped value 1.2 → max((2-3)^2, (1.2-3)^2) = 3.24 ; token 2: max(0.01, 0.01) = 0.01
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_kl_estimators_by_hand():
    logp, ref = T([0.0, math.log(0.5)]), T([math.log(0.5), 0.0])
    r = [math.log(2.0), math.log(0.5)]  # log(p/q)
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), T(r))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), T([0.5 * x * x for x in r]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), T([math.exp(-x) - 1 + x for x in r]))
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_token_rewards_put_the_score_on_the_last_real_token():
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = token_rewards(T([2.0, -1.0]), kl, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, T([[-0.01, -0.02, -0.03 + 2.0], [-0.05 - 1.0, 0.0, 0.0]]))


def test_entropy_of_uniform_and_certain_distributions():
    logits = T([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    torch.testing.assert_close(entropy_from_logits(logits), T([[math.log(4), 0.0]]), atol=1e-5, rtol=0)
