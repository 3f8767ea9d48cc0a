"""Scalar heads on a transformer: per-token scores (PPO's value model) and sequence scores (reward model).

Scores come from the model's own head (`score`) applied to the last hidden state at every position,
read through the normal forward (so DDP / DeepSpeed hooks run). A sequence's score is the one at its
last real token — found from the attention mask, never from the pad id (which may equal EOS).
"""

from __future__ import annotations

import torch


def core_model(model):
    """The transformers model inside DDP / DeepSpeed / PEFT wrappers (modules are shared, not copied)."""
    m = getattr(model, "module", model)
    base = getattr(m, "base_model", None)
    return getattr(base, "model", m) if base is not None and hasattr(m, "peft_config") else m


def token_scores(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """[batch, length] scalar head output at every position."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False)
    return core_model(model).score(out.hidden_states[-1]).squeeze(-1).float()


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right- or left-padded row."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(-1)


def sequence_scores(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    scores = token_scores(model, input_ids, attention_mask, position_ids)
    return scores[torch.arange(len(scores), device=scores.device), last_positions(attention_mask)]
