"""GRPO through TRL's GRPOTrainer, rewarded by ftl's reward model or reward function.

Groups of `grpo.num_generations` completions per prompt; advantages relative to the group. Same run
directory, metrics.jsonl and end-of-run comparison with the reference as PPO and DPO.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftl.config.schema import Recipe
from ftl.data.tokenize import generation_prompt
from ftl.rl.compare import compare_with_initial
from ftl.rl.reward import load_reward
from ftl.stages.session import RunSession
from ftl.stages.trl_common import last_trl_checkpoint, metrics_callback, trainer_arguments
from ftl.train.loop import FitResult


def trl_reward(reward, tokenizer):
    """TRL calls reward functions with prompts and completions (strings); ftl scores whole sequences."""
    def score(prompts, completions, **_):
        texts = [p + c for p, c in zip(prompts, completions)]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        device = reward.model.device if reward.model is not None else torch.device("cpu")
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
        if reward.function is not None:
            return reward(ids, mask, None, list(completions)).tolist()
        return reward(ids, mask, None, texts).tolist()
    score.__name__ = "ftl_reward"
    return score


def run_grpo(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    tokenizer.padding_side = "left"  # TRL generates from left-padded prompts
    texts = [generation_prompt(tokenizer, r, recipe.data.system_prompt)[0] for r in splits.train]
    session.note_prompt_lengths(tokenizer, texts)  # what the planned peak in the manifest is computed for
    policy = session.prepare_model(tokenizer)
    reward = load_reward(recipe, session.accelerator.device)
    sampling = recipe.sampling
    args = GRPOConfig(num_generations=recipe.grpo.num_generations, beta=recipe.grpo.beta,
                      max_completion_length=sampling.max_new_tokens, temperature=sampling.temperature,
                      **trainer_arguments(recipe, run_dir, session.main))
    prompts = [{"prompt": text} for text in texts]
    trainer = GRPOTrainer(model=policy, reward_funcs=[trl_reward(reward, tokenizer)], args=args,
                          train_dataset=Dataset.from_list(prompts), processing_class=tokenizer,
                          callbacks=[metrics_callback(session.log)])
    trainer.train(resume_from_checkpoint=last_trl_checkpoint(run_dir, resume))
    tokenizer.padding_side = "right"
    validation = session.validation_records(splits)
    acc = session.accelerator
    return session.finish(trainer.model, tokenizer, FitResult(steps=trainer.state.global_step),
                          lambda: compare_with_initial(acc.device, acc.unwrap_model(trainer.model),
                                                       session.base_dir(tokenizer), tokenizer, recipe, validation,
                                                       reward))
