"""Rollouts: sample responses to prompts, then score them with the policy, the reference, the value model
and the reward. The sampling (`sample_responses`) is the one the end-of-run comparison draws with too."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ftl.config.schema import SamplingConfig
from ftl.models.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_response_logprobs, hidden_states, response_rows
from ftl.models.scoring import token_scores
from ftl.rl.maths import entropy_from_logits
from ftl.rl.value_head import is_value_head


@dataclass
class Responses:
    """One sampled response per left-padded prompt, masked after its first EOS."""

    sequences: torch.Tensor      # [B, P + R] left-padded prompt + response
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_length: int
    mask: torch.Tensor           # [B, R] 1 up to and including the first EOS (float)
    texts: list[str]
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None = None  # [B, R] at the sampling temperature, from generate's raw logits


@dataclass(kw_only=True)
class Rollout(Responses):
    """Sampled responses scored for a policy-gradient update. `logprobs` (inherited) is set: [B, R] under
    the policy that sampled, from generate's logits when `logprobs_from_generation` (see reuses_generation)."""

    ref_logprobs: torch.Tensor
    values: torch.Tensor         # zeros without a value model
    scores: torch.Tensor         # [B] reward per sequence (after the missing-EOS penalty)
    generation_seconds: float
    temperature: float           # sampled at; log-probabilities of later updates use the same
    logprobs_from_generation: bool = False

    @property
    def response_mask(self) -> torch.Tensor:
        return self.mask


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


def forward_inputs(sequences, attention_mask, position_ids) -> dict:
    """A scoring forward's keyword arguments: no KV cache (training and scoring read every position at once)."""
    return {"input_ids": sequences, "attention_mask": attention_mask, "position_ids": position_ids,
            "use_cache": False}


def response_logprobs(model, sequences, attention_mask, position_ids, prompt_length: int,
                      temperature: float, with_entropy: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                      hidden_out: list | None = None):
    """log p(response token) at `temperature` ([B, R]) and, with_entropy, each distribution's entropy.
    chunk_tokens > 0: without the full-vocabulary logits (ftl.models.chunked_loss); 0: from them.
    hidden_out: a list that receives the last hidden states at the same positions ([B, R, H], in the graph:
    what a critic sharing the policy's trunk reads)."""
    inputs = forward_inputs(sequences, attention_mask, position_ids)
    if chunk_tokens:
        return chunked_response_logprobs(model, inputs, sequences, prompt_length, temperature, with_entropy,
                                         chunk_tokens, hidden_out)
    out = model(**inputs, output_hidden_states=hidden_out is not None)
    length = sequences.shape[1]
    if hidden_out is not None:
        hidden_out.append(response_rows(out.hidden_states[-1], length, prompt_length))
    logits = response_rows(out.logits, length, prompt_length).float() / temperature
    targets = sequences[:, prompt_length:]
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logprobs, entropy_from_logits(logits)) if with_entropy else logprobs


def response_values(value_model, sequences, attention_mask, position_ids, prompt_length: int,
                    policy=None) -> torch.Tensor:
    """[B, R] values of the response positions: a separate value model's, or (ftl.rl.value_head) a head on the
    policy's last hidden states, read without the vocabulary logits."""
    if is_value_head(value_model):
        hidden, _ = hidden_states(policy, forward_inputs(sequences, attention_mask, position_ids))
        return value_model(response_rows(hidden, sequences.shape[1], prompt_length))
    return token_scores(value_model, sequences, attention_mask, position_ids)[:, prompt_length - 1:-1]


def reuses_generation(model, rows: int, sampling: SamplingConfig, chunk_tokens: int) -> str | None:
    """Why the rollout's log-probabilities cannot be taken from generate's logits (None: they can, and equal a
    separate no-grad forward within fp32 rounding — tests/test_ppo_rollout_reuse.py).
    generate hands back each step's raw logits (before temperature / top-k), computed from the KV cache with
    positions from the attention mask: the same numbers a full forward gives, in fp32, when nothing between the
    two differs. Kept separate: any non-fp32 parameter (16-bit weights, 4-bit/8-bit quantised layers: cached
    decoding and a full forward round differently, by far more than fp32 noise), an autocast wrapper
    (accelerate's mixed precision: a PEFT model's generate bypasses it, its forward does not), a prompt-learning
    PEFT method (its forward ignores the position ids generate uses) and more generated logits than one loss
    chunk (`chunk_tokens`: generate would hold rows x max_new_tokens vocabulary rows at once)."""
    if chunk_tokens and rows * sampling.max_new_tokens > chunk_tokens:
        return f"{rows} x {sampling.max_new_tokens} generated logits exceed a loss chunk of {chunk_tokens} tokens"
    if hasattr(model, "_original_forward"):
        return "mixed precision (autocast wraps the model's forward)"
    if ignores_position_ids(model):
        return "a prompt-learning method (its forward ignores position ids)"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "parameters that are not fp32"
    return None


