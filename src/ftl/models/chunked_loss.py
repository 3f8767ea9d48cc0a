"""Causal-LM losses and log-probabilities without the full-vocabulary logits.

A causal LM's output head turns every position's last hidden state into a row of vocabulary logits: for a
small model with a large vocabulary (SmolLM2: 49,152 tokens) those logits, their float copy, their softmax
and its gradient dominate training memory. Here the model's body runs once as usual, but its output head is
replaced, for that one forward, by a module that applies the real head to chunks of `chunk_tokens` positions
and reduces each chunk at once to what the caller needs (a token's loss, a token's log-probability and the
entropy). Each chunk but the last runs under non-reentrant activation checkpointing: backward recomputes that
chunk's logits, so at any time only one chunk's logits (and their gradient) exist (the last chunk's are kept:
backward starts with them). Only positions that count get logits: the
labelled ones for a loss, the response for log-probabilities.

Why replace the head inside the forward rather than ask for hidden states and apply the head afterwards:
every wrapper then works unchanged — PEFT (LoRA/DoRA/QLoRA, prompt and prefix tuning, IA3), ftl's bottleneck
adapters, DDP (the head's gradient is produced inside its forward), accelerate's autocast (the head runs in
the same precision as before), and DeepSpeed ZeRO-3, whose hooks on the head *module* gather its partitioned
weight for each chunk (the weight is never read directly: under ZeRO-3 it is an empty partition). The head
is called as a module, so a LoRA adapter on lm_head, a fake-quantised head or a bias all apply.

Under ZeRO-3 every head call gathers the weight, a collective all ranks must join: the number of chunks is
made equal on every rank (the largest), padding with empty chunks. At least one (possibly empty) chunk always
runs, so the head's weight gets a (zero) gradient even on a rank whose batch counts no token, as DDP expects.

Models whose forward changes the head's output afterwards (Gemma 2/3 `final_logit_softcapping`, Cohere
`logit_scale`, Granite `logits_scaling`, ...) are refused with `ChunkedHeadUnsupported`, detected by what the
forward returns rather than by a list of names: set `train.loss_chunk_tokens: 0` to compute them plainly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

from ftl.data.tokenize import IGNORE
from ftl.errors import RecipeError

DEFAULT_CHUNK_TOKENS = 1024
CHUNK_KEY = "train.loss_chunk_tokens"


class ChunkedHeadUnsupported(RecipeError):
    """The chunked head cannot reproduce this model's logits (no output embeddings, or a forward that
    changes the head's output); computing them plainly (train.loss_chunk_tokens: 0) can."""


def causal_lm_of(model):
    """The transformers causal LM inside DDP / DeepSpeed / accelerate / PEFT wrappers (modules are shared)."""
    m = model
    while hasattr(m, "module") and isinstance(m.module, torch.nn.Module):  # DDP, DeepSpeed engine
        m = m.module
    if hasattr(m, "peft_config") and hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


class _HeadCall(torch.nn.Module):
    """Stands where the output head was for one forward; holds no parameters (the real head stays outside)."""

    def __init__(self, compute: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.compute = compute

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute(hidden)


@contextmanager
def _head_replaced(base, replacement: torch.nn.Module):
    head = base.get_output_embeddings()
    name = next((n for n, child in base.named_children() if child is head), None) if head is not None else None
    if name is None:
        raise ChunkedHeadUnsupported(
            f"{type(base).__name__} has no output head ftl can find (get_output_embeddings() is "
            f"{type(head).__name__ if head is not None else None}): set {CHUNK_KEY}: 0 to compute its loss plainly")
    setattr(base, name, replacement)
    try:
        yield
    finally:
        setattr(base, name, head)


def head_forward(model, inputs: dict, compute: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]) -> torch.Tensor:
    """model(**inputs) with its output head replaced by `compute(last_hidden_states, head)`; returns what the
    forward returns in place of the logits (through every wrapper's hooks). Refuses a model whose forward
    changes the head's output (soft-capping, scaling): `compute` could not reproduce it."""
    base = causal_lm_of(model)
    head = base.get_output_embeddings()
    produced = []

    def call(hidden):
        produced.append(compute(hidden, head))
        return produced[-1]

    with _head_replaced(base, _HeadCall(call)):
        out = model(**inputs)
    returned = out.logits if hasattr(out, "logits") else out[0]
    if len(produced) != 1 or not _same_tensor(returned, produced[0]):
        raise ChunkedHeadUnsupported(
            f"{type(base).__name__} ({getattr(base.config, 'model_type', '?')}) changes the output of its head "
            f"inside forward (final logit soft-capping or logit scaling, e.g. Gemma 2/3, Cohere, Granite): "
            f"ftl's chunked loss cannot reproduce its logits; set {CHUNK_KEY}: 0 to compute them plainly")
    return returned


def _same_tensor(a, b) -> bool:
    """The same values in the same memory (wrappers' hooks may re-wrap the tensor, e.g. by detach, but any
    arithmetic on it makes new memory)."""
    return isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and \
        a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def _partitioned(head: torch.nn.Module) -> bool:
    """The head's weight is partitioned by DeepSpeed ZeRO-3 (each call gathers it: a collective)."""
    return any(hasattr(p, "ds_id") for p in head.parameters())


