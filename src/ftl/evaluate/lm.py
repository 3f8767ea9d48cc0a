"""Language-model loss (token-weighted, so packed and unpacked agree) and perplexity.

`chunk_tokens` (the recipe's train.loss_chunk_tokens) > 0 computes the loss without the full-vocabulary logits
(ftl.models.chunked_loss: the output head and the cross-entropy run over chunks of counted positions); 0
computes it plainly from the model's logits. Both give the same losses and gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ftl.data.packing import collate, model_inputs
from ftl.data.tokenize import IGNORE
from ftl.evaluate.sharded import sum_over_ranks
from ftl.models.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_token_losses


def token_losses(model, batch: dict, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss of predicting labels[t+1] from tokens ≤ t, and the mask of counted positions."""
    targets = batch["labels"][:, 1:]
    if chunk_tokens:
        return chunked_token_losses(model, model_inputs(batch), batch["labels"], chunk_tokens), targets != IGNORE
    length = batch["input_ids"].shape[1]
    # prompt tuning / P-tuning prepend virtual tokens: score only the real positions
    logits = model(**model_inputs(batch)).logits[:, -length:][:, :-1].float()
    losses = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=IGNORE, reduction="none").view_as(targets)
    return losses, targets != IGNORE


def causal_lm_loss(model, batch: dict, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, int]:
    """Mean over the batch's trained tokens (the training loss of every causal-LM stage)."""
    losses, mask = token_losses(model, batch, chunk_tokens)
    count = int(mask.sum())
    return losses.sum() / max(count, 1), count


def lm_loss(model, features: list[dict], pad_id: int, batch_size: int = 8, accelerator=None,
            chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict:
    """Token-weighted loss and perplexity over features, sharded across ranks when distributed."""
    def measure(batch):
        losses, mask = token_losses(model, batch, chunk_tokens)
        return torch.stack([losses[mask].double().sum(), mask.sum().double()])

    total = sum_over_ranks(model, features, batch_size, lambda rows: collate(rows, pad_id), measure, 2, accelerator)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(total[1].item())}
