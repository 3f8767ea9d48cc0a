"""Policy vs reference (the SFT model) on held-out prompts: reward, win rate, KL, samples side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftl.stages.ppo.rollout import left_padded, positions, response_mask


@dataclass
class Responses:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_length: int
    mask: torch.Tensor       # response tokens up to and including the first EOS
    texts: list[str]
    has_eos: torch.Tensor


@torch.no_grad()
def sampled_responses(model, tokenizer, prompts: list[str], cfg, device, seed: int = 0) -> Responses:
    """Sampled as in training (temperature, top-k), from a fixed seed so both models draw alike."""
    batch = left_padded(tokenizer, prompts, device)
    model.eval()
    torch.manual_seed(seed)
    sequences = model.generate(**batch, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k,
                               top_p=1.0, max_new_tokens=cfg.max_new_tokens, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompt_length = batch["input_ids"].shape[1]
    mask, has_eos = response_mask(sequences[:, prompt_length:], tokenizer.eos_token_id)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    texts = tokenizer.batch_decode(sequences[:, prompt_length:] * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return Responses(sequences, attention, positions(attention), prompt_length, mask.float(), texts, has_eos)


def response_log_softmax(model, r: Responses) -> torch.Tensor:
    logits = model(input_ids=r.sequences, attention_mask=r.attention_mask, position_ids=r.position_ids,
                   use_cache=False).logits
    return torch.log_softmax(logits[:, r.prompt_length - 1:-1].float(), -1)


@torch.no_grad()
def compare_policies(accelerator, policy, reference, reward, tokenizer, prompts: list[str], cfg,
                     samples: int = 4, repeats: int = 4) -> dict:
    """Sampled responses of both on the same prompts (repeated `repeats` times). KL is exact per token (full
    distributions) along the policy's responses, summed over each response. Every rank runs it alike."""
    if not prompts:
        return {}
    prompts = prompts * repeats
    device = accelerator.device
    policy_out = sampled_responses(policy, tokenizer, prompts, cfg, device)
    with reference.model() as ref_model:
        ref_out = sampled_responses(ref_model, tokenizer, prompts, cfg, device)
        ref_logp = response_log_softmax(ref_model, policy_out)
    policy_logp = response_log_softmax(policy, policy_out)
    kl = ((policy_logp.exp() * (policy_logp - ref_logp)).sum(-1) * policy_out.mask).sum(-1)

    def scores(r: Responses) -> tuple[torch.Tensor, torch.Tensor]:
        """(as optimised: score + missing-EOS penalty, the reward model / function alone)"""
        raw = reward(r.sequences, r.attention_mask, r.position_ids, r.texts).float()
        if cfg.missing_eos_penalty is None:
            return raw, raw
        return torch.where(r.has_eos, raw, raw + cfg.missing_eos_penalty), raw

    (policy_scores, policy_raw), (ref_scores, ref_raw) = scores(policy_out), scores(ref_out)
    return {
        "mean_reward": policy_scores.mean().item(),
        "reference_mean_reward": ref_scores.mean().item(),
        "mean_raw_score": policy_raw.mean().item(),
        "reference_mean_raw_score": ref_raw.mean().item(),
        "eos_fraction": policy_out.has_eos.float().mean().item(),
        "reference_eos_fraction": ref_out.has_eos.float().mean().item(),
        "win_rate": ((policy_scores > ref_scores).float() + 0.5 * (policy_scores == ref_scores).float()).mean().item(),
        "kl_to_reference": kl.mean().item(),
        "responses": len(prompts),
        "samples": [{"prompt": prompts[i], "reference": ref_out.texts[i], "generation": policy_out.texts[i],
                     "reward_reference": ref_scores[i].item(), "reward_policy": policy_scores[i].item()}
                    for i in range(min(samples, len(prompts)))],
    }
