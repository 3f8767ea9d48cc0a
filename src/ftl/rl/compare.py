"""Policy vs reference on held-out prompts: reward, win rate, KL, samples side by side. PPO compares with
its own reference; DPO and GRPO with the model they started from, in the same terms; `ftl eval` of a
policy run with the model it started from, through the same functions (so it reproduces the run's numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ftl.config.schema import Recipe, SamplingConfig
from ftl.data.tokenize import generation_prompt
from ftl.models.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_kl, hidden_states, response_rows
from ftl.rl.reference import Reference, load_frozen
from ftl.rl.reward import RewardFunction
from ftl.rl.rollout import Responses, forward_inputs, sample_responses


def sampled_responses(model, tokenizer, prompts: list[str], sampling: SamplingConfig, device,
                      seed: int = 0) -> Responses:
    """Sampled as in training (temperature, top-k), from a fixed seed so both models draw alike."""
    torch.manual_seed(seed)
    return sample_responses(model, tokenizer, prompts, sampling, device)


def response_inputs(r: Responses) -> dict:
    return forward_inputs(r.sequences, r.attention_mask, r.position_ids)


def response_positions(per_position: torch.Tensor, r: Responses) -> torch.Tensor:
    return response_rows(per_position, r.sequences.shape[1], r.prompt_length)


def response_log_softmax(model, r: Responses) -> torch.Tensor:
    return torch.log_softmax(response_positions(model(**response_inputs(r)).logits, r).float(), -1)


def response_kl(policy, reference: Reference, r: Responses, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Exact KL(policy || reference) at each response position ([B, R], full distributions). chunk_tokens > 0:
    from both models' hidden states, the heads applied chunk by chunk (never the full logits of either)."""
    if not chunk_tokens:
        with reference.model() as ref_model:
            ref_logp = response_log_softmax(ref_model, r)
        policy_logp = response_log_softmax(policy, r)
        return (policy_logp.exp() * (policy_logp - ref_logp)).sum(-1)
    with reference.model() as ref_model:
        ref_hidden, ref_head = hidden_states(ref_model, response_inputs(r))
    policy_hidden, policy_head = hidden_states(policy, response_inputs(r))
    return chunked_kl(policy_head, response_positions(policy_hidden, r), ref_head, response_positions(ref_hidden, r),
                      chunk_tokens, reference.model)


def echoes(prompts: list[str], texts: list[str]) -> list[bool]:
    """Whether each response only repeats text of its prompt (the question echoed back): a reward model
    that scores overlap with the question pays for it, and a policy learns it."""
    return [bool(t.strip()) and t.strip().lower() in p.lower() for p, t in zip(prompts, texts)]


@torch.no_grad()
def compare_policies(device, policy, reference: Reference, reward: RewardFunction, tokenizer,
                     prompts: list[str], sampling: SamplingConfig, samples: int = 4, repeats: int = 4,
                     chunk_tokens: int = DEFAULT_CHUNK_TOKENS, also: Optional[dict[str, RewardFunction]] = None) -> dict:
    """Sampled responses of both on the same prompts (repeated `repeats` times), on `device` (the
    accelerator's in a run). KL is exact per token (full distributions) along the policy's responses, summed
    over each response. `also`: more rewards scoring the same responses, each reported under its name (reward,
    raw score and win rate). Every rank runs it alike."""
    if not prompts:
        return {}
    prompts = prompts * repeats
    policy_out = sampled_responses(policy, tokenizer, prompts, sampling, device)
    with reference.model() as ref_model:
        ref_out = sampled_responses(ref_model, tokenizer, prompts, sampling, device)
    kl = (response_kl(policy, reference, policy_out, chunk_tokens) * policy_out.mask).sum(-1)
    (policy_scores, policy_raw), (ref_scores, ref_raw) = scores(reward, policy_out), scores(reward, ref_out)
    both_finished = policy_out.has_eos & ref_out.has_eos
    return {
        **summary(policy_scores, policy_raw, ref_scores, ref_raw, both_finished),
        **{name: summary(*scores(extra, policy_out), *scores(extra, ref_out), both_finished)
           for name, extra in (also or {}).items()},
        "eos_fraction": policy_out.has_eos.float().mean().item(),
        "reference_eos_fraction": ref_out.has_eos.float().mean().item(),
        "echo_fraction": sum(echoes(prompts, policy_out.texts)) / len(prompts),
        "reference_echo_fraction": sum(echoes(prompts, ref_out.texts)) / len(prompts),
        "kl_to_reference": kl.mean().item(),
        "responses": len(prompts),
        "samples": [{"prompt": prompts[i], "reference": ref_out.texts[i], "generation": policy_out.texts[i],
                     "reward_reference": ref_scores[i].item(), "reward_policy": policy_scores[i].item()}
                    for i in range(min(samples, len(prompts)))],
    }


def scores(reward: RewardFunction, r: Responses) -> tuple[torch.Tensor, torch.Tensor]:
    """(as optimised: score + missing-EOS penalty, the reward model / function alone)"""
    raw = reward(r.sequences, r.attention_mask, r.position_ids, r.texts).float()
    return reward.with_eos_penalty(raw, r.has_eos), raw


def win_rate(policy_scores: torch.Tensor, ref_scores: torch.Tensor) -> float:
    """Pairs (the same prompt and seed) the policy wins; ties count half."""
    return ((policy_scores > ref_scores).float() + 0.5 * (policy_scores == ref_scores).float()).mean().item()


def summary(policy_scores, policy_raw, ref_scores, ref_raw, both_finished: torch.Tensor) -> dict:
    """Both models' responses under one reward: means, raw means and the policy's win rate. The win rate counts
    the missing-EOS penalty, so a policy that only learned to stop wins it; `finished_win_rate` compares the raw
    scores of the pairs where both responses ended with EOS (a bool mask): better answers, finishing taken out."""
    return {
        "mean_reward": policy_scores.mean().item(),
        "reference_mean_reward": ref_scores.mean().item(),
        "mean_raw_score": policy_raw.mean().item(),
        "reference_mean_raw_score": ref_raw.mean().item(),
        "win_rate": win_rate(policy_scores, ref_scores),
        "finished_pairs": int(both_finished.sum().item()),
        "finished_win_rate": (win_rate(policy_raw[both_finished], ref_raw[both_finished])
                              if both_finished.any() else None),
    }


def compare_with_initial(device, policy, initial_dir: Path, tokenizer, recipe: Recipe,
                         records: list[dict], reward: RewardFunction,
                         also: Optional[dict[str, RewardFunction]] = None) -> dict:
    """A trained (unwrapped) policy against the model it started from (`initial_dir`) on the records'
    prompts, exactly as PPO reports it: DPO and GRPO at the end of a run, `ftl eval` of any policy run."""
    initial = load_frozen(recipe, initial_dir).to(device)
    prompts = [generation_prompt(tokenizer, r, recipe.data.system_prompt)[0] for r in records]
    return compare_policies(device, policy, Reference.frozen_model(initial), reward, tokenizer, prompts,
                            recipe.sampling, chunk_tokens=recipe.train.loss_chunk_tokens, also=also)