def ignores_position_ids(model) -> bool:
    """A PEFT prompt-learning model (prompt/prefix tuning, P-tuning): its forward drops the position ids it is
    given, so a token's position is its column — removing padding columns would move it."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    peft = getattr(model, "active_peft_config", None)
    return bool(peft is not None and getattr(peft, "is_prompt_learning", False))


def trimmed(sequences, attention_mask, position_ids, prompt_length: int):
    """The columns of a batch that some row attends to: the left padding all rows share and the response
    columns after every row's end are dropped. Returns (sequences, attention_mask, position_ids, prompt_length,
    response columns kept — the first ones). Real tokens keep their position ids and see the same tokens, so
    their log-probabilities and values are those of the untrimmed batch (not for a model that ignores
    position ids: see ignores_position_ids)."""
    used = attention_mask.any(0)
    first = min(int(used[:prompt_length].long().argmax()), prompt_length - 1)  # argmax: first True (0 if none)
    response_used = used[prompt_length:].nonzero()
    kept = int(response_used.max()) + 1 if len(response_used) else 1
    end = prompt_length + kept
    return (sequences[:, first:end], attention_mask[:, first:end], position_ids[:, first:end],
            prompt_length - first, kept)


def generated_logprobs(step_logits, response: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, R] log p(response token) at `temperature` from generate's raw per-step logits ([B, V] each),
    one step at a time (no [B, R, V] copy)."""
    out = torch.empty(response.shape, dtype=torch.float32, device=response.device)
    for t, logits in enumerate(step_logits):
        logp = torch.log_softmax(logits.float() / temperature, -1)
        out[:, t] = logp.gather(-1, response[:, t:t + 1]).squeeze(-1)
    return out


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], sampling: SamplingConfig, device,
                     synced_gpus: bool | None = None, with_logprobs: bool = False) -> Responses:
    """One sampled response per prompt (temperature, top-k, max_new_tokens); tokens after the first EOS masked.
    synced_gpus: None lets transformers decide (True under ZeRO-3 with several ranks: every rank then
    decodes until all are done, so every rank must make the same number of calls); False for a model
    each rank holds whole. with_logprobs: also the responses' log-probabilities at the sampling temperature,
    from generate's raw logits (use only where reuses_generation allows)."""
    batch = left_padded(tokenizer, prompts, device)
    model.eval()
    out = model.generate(**batch, do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                         top_p=1.0, max_new_tokens=sampling.max_new_tokens, use_cache=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         synced_gpus=synced_gpus, output_logits=with_logprobs, return_dict_in_generate=with_logprobs)
    sequences = out.sequences if with_logprobs else out
    prompt_length = batch["input_ids"].shape[1]
    response = sequences[:, prompt_length:]
    mask, has_eos = response_mask(response, tokenizer.eos_token_id)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    texts = tokenizer.batch_decode(response * mask + tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
    logprobs = generated_logprobs(out.logits, response, sampling.temperature) if with_logprobs else None
    return Responses(sequences, attention, positions(attention), prompt_length, mask.float(), texts, has_eos,
                     logprobs)


@torch.no_grad()
def collect(policy, reference, value_model, reward, tokenizer, prompts: list[str], sampling: SamplingConfig,
            device, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Rollout:
    """Sample one response per prompt and score it (reference: ftl.rl.reference.Reference, reward:
    ftl.rl.reward.RewardFunction; value_model None: values are zeros)."""
    reuse = reuses_generation(policy, len(prompts), sampling, chunk_tokens) is None
    started = time.perf_counter()
    r = sample_responses(policy, tokenizer, prompts, sampling, device, with_logprobs=reuse)
    generation_seconds = time.perf_counter() - started
    seq, attention, pos, prompt_length = r.sequences, r.attention_mask, r.position_ids, r.prompt_length
    # a critic on the policy's trunk reads the hidden states of the policy's scoring forward, when there is one
    hidden = [] if is_value_head(value_model) and not reuse else None
    logprobs = r.logprobs if reuse else response_logprobs(policy, seq, attention, pos, prompt_length,
                                                          sampling.temperature, chunk_tokens=chunk_tokens,
                                                          hidden_out=hidden)
    ref_logprobs = reference.logprobs(seq, attention, pos, prompt_length, sampling.temperature, chunk_tokens)
    if value_model is None:  # a critic-free estimator: no value model
        values = torch.zeros_like(logprobs)
    elif hidden:
        values = value_model(hidden[0])
    else:
        values = response_values(value_model, seq, attention, pos, prompt_length, policy=policy)
    scores = reward.with_eos_penalty(reward(seq, attention, pos, r.texts).float(), r.has_eos)
    return Rollout(**(vars(r) | {"logprobs": logprobs}), ref_logprobs=ref_logprobs, values=values, scores=scores,
                   generation_seconds=generation_seconds, temperature=sampling.temperature,
                   logprobs_from_generation=reuse)
