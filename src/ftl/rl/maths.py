"""Policy-gradient arithmetic on per-token tensors [batch, response_length] with a 0/1 mask of real
tokens: masked statistics, whitening, KL estimates, per-token rewards, GAE, PPO's clipped losses, entropy.

Pure functions, unit-tested against hand-computed values (tests/test_ppo_maths.py).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    return masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3)."""
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1, k2, k3)")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL on every response token, plus the sequence score on its last real token."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(-1) - 1).clamp(min=0).long()  # responses are left-aligned: 1..1 0..0
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation; returns (advantages, returns), zero past each response's end."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t].to(rewards.dtype)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float):
    """Clipped surrogate; returns (loss, fraction of tokens where clipping was active). The ratio is 1 on
    masked tokens: old log-probabilities taken from generation differ from a forward's after a response's EOS
    (generate attends to the padding it emits there), and exp of that difference must not overflow into the
    masked sum (inf x 0 is nan)."""
    ratio = torch.exp(torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs)))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_fraction


def value_loss(values, old_values, returns, mask, clip_range_value: float):
    """Clipped value loss (0.5 * max of squared errors); returns (loss, fraction clipped)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error, clipped_error = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(error, clipped_error), mask)
    return loss, masked_mean((clipped_error > error).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
