"""The frozen reference policy an RL stage is measured against (KL penalty, end-of-run comparison), and how
models that only score load (reference copies, reward models)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch

from ftl.config.schema import Recipe
from ftl.methods import METHODS
from ftl.models.chunked_loss import DEFAULT_CHUNK_TOKENS
from ftl.models.load import load_model, without_zero_init
from ftl.rl.rollout import response_logprobs


def load_frozen(recipe: Recipe, folder: Path, head: str = "causal_lm"):
    """A model no engine trains, in eval mode without gradients or gradient checkpointing. Loaded whole:
    under ZeRO-3 (accelerate's zero3_init_flag) it would otherwise be partitioned with no engine to gather it."""
    with without_zero_init():
        model = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}), folder, head=head)
    return model.eval().requires_grad_(False)


def load_partitioned(accelerator, recipe: Recipe, folder: Path, head: str = "causal_lm"):
    """A frozen model under ZeRO-3, partitioned as it loads (the run's zero3_init_flag) and held by an
    inference engine of its own (ftl.rl.frozen_engine): each rank keeps its shard only. Every rank must call
    this (loading and each later forward are collectives)."""
    from ftl.rl.frozen_engine import frozen_zero3_model, is_partitioned

    model = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}), folder, head=head)
    if not is_partitioned(model):
        raise RuntimeError(f"{folder} loaded whole under ZeRO-3: transformers' DeepSpeed config (zero3_init_flag) "
                           "is not active")
    return frozen_zero3_model(accelerator, model)


class Reference:
    """The frozen reference policy: the adapter-disabled policy for LoRA-family methods (no second copy
    in memory), else a frozen copy of the initial policy (under ZeRO-3 a partitioned one: `frozen_model`
    of a `load_partitioned` model, kind "partitioned_copy")."""

    def __init__(self, accelerator, policy, method_kind: str):
        self.unwrapped = accelerator.unwrap_model(policy)
        self.kind = self.kind_for(method_kind)
        self.shares_weights = self.kind == "disabled_adapter"
        self.frozen = None if self.shares_weights else \
            copy.deepcopy(self.unwrapped).eval().requires_grad_(False)

    @classmethod
    def frozen_model(cls, model, kind: str = "copy") -> "Reference":
        """A reference that is the given (already frozen) model, e.g. the initial policy of a DPO run, or a
        ZeRO-3 run's partitioned copy of the initial policy (kind "partitioned_copy")."""
        reference = cls.__new__(cls)
        reference.unwrapped, reference.frozen = model, model.requires_grad_(False)
        reference.kind, reference.shares_weights = kind, False
        return reference

    @staticmethod
    def kind_for(method_kind: str, sharded: bool = False) -> str:
        """disabled_adapter (LoRA family), copy, or under ZeRO-3 (sharded) partitioned_copy."""
        if METHODS[method_kind].disabled_adapter_reference:
            return "disabled_adapter"
        return "partitioned_copy" if sharded else "copy"

    @contextmanager
    def model(self):
        if self.shares_weights:
            with self.unwrapped.disable_adapter():
                yield self.unwrapped
        else:
            yield self.frozen

    def logprobs(self, sequences, mask, pos, prompt_length: int, temperature: float,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
        with self.model() as model:
            return response_logprobs(model, sequences, mask, pos, prompt_length, temperature,
                                     chunk_tokens=chunk_tokens)
