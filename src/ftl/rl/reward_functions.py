"""Reward functions of the response text, for `reward: {kind: function, function: "module:name"}`,
e.g. "ftl.rl.reward_functions:count_substring".

A reward function takes the list of decoded responses (and the recipe's `reward.kwargs`) and returns
one float per response. These known functions make PPO and GRPO testable without a reward model.
"""

from __future__ import annotations


def count_substring(texts: list[str], target: str = "e", cap: int | None = None) -> list[float]:
    """How often `target` occurs in each response (optionally capped)."""
    counts = [float(text.count(target)) for text in texts]
    return [min(c, cap) for c in counts] if cap is not None else counts


def length_penalty(texts: list[str], best: int = 20) -> list[float]:
    """Highest for responses of `best` characters, falling off linearly."""
    return [-abs(len(text) - best) / best for text in texts]
