"""DPO through TRL's DPOTrainer, on ftl's data and evaluation layers.

The run directory, manifest, metrics.jsonl, final save and report are the same as every stage's.
With a `ppo.reward` section, the end of the run also compares the policy with its reference on
held-out prompts exactly as PPO does (mean reward, win rate, KL, samples), so DPO and PPO line up in
one pipeline report.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftl.config.schema import Recipe
from ftl.data.tokenize import generation_prompt
from ftl.methods import QUANT_BITS
from ftl.models.load import load_model
from ftl.stages.session import RunSession
from ftl.train.loop import FitResult


def trl_pairs(tokenizer, records: list[dict], system_prompt) -> list[dict]:
    """Prompt rendered for generation; completions end with EOS, as the policy should produce them."""
    eos = tokenizer.eos_token
    return [{"prompt": generation_prompt(tokenizer, r, system_prompt)[0],
             "chosen": r["chosen"] + eos, "rejected": r["rejected"] + eos} for r in records]


def metrics_callback(log):
    from transformers import TrainerCallback

    class ToMetricsLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero and "loss" in logs:
                log({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                     "lr": logs.get("learning_rate", 0.0)})
    return ToMetricsLog()


def run_dpo(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    session = RunSession(recipe, run_dir, resume)
    splits = session.load_data()
    tokenizer = session.tokenizer(splits.train)
    policy = session.apply_method(load_model(recipe.model, session.base_dir(tokenizer),
                                             QUANT_BITS.get(recipe.method.kind), recipe.method.quant))
    t = recipe.train
    args = DPOConfig(
        output_dir=str(run_dir / "trl"), max_steps=t.max_steps or -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.grad_clip or 0.0,
        beta=recipe.dpo.beta, loss_type=[recipe.dpo.loss_type], max_length=recipe.data.max_length,
        use_cpu=not torch.cuda.is_available(), bf16=t.precision == "bf16",
        gradient_checkpointing=recipe.model.gradient_checkpointing, report_to=[], logging_steps=t.log_every,
        save_strategy="steps" if t.save_every else "no", save_steps=t.save_every or 500,
        save_total_limit=t.keep_checkpoints, seed=t.seed, disable_tqdm=not session.main)
    validation = splits.validation[: recipe.eval.max_examples]
    trainer = DPOTrainer(model=policy, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(trl_pairs(tokenizer, splits.train, recipe.data.system_prompt)),
                         eval_dataset=Dataset.from_list(trl_pairs(tokenizer, validation, recipe.data.system_prompt))
                         if validation else None, callbacks=[metrics_callback(session.log)])
    checkpoints = sorted((run_dir / "trl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if resume and checkpoints else None)

    def evaluate() -> dict:
        metrics = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()
                   if isinstance(v, (int, float)) and "runtime" not in k and "per_second" not in k} \
            if validation else {}
        if recipe.ppo is not None:
            metrics.update(compare_with_reference(session, trainer.model, tokenizer, recipe, validation))
        return metrics

    return session.finish(trainer.model, tokenizer, FitResult(steps=trainer.state.global_step), evaluate)


def compare_with_reference(session, policy, tokenizer, recipe: Recipe, validation: list[dict]) -> dict:
    from ftl.stages.ppo import Reference
    from ftl.stages.ppo.evaluate import compare_policies
    from ftl.stages.ppo.rollout import RewardFunction

    cfg, acc = recipe.ppo, session.accelerator
    reward_model = None
    if cfg.reward.kind == "model":
        reward_model = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}),
                                  Path(cfg.reward.path), head="sequence_classification").eval().to(acc.device)
    reward = RewardFunction(reward_model, cfg.reward.function, cfg.reward.kwargs)
    initial = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}),
                         session.base_dir(tokenizer)).eval().to(acc.device)
    reference = Reference.frozen_model(initial)
    prompts = [generation_prompt(tokenizer, r, recipe.data.system_prompt)[0] for r in validation]
    return compare_policies(acc, acc.unwrap_model(policy), reference, reward, tokenizer, prompts, cfg)
