"""DPO through TRL's DPOTrainer, on ftl's data and evaluation layers.

The run directory, manifest, metrics.jsonl, final save and report are the same as every stage's.
With a `reward:` section, the end of the run also compares the policy with its reference on
held-out prompts exactly as PPO does (mean reward, win rate, KL, samples), so DPO and PPO line up in
one pipeline report.
"""

from __future__ import annotations

from pathlib import Path

from ftl.config.schema import Recipe
from ftl.data.tokenize import preference_texts
from ftl.rl.compare import compare_with_initial
from ftl.rl.reward import load_reward
from ftl.stages.session import RunSession
from ftl.stages.trl_common import last_trl_checkpoint, metrics_callback, trainer_arguments
from ftl.train.loop import FitResult


def trl_pairs(tokenizer, records: list[dict], system_prompt) -> list[dict]:
    """Prompt rendered for generation; completions end with EOS, as the policy should produce them."""
    return [preference_texts(tokenizer, r, system_prompt) for r in records]


def run_dpo(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    policy = session.prepare_model(tokenizer)
    args = DPOConfig(beta=recipe.dpo.beta, loss_type=[recipe.dpo.loss_type], max_length=recipe.data.max_length,
                     **trainer_arguments(recipe, run_dir, session.main))
    validation, test = session.validation_records(splits), session.test_records(splits)
    trainer = DPOTrainer(model=policy, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list(trl_pairs(tokenizer, splits.train, recipe.data.system_prompt)),
                         eval_dataset=Dataset.from_list(trl_pairs(tokenizer, validation, recipe.data.system_prompt))
                         if validation else None, callbacks=[metrics_callback(session.log)])
    trainer.train(resume_from_checkpoint=last_trl_checkpoint(run_dir, resume))

    def scores(records: list[dict] | None = None) -> dict:
        """The trainer's evaluation of validation (prepared at start), or of other records."""
        dataset = Dataset.from_list(trl_pairs(tokenizer, records, recipe.data.system_prompt)) if records else None
        return {k.removeprefix("eval_"): v for k, v in trainer.evaluate(dataset).items()
                if isinstance(v, (int, float)) and "runtime" not in k and "per_second" not in k}

    def evaluate() -> dict:
        metrics = scores() if validation else {}
        if test:
            metrics["test"] = scores(test)
        if recipe.reward is not None:
            reward = load_reward(recipe, session.accelerator.device)
            acc = session.accelerator
            metrics.update(compare_with_initial(acc.device, acc.unwrap_model(trainer.model),
                                                session.base_dir(tokenizer), tokenizer, recipe, validation, reward))
        return metrics

    return session.finish(trainer.model, tokenizer, FitResult(steps=trainer.state.global_step), evaluate)
