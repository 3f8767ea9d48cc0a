"""PPO's KL coefficient, fixed or adaptive. Adaptive (`ppo.kl_target`, Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences"): after each iteration the coefficient is multiplied by
1 + clip(KL / target - 1, -0.2, 0.2), KL being the iteration's mean summed KL per response, so a policy that
drifts past the target pays more for it and one that stays below pays less. The gain is 1, not the paper's
0.1: ftl's RL runs last tens of iterations, not thousands, and the coefficient must move within them.
"""

from __future__ import annotations

from typing import Optional

MAX_CHANGE = 0.2  # the coefficient moves by at most 20% per iteration


def next_kl_coef(coef: float, kl: float, target: Optional[float]) -> float:
    """The coefficient for the next iteration (unchanged without a target)."""
    if target is None:
        return coef
    error = min(max(kl / target - 1.0, -MAX_CHANGE), MAX_CHANGE)
    return coef * (1.0 + error)
