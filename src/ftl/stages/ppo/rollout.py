"""Rollouts: sample responses, then score them with the policy, the reference, the value model and the reward."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ftl.models.scoring import sequence_scores, token_scores


@dataclass
class Rollout:
    sequences: torch.Tensor      # [B, P + R] left-padded prompt + response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_length: int
    response_mask: torch.Tensor  # [B, R] 1 up to and including the first EOS
    logprobs: torch.Tensor       # [B, R] under the policy that sampled
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor         # [B] reward per sequence (after the missing-EOS penalty)
    has_eos: torch.Tensor
    texts: list[str]
    generation_seconds: float


def left_padded(tokenizer, prompts: list[str], device) -> dict:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def response_mask(response: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    is_eos = response == eos_id
    after_first_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_first_eos).long(), is_eos.any(-1)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logprobs(model, sequences, attention_mask, position_ids, prompt_length: int,
                      temperature: float, with_entropy: bool = False):
    from ftl.stages.ppo.maths import entropy_from_logits

    logits = model(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, prompt_length - 1:-1].float() / temperature
    targets = sequences[:, prompt_length:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs, entropy_from_logits(logits)) if with_entropy else logprobs


def response_values(value_model, sequences, attention_mask, position_ids, prompt_length: int) -> torch.Tensor:
    return token_scores(value_model, sequences, attention_mask, position_ids)[:, prompt_length - 1:-1]


class RewardFunction:
    """Scores whole sequences: a reward model, or a Python function of the response texts."""

    def __init__(self, model=None, function: Optional[str] = None, kwargs: Optional[dict] = None):
        self.model, self.kwargs = model, kwargs or {}
        self.function: Optional[Callable] = None
        if function:
            module, _, name = function.partition(":")
            self.function = getattr(importlib.import_module(module), name)

    @torch.no_grad()
    def __call__(self, sequences, attention_mask, position_ids, texts: list[str]) -> torch.Tensor:
        if self.function is not None:
            return torch.tensor(self.function(texts, **self.kwargs), dtype=torch.float32, device=sequences.device)
        return sequence_scores(self.model, sequences, attention_mask, position_ids)


@torch.no_grad()
def collect(policy, reference, value_model, reward: RewardFunction, tokenizer, prompts: list[str],
            cfg, device) -> Rollout:
    """Sample one response per prompt and score it (reference: ftl.stages.ppo.Reference)."""
    batch = left_padded(tokenizer, prompts, device)
    started = time.perf_counter()
    policy.eval()
    sequences = policy.generate(**batch, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=1.0, max_new_tokens=cfg.max_new_tokens, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    generation_seconds = time.perf_counter() - started
    prompt_length = batch["input_ids"].shape[1]
    response = sequences[:, prompt_length:]
    mask, has_eos = response_mask(response, tokenizer.eos_token_id)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    pos = positions(attention)
    logprobs = response_logprobs(policy, sequences, attention, pos, prompt_length, cfg.temperature)
    ref_logprobs = reference.logprobs(sequences, attention, pos, prompt_length, cfg.temperature)
    values = response_values(value_model, sequences, attention, pos, prompt_length)
    texts = tokenizer.batch_decode(response * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    scores = reward(sequences, attention, pos, texts).float()
    if cfg.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, scores + cfg.missing_eos_penalty)
    return Rollout(sequences, attention, pos, prompt_length, mask.float(), logprobs, ref_logprobs, values,
                   scores, has_eos, texts, generation_seconds)
