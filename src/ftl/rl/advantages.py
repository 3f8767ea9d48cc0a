"""Advantage estimators for the PPO stage (`ppo.advantage`), one function per estimator, in ESTIMATORS:

    gae           PPO proper: per-token rewards (score at the last token, -kl_coef * KL at every token),
                  generalised advantage estimation against the value model, optionally whitened per rank
    rloo          RLOO (Ahmadian et al. 2024, "Back to Basics"): k samples per prompt; sequence reward
                  score - kl_coef * sum of the response's per-token KL (as TRL's RLOO); advantage = that
                  reward minus the mean reward of the prompt's k-1 other samples, on every response token
    reinforce_pp  REINFORCE++ (Hu 2025): the same per-token rewards as gae, return-to-go (gamma) per token,
                  normalised by the mean and std over every response token of the global batch (all ranks)

Every estimator takes (scores [B], kl [B, R] per-token KL already masked, mask [B, R], values [B, R] or None,
cfg: PPOConfig) and returns (advantages [B, R] zero past each response's end, returns [B, R] for the value
loss or None when the estimator trains no value model). Rows of one prompt are contiguous (k at a time).
Pure tensor arithmetic apart from reinforce_pp's all-reduce; tested against hand-computed values
(tests/test_critic_free.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ftl.rl import maths


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default process group, in place (a no-op when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def global_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Like maths.whiten (mean 0, unbiased std 1 over the masked entries) but with the mean and variance over
    the masked entries of every rank: two all-reduces (sum and count, then the squared deviations).
    Every rank must call it (a collective)."""
    m = mask.to(values.dtype)
    totals = all_reduce_sum(torch.stack([(values * m).sum(), m.sum()]).double())
    count = totals[1]
    mean = (totals[0] / count.clamp(min=1)).to(values.dtype)
    squares = all_reduce_sum(((values - mean) ** 2 * m).sum().double().reshape(1))[0]
    var = (squares / (count - 1).clamp(min=1)).to(values.dtype)
    return (values - mean) * torch.rsqrt(var + eps) * m


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} within each response, zero past its end."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t].to(rewards.dtype)
        out[:, t] = running
    return out


def gae(scores, kl, mask, values, cfg):
    rewards = maths.token_rewards(scores, kl, mask, cfg.kl_coef)
    advantages, returns = maths.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = maths.whiten(advantages, mask)
    return advantages, returns


def rloo(scores, kl, mask, values, cfg):
    k = cfg.samples_per_prompt
    if k < 2 or scores.shape[0] % k:
        raise ValueError(f"rloo needs groups of samples_per_prompt >= 2 rows (got {scores.shape[0]} rows, k={k})")
    reward = (scores - cfg.kl_coef * (kl * mask).sum(-1)).view(-1, k)
    baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)  # mean of the other k-1 samples
    return (reward - baseline).reshape(-1, 1) * mask, None


def reinforce_pp(scores, kl, mask, values, cfg):
    rewards = maths.token_rewards(scores, kl, mask, cfg.kl_coef)
    return global_whiten(returns_to_go(rewards, mask, cfg.gamma), mask), None


@dataclass(frozen=True)
class Estimator:
    compute: Callable
    value_model: bool  # trains a value model (critic)


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae, value_model=True),
    "rloo": Estimator(rloo, value_model=False),
    "reinforce_pp": Estimator(reinforce_pp, value_model=False),
}


def advantages(name: str, scores, kl, mask, values: Optional[torch.Tensor], cfg):
    return ESTIMATORS[name].compute(scores, kl, mask, values, cfg)
