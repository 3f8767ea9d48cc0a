"""gae's critic as a scalar head on the policy's own last hidden state (`ppo.critic: shared`).

The separate critic (`ppo.critic: separate`) is a second transformer as large as the policy: its own
forward and backward over every mini-batch, and 16 bytes per parameter of weights, gradients and AdamW
moments. The shared one reads the hidden states the policy's forward already computed, as the PPO of
Ziegler et al. 2019 and TRL's AutoModelForCausalLMWithValueHead did: one trunk pass per mini-batch, and
the value loss (weighted by ppo.vf_coef) also trains the policy's trainable weights. The head starts at zero,
so the first values are 0 and the first returns are the rewards themselves.
"""

from __future__ import annotations

import torch


class ValueHead(torch.nn.Module):
    """hidden [..., H] -> value [...] (fp32). The head keeps its own dtype (fp32 unless an engine casts it) and
    the hidden states are cast to it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden.to(self.score.weight.dtype)).squeeze(-1).float()


def is_value_head(value_model) -> bool:
    """The critic is a head on the policy (through DDP's or DeepSpeed's wrapper)."""
    return isinstance(getattr(value_model, "module", value_model), ValueHead)