def chunk_slices(rows: int, chunk_tokens: int, *heads: torch.nn.Module) -> list[slice]:
    """Slices of `chunk_tokens` rows covering `rows`; at least one (possibly empty), and when a head is
    partitioned by ZeRO-3 as many on every rank (the largest count, trailing slices empty)."""
    count = max(1, math.ceil(rows / chunk_tokens))
    if any(_partitioned(h) for h in heads) and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        t = torch.tensor([count], dtype=torch.long)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        count = int(t.item())
    return [slice(min(i * chunk_tokens, rows), min((i + 1) * chunk_tokens, rows)) for i in range(count)]


def _chunked(fn, head, rows: torch.Tensor, *per_row: torch.Tensor, chunk_tokens: int, extra=()) -> torch.Tensor:
    """fn(head, rows[s], *[t[s] for t in per_row], *extra) over chunks, concatenated; each chunk recomputed in
    backward (its logits are not kept)."""
    outputs = []
    slices = chunk_slices(rows.shape[0], chunk_tokens, head)
    for i, s in enumerate(slices):
        args = (head, rows[s], *(t[s] for t in per_row), *extra)
        # The last chunk keeps its logits for backward instead of recomputing them: backward starts with it,
        # right after the forward, so its logits would be rebuilt at once anyway (the same peak, one head pass
        # and softmax fewer, the same gradients).
        if torch.is_grad_enabled() and i < len(slices) - 1:
            outputs.append(torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False))
        else:
            outputs.append(fn(*args))
    return torch.cat(outputs)


def _token_ce(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def chunked_token_losses(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-position loss of predicting labels[:, t+1] from tokens ≤ t ([B, T-1], 0 where the label is ignored),
    as cross_entropy(logits[:, :-1].float(), labels[:, 1:], ignore_index) gives it. Virtual tokens a prompt
    method prepends are skipped (only the last T positions are scored)."""
    length = labels.shape[1]
    targets = labels[:, 1:]
    counted = targets != IGNORE

    def compute(hidden, head):
        rows = hidden[:, -length:][:, :-1][counted]  # [N, H]: only positions whose loss counts
        losses = _chunked(_token_ce, head, rows, targets[counted], chunk_tokens=chunk_tokens)
        return torch.zeros(targets.shape, dtype=losses.dtype, device=losses.device).masked_scatter(counted, losses)

    return head_forward(model, inputs, compute)


def _token_logprobs(head, hidden, targets, temperature: float, with_entropy: bool):
    logits = head(hidden).float() / temperature
    logp = torch.log_softmax(logits, -1)
    chosen = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return chosen
    return torch.stack([chosen, -(logp.exp() * logp).sum(-1)], -1)


def response_rows(per_position: torch.Tensor, length: int, prompt_length: int) -> torch.Tensor:
    """The positions of a forward's output ([B, T, ...]) that predict sequences[:, prompt_length:] of [B, length]
    sequences: the sequence is the last `length` positions (virtual tokens a prompt method prepends come first)."""
    return per_position[:, -length:][:, prompt_length - 1:-1]


def chunked_response_logprobs(model, inputs: dict, sequences: torch.Tensor, prompt_length: int,
                              temperature: float, with_entropy: bool, chunk_tokens: int,
                              hidden_out: list | None = None):
    """log p(sequences[:, prompt_length:]) at `temperature` ([B, R]), and the entropy of each of those
    distributions when asked: log_softmax(logits[:, prompt_length-1:-1].float() / temperature) gathered.
    hidden_out: a list that receives the last hidden states these come from ([B, R, H], in the graph)."""
    length = sequences.shape[1]
    targets = sequences[:, prompt_length:]

    def compute(hidden, head):
        rows = response_rows(hidden, length, prompt_length)
        if hidden_out is not None:
            hidden_out.append(rows)
        flat = _chunked(_token_logprobs, head, rows.reshape(-1, rows.shape[-1]), targets.reshape(-1),
                        chunk_tokens=chunk_tokens, extra=(temperature, with_entropy))
        return flat.view(*targets.shape, *flat.shape[1:])

    out = head_forward(model, inputs, compute)
    return (out[..., 0], out[..., 1]) if with_entropy else out


def hidden_states(model, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """The last hidden states ([B, T, H], virtual tokens included) and the output head, without the logits."""
    head = causal_lm_of(model).get_output_embeddings()
    return head_forward(model, inputs, lambda hidden, _: hidden), head


@torch.no_grad()
def chunked_kl(policy_head, policy_hidden: torch.Tensor, reference_head, reference_hidden: torch.Tensor,
               chunk_tokens: int, reference_context: Callable = nullcontext) -> torch.Tensor:
    """Exact KL(policy || reference) over the full vocabulary at each position, from both models' hidden
    states ([..., H] each, the same positions), chunk by chunk. reference_context(): entered around each
    call of the reference head (a LoRA policy's reference is its head with the adapter disabled)."""
    shape = policy_hidden.shape[:-1]
    p = policy_hidden.reshape(-1, policy_hidden.shape[-1])
    r = reference_hidden.reshape(-1, reference_hidden.shape[-1])
    out = []
    for s in chunk_slices(p.shape[0], chunk_tokens, policy_head, reference_head):
        policy_logp = torch.log_softmax(policy_head(p[s]).float(), -1)
        with reference_context():
            reference_logp = torch.log_softmax(reference_head(r[s]).float(), -1)
        out.append((policy_logp.exp() * (policy_logp - reference_logp)).sum(-1))
    return torch.cat(out).view(shape)
