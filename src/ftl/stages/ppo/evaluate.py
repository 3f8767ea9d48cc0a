"""Policy vs reference (the SFT model) on held-out prompts: reward, win rate, KL, samples side by side."""

from __future__ import annotations

import torch

from ftl.stages.ppo.rollout import left_padded, positions, response_mask


@torch.no_grad()
def sampled_responses(model, tokenizer, prompts: list[str], cfg, device, seed: int = 0):
    """Sampled as in training (temperature, top-k), from a fixed seed so both models draw alike."""
    batch = left_padded(tokenizer, prompts, device)
    model.eval()
    torch.manual_seed(seed)
    sequences = model.generate(**batch, do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k or None,
                               top_p=1.0, max_new_tokens=cfg.max_new_tokens, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    prompt_length = batch["input_ids"].shape[1]
    mask, has_eos = response_mask(sequences[:, prompt_length:], tokenizer.eos_token_id)
    attention = torch.cat([batch["attention_mask"], mask], dim=1)
    texts = tokenizer.batch_decode(sequences[:, prompt_length:] * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return sequences, attention, positions(attention), prompt_length, mask.float(), texts, has_eos


def response_log_softmax(model, sequences, attention, pos, prompt_length):
    logits = model(input_ids=sequences, attention_mask=attention, position_ids=pos, use_cache=False).logits
    return torch.log_softmax(logits[:, prompt_length - 1:-1].float(), -1)


@torch.no_grad()
def compare_policies(accelerator, policy, reference, reward, tokenizer, prompts: list[str], cfg,
                     samples: int = 4, repeats: int = 4) -> dict:
    """Sampled responses of both on the same prompts (repeated `repeats` times). KL is exact per token (full
    distributions) along the policy's responses, summed over each response. Every rank runs it alike."""
    if not prompts:
        return {}
    prompts = prompts * repeats
    device = accelerator.device
    outputs = {}
    for name in ("reference", "policy"):
        if name == "policy":
            seq, attention, pos, p_len, mask, texts, has_eos = sampled_responses(policy, tokenizer, prompts, cfg,
                                                                                 device)
        else:
            with reference.model() as ref_model:
                seq, attention, pos, p_len, mask, texts, has_eos = sampled_responses(ref_model, tokenizer, prompts,
                                                                                     cfg, device)
        raw = reward(seq, attention, pos, texts).float()
        penalised = raw if cfg.missing_eos_penalty is None else torch.where(has_eos, raw, raw + cfg.missing_eos_penalty)
        outputs[name] = (penalised, texts, (seq, attention, pos, p_len, mask), raw, has_eos.float().mean().item())
    seq, attention, pos, p_len, mask = outputs["policy"][2]
    policy_logp = response_log_softmax(policy, seq, attention, pos, p_len)
    with reference.model() as ref_model:
        ref_logp = response_log_softmax(ref_model, seq, attention, pos, p_len)
    kl = ((policy_logp.exp() * (policy_logp - ref_logp)).sum(-1) * mask).sum(-1)
    policy_scores, ref_scores = outputs["policy"][0], outputs["reference"][0]
    return {
        "mean_reward": policy_scores.mean().item(),            # as optimised: score + missing-EOS penalty
        "reference_mean_reward": ref_scores.mean().item(),
        "mean_raw_score": outputs["policy"][3].mean().item(),  # reward model / function alone
        "reference_mean_raw_score": outputs["reference"][3].mean().item(),
        "eos_fraction": outputs["policy"][4],
        "reference_eos_fraction": outputs["reference"][4],
        "win_rate": ((policy_scores > ref_scores).float() + 0.5 * (policy_scores == ref_scores).float()).mean().item(),
        "kl_to_reference": kl.mean().item(),
        "responses": len(prompts),
        "samples": [{"prompt": prompts[i], "reference": outputs["reference"][1][i],
                     "generation": outputs["policy"][1][i],
                     "reward_reference": ref_scores[i].item(), "reward_policy": policy_scores[i].item()}
                    for i in range(min(samples, len(prompts)))],
    }
