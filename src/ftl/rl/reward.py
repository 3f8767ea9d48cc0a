"""The reward an RL stage optimises: a trained reward model or a Python function of the response texts
(`reward:` in a recipe), plus the penalty for responses that never emit EOS."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable, Optional

import torch

from ftl.config.schema import Recipe
from ftl.models.scoring import sequence_scores
from ftl.rl.reference import load_frozen, load_partitioned


class RewardFunction:
    """Scores whole sequences: a reward model, or a Python function of the response texts."""

    def __init__(self, model=None, function: Optional[str] = None, kwargs: Optional[dict] = None,
                 missing_eos_penalty: Optional[float] = None):
        self.model, self.kwargs = model, kwargs or {}
        self.missing_eos_penalty = missing_eos_penalty
        self.function: Optional[Callable] = None
        if function:
            module, _, name = function.partition(":")
            self.function = getattr(importlib.import_module(module), name)

    @torch.no_grad()
    def __call__(self, sequences, attention_mask, position_ids, texts: list[str]) -> torch.Tensor:
        if self.function is not None:
            return torch.tensor(self.function(texts, **self.kwargs), dtype=torch.float32, device=sequences.device)
        return sequence_scores(self.model, sequences, attention_mask, position_ids)

    def with_eos_penalty(self, scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """The scores as optimised: `missing_eos_penalty` added where a response never stopped."""
        if self.missing_eos_penalty is None:
            return scores
        return torch.where(has_eos, scores, scores + self.missing_eos_penalty)


def load_reward(recipe: Recipe, device=None, partitioned_by=None) -> RewardFunction:
    """The recipe's `reward:`. A reward model loads whole and frozen (ZeRO-safe), then moves to `device`;
    with device None it stays on the CPU (PPO moves it after accelerate.prepare). partitioned_by (an
    accelerator under ZeRO-3, every rank calling): partitioned instead, in a frozen inference engine of its
    own (ftl.rl.reference.load_partitioned), each rank holding its shard."""
    cfg = recipe.reward
    model = None
    if cfg.kind == "model":
        if partitioned_by is not None:
            model = load_partitioned(partitioned_by, recipe, Path(cfg.path), head="sequence_classification")
        else:
            model = load_frozen(recipe, Path(cfg.path), head="sequence_classification")
            if device is not None:
                model.to(device)
    return RewardFunction(model, cfg.function, cfg.kwargs, cfg.missing_eos_penalty)
