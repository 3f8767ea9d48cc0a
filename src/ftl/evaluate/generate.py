"""Greedy generations on fixed prompts, so before/after samples are comparable."""

from __future__ import annotations

import torch

from ftl.data.tokenize import generation_prompt


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[tuple[str, str | None]], max_new_tokens: int) -> list[dict]:
    """prompts: (prompt text, reference or None). Every rank runs it (ZeRO-3 needs all ranks)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    for prompt, reference in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        samples.append({"prompt": prompt, "reference": reference, "generation": text})
    model.train(was_training)
    return samples


def sample_prompts(tokenizer, generate_cfg, system_prompt, validation: list[dict]) -> list[tuple[str, str | None]]:
    """The recipe's fixed prompts, then the first `from_validation` validation records' prompts."""
    fixed = [generation_prompt(tokenizer, {"prompt": p}, system_prompt) for p in generate_cfg.prompts]
    return fixed + [generation_prompt(tokenizer, r, system_prompt) for r in validation[:generate_cfg.from_validation]]
